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
        lambda out, self, keys, *_: any(k[0] == "job" for k in keys),
    )
    _wrap(live, "job_for", "wait.read.start", "wait.read.done")
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
        kind = "submit" if path.endswith("/batch") else "wait" if path.endswith("/wait") else None
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
    "submit.route",
    "submit.committed",
    "executor.kicked",
    "submit.route.done",
    "submit.http.out",
    "claim.start",
    "claim.committed",
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


def measure(n: int, db: str, switch_ms: float | None = None) -> dict[str, Any]:
    import tempfile

    from bench.server import OpenhtcServer
    from bench.systems.openhtc import _one_job

    trace = Path(tempfile.mkdtemp(prefix="openhtc-lonetrace-")) / "trace"
    samples: list[tuple[int, int, int]] = []  # submit call start, its answer, the wait's answer
    url = None
    cluster = None
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
            for i in range(n + 5):
                t0 = time.time_ns()
                job, _, _ = _one_job(api)
                t1 = time.time_ns()
                body = api.wait_job(job, 30).json()
                t2 = time.time_ns()
                if body.get("status") != "SUCCEEDED":
                    raise RuntimeError(f"job {job}: {body.get('status')}")
                if i >= 5:
                    samples.append((t0, t1, t2))
                time.sleep(0.02)
    finally:
        if cluster is not None:
            cluster.stop()
    events = []
    for line in trace.read_text().splitlines():
        at, label, _thread = line.split(" ", 2)
        events.append((int(at), label))
    events.sort()
    return _stages(samples, events)


def _stages(samples: list[tuple[int, int, int]], events: list[tuple[int, str]]) -> dict[str, Any]:
    """Each stage's p50 (ms from the submit call's start), taking for each sample the first
    event of each stage after the previous stage's (so a claim that found nothing, or an idle
    turn, does not count)."""
    import bisect

    times = [e[0] for e in events]
    since: dict[str, list[float]] = {s: [] for s in STAGES}
    client: dict[str, list[float]] = {"client: submit answered": [], "client: wait answered": []}
    for t0, t1, t2 in samples:
        lo, hi = bisect.bisect_left(times, t0), bisect.bisect_right(times, t2 + 1_000_000)
        window = events[lo:hi]
        for stage in STAGES:
            hit = next((at for at, label in window if label == stage), None)
            if hit is not None:
                since[stage].append((hit - t0) / 1e6)
        client["client: submit answered"].append((t1 - t0) / 1e6)
        client["client: wait answered"].append((t2 - t0) / 1e6)
    out = {name: statistics.median(v) for name, v in {**since, **client}.items() if v}
    out["samples"] = len(samples)
    out["p99 wait answered"] = sorted(client["client: wait answered"])[int(0.99 * (len(samples) - 1))]
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
    args = parser.parse_args(argv)
    found = measure(args.n, args.db, args.switch_ms)
    previous = 0.0
    print(f"{'stage':<28} {'p50 ms since submit':>20} {'step':>8}")
    for name, value in found.items():
        if name in ("samples",):
            continue
        step = value - previous if name in STAGES else float("nan")
        print(f"{name:<28} {value:>20.3f} {step:>8.3f}")
        if name in STAGES:
            previous = value
    print(f"samples: {found['samples']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
