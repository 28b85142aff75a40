"""A lone job's path through openhtc, timed stage by stage (issue 19, W5 with the pushed wait).

``python -m bench.lonetrace --n 100 --db sqlite`` starts ``htc server --runtime process`` with
probes wrapped around the stages of a lone job's path (the submit call, its commit, the
executor's claim, the attempt journal, the hand-off to the launcher, the job's start and exit
as the server learns them, the report's commit, the waiter's wake-up, read and answer), then
submits ``true`` jobs one at a time, 20 ms apart, each followed by the pushed wait (as W5's
second pass). It prints, for each stage, the p50 of its time since the submit call started
(the client's clock and the server's are the same host's) and of the step from the stage
before. The probes cost a few microseconds each; they are for finding where the time goes, not
for the W5 figure itself (``python -m bench --workload w5``).

``--call`` traces a lone function call instead (issue 20's idle call: the submit of a one-event
function batch with ``wait``, which answers its result, as ``Task.map`` does). ``--pg-log`` (with
``--db postgres``) also logs every statement PostgreSQL runs and prints how many fall in each
sample's window, and the statements of one sample in order: the round trips of the path.

``python -m bench.lonetrace serve TRACE -- htc-server-arguments`` is the server side: the
probes installed, then ``htc server`` in this process; each stage appends one line to TRACE.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

_FD = -1


def _mark(label: str) -> None:
    os.write(_FD, f"{time.time_ns()} {label} {threading.current_thread().name}\n".encode())


def _wrap(
    owner: Any, name: str, before: str | None, after: str | None, when: Callable[..., bool] | None = None
) -> None:
    original = getattr(owner, name)

    @functools.wraps(original)
    def probe(*args: Any, **kwargs: Any) -> Any:
        began = time.time_ns()
        out = original(*args, **kwargs)
        if when is None or when(out, *args, **kwargs):
            if before:
                os.write(_FD, f"{began} {before} {threading.current_thread().name}\n".encode())
            if after:
                _mark(after)
        return out

    setattr(owner, name, probe)


def install(trace: str) -> None:
    """Wrap the stages of a lone job's path with probes that append to ``trace``."""
    global _FD
    _FD = os.open(trace, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    from openhtc.api import app as app_module
    from openhtc.api.routes import jobs as job_routes
    from openhtc.api.routes import live
    from openhtc.executor import journal, local
    from openhtc.runtimes import launcher, process
    from openhtc.services import executors, notify
    from openhtc.store import jobs

    _wrap(job_routes, "submit_to", "submit.route", "submit.route.done")
    _wrap(jobs.JobStore, "submit_batches", None, "submit.committed")
    _wrap(local.LocalExecutor, "kick", "executor.kicked", None)
    _wrap(
        executors.ExecutorService, "claim", "claim.start", "claim.committed", lambda out, *a, **k: bool(out)
    )
    _wrap(journal.AttemptJournal, "begin_many", "journal.start", "journal.synced")
    _wrap(process.ProcessRuntime, "start", "runtime.start", "runtime.handed")
    _wrap(
        local.LocalExecutor,
        "_report",
        None,
        "job.end.seen",
        lambda out, self, launch, status, *a, **k: int(status) in (5, 6),  # SUCCEEDED, FAILED
    )
    _wrap(
        executors.ExecutorService,
        "report",
        "report.start",
        "report.committed",
        lambda out, *a, **k: any(c[5] in (5, 6) for c in out.changes),
    )
    _wrap(
        notify.LocalNotifier,
        "_fire",
        None,
        "waiter.woken",
        lambda out, self, keys, *_: any(k[0] in ("job", "task") for k in keys),
    )
    _wrap(live, "job_for", "wait.read.start", "wait.read.done")
    from openhtc.api.routes import functions as function_routes
    from openhtc.store import functions as function_store

    _wrap(function_routes, "store_functions", "submit.route", "submit.route.done")
    # finer stages of the call's path (PostgreSQL's round trips): the submit's reads, the claim's
    from openhtc.store import queue, transitions

    _wrap(function_routes, "target", "submit.reads.start", "submit.reads.done")
    _wrap(queue.QueueStore, "claim", None, "claim.store.committed", lambda out, *a, **k: bool(out))
    _wrap(queue.QueueStore, "_queued_and_running", "claim.begin", "claim.queued.read")
    _wrap(queue.QueueStore, "_queued", None, "claim.candidates.read")
    _wrap(transitions.StatusWrites, "load", None, "rows.loaded")
    _wrap(function_store.FunctionStore, "events", "event.read.start", "event.read.done")
    _wrap(function_routes, "results_page", "wait.read.start", "wait.read.done")
    # not stages: counted per sample (PostgreSQL: a single server's NOTIFYs, heard by itself too)
    from openhtc.services.notify import ClusterNotifier
    from openhtc.store.pg_notify import PgChannel

    _wrap(PgChannel, "send", None, "notify.sent")
    _wrap(ClusterNotifier, "receive", None, "notify.heard")
    original_dispatch = launcher._Process._dispatch

    def dispatch(self: Any, message: tuple[Any, ...]) -> None:
        if message[0] in ("started", "exited"):
            _mark(f"launcher.{message[0]}")
        original_dispatch(self, message)

    launcher._Process._dispatch = dispatch  # type: ignore[method-assign]
    # the launcher processes run a copy of their script that probes their loop too
    probe = Path(trace).with_name("launcher_probe.py")
    probe.write_text(_LAUNCHER_PROBE.format(trace=trace, real=str(launcher.LOOP_SCRIPT.parent)))
    launcher.LOOP_SCRIPT = probe
    original_create = app_module.create_app

    def create_app(*args: Any, **kwargs: Any) -> Any:
        app = original_create(*args, **kwargs)
        app.add_middleware(_HttpProbe)
        return app

    app_module.create_app = create_app  # wiring imports it when it builds the app


_LAUNCHER_PROBE = """
import os, sys, time
sys.path.insert(0, {real!r})
import launcher_loop as L
fd = os.open({trace!r}, os.O_WRONLY | os.O_APPEND)
def mark(label):
    os.write(fd, f"{{time.time_ns()}} {{label}} launcher\\n".encode())
def wrap(name, before, after):
    original = getattr(L.Loop, name)
    def probe(self, *args):
        if before:
            mark(before(self) if callable(before) else before)
        out = original(self, *args)
        if after:
            mark(after)
        return out
    setattr(L.Loop, name, probe)
wrap("_control", "launcher.recv", None)
wrap("_start", "launcher.spawn", "launcher.spawned")
wrap("_reap", "launcher.reap", None)
def sent(self):
    return "launcher.send." + ("exited" if b"exited" in b"".join(self.replies) else "started")
wrap("_send", sent, None)
sys.exit(L.main(sys.argv))
"""


class _HttpProbe:
    """The submit and wait requests' first byte in and last byte out."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        kind = (
            "submit"
            if path.endswith(("/batch", "/functions"))
            else "wait"
            if path.endswith(("/wait", "/results"))
            else None
        )
        if kind is None:
            await self.app(scope, receive, send)
            return
        _mark(f"{kind}.http.in")

        async def sent(message: Any) -> None:
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                _mark(f"{kind}.http.out")

        await self.app(scope, receive, sent)


def serve(argv: list[str]) -> None:
    """``TRACE [SWITCH_MS] -- htc-arguments``: SWITCH_MS sets the interpreter's GIL switch
    interval (an experiment: how long a thread woken by I/O may wait for the GIL)."""
    trace, rest = argv[0], argv[argv.index("--") + 1 :]
    if argv.index("--") > 1:
        sys.setswitchinterval(float(argv[1]) / 1000)
    install(trace)
    from openhtc.cli.main import main

    sys.argv = ["htc", *rest]
    main()


# -- the client side ---------------------------------------------------------------------------

STAGES = (
    "submit.http.in",
    "submit.reads.start",
    "submit.reads.done",
    "submit.route",
    "submit.committed",
    "executor.kicked",
    "submit.route.done",
    "submit.http.out",
    "claim.start",
    "claim.begin",
    "claim.queued.read",
    "claim.candidates.read",
    "rows.loaded",
    "claim.store.committed",
    "claim.committed",
    "event.read.start",
    "event.read.done",
    "journal.start",
    "journal.synced",
    "runtime.start",
    "runtime.handed",
    "launcher.recv",
    "launcher.spawn",
    "launcher.spawned",
    "launcher.send.started",
    "launcher.started",
    "wait.http.in",
    "launcher.reap",
    "launcher.send.exited",
    "launcher.exited",
    "job.end.seen",
    "report.start",
    "report.committed",
    "waiter.woken",
    "wait.read.start",
    "wait.read.done",
    "wait.http.out",
)


_COUNTED = ("notify.sent", "notify.heard")


def measure(
    n: int, db: str, switch_ms: float | None = None, call: bool = False, pg_log: bool = False
) -> dict[str, Any]:
    import tempfile

    from bench.server import OpenhtcServer

    trace = Path(tempfile.mkdtemp(prefix="openhtc-lonetrace-")) / "trace"
    samples: list[tuple[int, int, int]] = []  # submit call start, its answer, the wait's answer
    url = None
    cluster = None
    statements: list[tuple[int, int, str]] = []
    if db == "postgres":
        from openhtc.testing.postgres import PostgresCluster

        cluster = PostgresCluster()
        cluster.start()
        url = cluster.new_database()
    switch = [] if switch_ms is None else [str(switch_ms)]
    prefix = [sys.executable, "-m", "bench.lonetrace", "serve", str(trace), *switch, "--"]
    try:
        with (
            OpenhtcServer(runtime="process", database_url=url, command_prefix=prefix) as srv,
            srv.api() as api,
        ):
            api.new_task("lonetrace")
            one = _call_client(srv, api) if call else _job_client(api)
            for i in range(n + 5):
                if i == 5 and pg_log and cluster is not None:
                    log_from = _log_statements(cluster)
                t0 = time.time_ns()
                t1 = one()
                t2 = time.time_ns()
                if i >= 5:
                    samples.append((t0, t1, t2))
                time.sleep(0.02)
        if pg_log and cluster is not None:
            statements = _statements(cluster.log, log_from)
    finally:
        if cluster is not None:
            cluster.stop()
    events = []
    for line in trace.read_text().splitlines():
        at, label, _thread = line.split(" ", 2)
        events.append((int(at), label))
    events.sort()
    found = _stages(samples, events)
    if pg_log:
        found["statements"] = _per_sample(samples, statements)
    return found


def _job_client(api: Any) -> Callable[[], int]:
    """One lone job: submit, then its pushed wait; returns when the submit was answered."""
    from bench.systems.openhtc import _one_job

    def one() -> int:
        job, _, _ = _one_job(api)
        t1 = time.time_ns()
        body = api.wait_job(job, 30).json()
        if body.get("status") != "SUCCEEDED":
            raise RuntimeError(f"job {job}: {body.get('status')}")
        return t1

    return one


def _call_client(srv: Any, api: Any) -> Callable[[], int]:
    """One lone function call (as ``Task.map`` of one event): the submit with ``wait``, which
    answers the call's result (else the results long poll); returns when the submit was answered."""
    import tempfile

    from bench.functions import HANDLER, IMAGE, _handler_zip
    from openhtc.client import Connection, Session
    from openhtc.client.storage import StorageClient

    key = (srv.data_dir / "admin-api-key").read_text().strip()
    with (
        Session(connection=Connection(srv.base_url, api_key=key)) as htc,
        tempfile.TemporaryDirectory() as tmp,
        StorageClient.for_project(htc.connection, api.project) as store,
    ):
        store.upload(_handler_zip(Path(tmp)), store.resolve("bench_handlers.zip"))
    url = f"{api.root}/openhtc/v1/projects/{api.project}/tasks/{api.task}/functions"
    counter = [0]

    def one() -> int:
        counter[0] += 1
        body = {"image": IMAGE, "handler": HANDLER, "code": "bench_handlers.zip", "maxMemory": 256}
        answer = api.http.post(url, json={**body, "events": [{"x": counter[0]}]}, params={"wait": 1}).json()
        t1 = time.time_ns()
        page = answer["results"]
        if not page["items"]:  # not ended within the submit's wait: as Task.map, the long poll
            page = api.http.get(f"{url}/{answer['batchId']}/results", params={"from": 0, "wait": 30}).json()
        if [item["result"] for item in page["items"]] != [2 * counter[0]]:
            raise RuntimeError(f"call {answer['batchId']}: {page}")
        return t1

    return one


def _log_statements(cluster: Any) -> int:
    """Have PostgreSQL log every statement from now on; returns where its log stands."""
    import psycopg

    with psycopg.connect(host="127.0.0.1", port=cluster.port, user=cluster.user, autocommit=True) as conn:
        conn.execute("ALTER SYSTEM SET log_min_duration_statement = 0")
        conn.execute("ALTER SYSTEM SET log_line_prefix = '%m [%p] '")
        conn.execute("ALTER SYSTEM SET log_timezone = 'UTC'")
        conn.execute("SELECT pg_reload_conf()")
    time.sleep(0.5)
    return cluster.log.stat().st_size


def _statements(log: Path, start: int) -> list[tuple[int, int, str]]:
    """(ns since the epoch, backend pid, statement) of every statement the log holds from
    ``start``: a simple query's, or an extended one's execute step."""
    import datetime
    import re

    pattern = re.compile(
        r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}) UTC \[(\d+)\] LOG:  duration: [\d.]+ ms  "
        r"(?:statement: |execute [^:]*: )(.*)$"
    )
    out = []
    with open(log, "rb") as fh:
        fh.seek(start)
        for raw in fh.read().decode(errors="replace").splitlines():
            found = pattern.match(raw)
            if found is None:
                continue
            stamp = datetime.datetime.strptime(found.group(1), "%Y-%m-%d %H:%M:%S.%f")
            at = int(stamp.replace(tzinfo=datetime.UTC).timestamp() * 1e9)
            out.append((at, int(found.group(2)), found.group(3)[:90]))
    return out


def _per_sample(
    samples: list[tuple[int, int, int]], statements: list[tuple[int, int, str]]
) -> dict[str, Any]:
    """How many statements PostgreSQL ran in each sample's window (from 1 ms before its submit
    to its answer; the log's clock has millisecond steps), the median, and the median sample's
    statements in order, each with its ms from the submit's start and its backend."""
    counts = []
    for t0, _, t2 in samples:
        counts.append(sum(1 for at, _, _ in statements if t0 - 1_000_000 <= at <= t2))
    median = statistics.median(counts)
    pick = min(range(len(samples)), key=lambda i: abs(counts[i] - median))
    t0, _, t2 = samples[pick]
    listed = [
        (round((at - t0) / 1e6, 1), pid, text) for at, pid, text in statements if t0 - 1_000_000 <= at <= t2
    ]
    return {"median": median, "min": min(counts), "max": max(counts), "one": listed}


def _stages(samples: list[tuple[int, int, int]], events: list[tuple[int, str]]) -> dict[str, Any]:
    """Each stage's p50 (ms from the submit call's start), taking for each sample the first
    event of each stage after the previous stage's (so a claim that found nothing, or an idle
    turn, does not count)."""
    import bisect

    times = [e[0] for e in events]
    since: dict[str, list[float]] = {s: [] for s in STAGES}
    counted: dict[str, list[int]] = {label: [] for label in _COUNTED}
    client: dict[str, list[float]] = {"client: submit answered": [], "client: wait answered": []}
    for t0, t1, t2 in samples:
        lo, hi = bisect.bisect_left(times, t0), bisect.bisect_right(times, t2 + 1_000_000)
        window = events[lo:hi]
        for stage in STAGES:
            hit = next((at for at, label in window if label == stage), None)
            if hit is not None:
                since[stage].append((hit - t0) / 1e6)
        for label in _COUNTED:
            counted[label].append(sum(1 for _, name in window if name == label))
        client["client: submit answered"].append((t1 - t0) / 1e6)
        client["client: wait answered"].append((t2 - t0) / 1e6)
    out = {name: statistics.median(v) for name, v in {**since, **client}.items() if v}
    out["samples"] = len(samples)
    for label, counts in counted.items():
        if any(counts):
            out[f"{label} per sample"] = statistics.mean(counts)
    answered = sorted(client["client: wait answered"])
    out["p99 wait answered"] = answered[int(0.99 * (len(samples) - 1))]
    # the spread: a path with two modes (a wait with a period) shows as a step between deciles
    out["deciles"] = [round(answered[int(q / 10 * (len(answered) - 1))], 1) for q in range(11)]
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "serve":
        serve(argv[1:])
        return 0
    parser = argparse.ArgumentParser(prog="python -m bench.lonetrace")
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--db", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--switch-ms", type=float, help="the server's GIL switch interval (default 5)")
    parser.add_argument("--call", action="store_true", help="a lone function call instead of a job")
    parser.add_argument("--pg-log", action="store_true", help="count PostgreSQL's statements (postgres)")
    args = parser.parse_args(argv)
    found = measure(args.n, args.db, args.switch_ms, args.call, args.pg_log)
    listed = found.pop("statements", None)
    previous = 0.0
    print(f"{'stage':<28} {'p50 ms since submit':>20} {'step':>8}")
    deciles = found.pop("deciles")
    for name, value in found.items():
        if name in ("samples",):
            continue
        step = value - previous if name in STAGES else float("nan")
        print(f"{name:<28} {value:>20.3f} {step:>8.3f}")
        if name in STAGES:
            previous = value
    print(f"samples: {found['samples']}; wait answered, deciles (ms): {deciles}")
    if listed is not None:
        print(f"statements per sample: median {listed['median']}, min {listed['min']}, max {listed['max']}")
        for at, pid, text in listed["one"]:
            print(f"  {at:>6.1f} ms  [{pid}]  {text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
