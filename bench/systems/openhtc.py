"""openhtc on the workloads: in-process for the control plane, an ``htc server`` subprocess for
W1-W5 (W3 waits for the container runtimes)."""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any, TypeVar

from bench import report
from bench.common import (
    REPO,
    Profiler,
    Result,
    cpu_seconds,
    job_batches,
    log,
    peak_rss_mb,
    percentile,
    stop_process,
)
from bench.server import TERMINAL, Api, OpenhtcServer, parse_time
from bench.workloads import COMMANDS, SLEEP_S

T = TypeVar("T")


class Openhtc:
    name = "openhtc"
    uses_db = True

    def supports(self, workload: str) -> bool:
        return workload in (
            "control-plane", "e2e", "sleep", "containers", "submit", "latency", "soak", "functions"
        )  # fmt: skip

    def run(self, workload: str, ctx: Any, db: str, n: int) -> Result:
        if workload == "containers":
            return containers(ctx, db, n)
        if workload == "soak":
            from bench.soak import openhtc_soak

            return openhtc_soak(ctx, db, n)
        if workload == "functions":
            from bench.functions import openhtc_functions

            return openhtc_functions(ctx, db, n, ctx.database_url(db))
        url = ctx.database_url(db)
        return {
            "control-plane": control_plane,
            "e2e": e2e,
            "sleep": sleep,
            "submit": submit_batch,
            "latency": latency,
        }[workload](ctx, db, n, url)


# -- control plane ------------------------------------------------------------------------------------------


def _readline(proc: subprocess.Popen[str], deadline: float) -> str:
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("control-plane worker did not answer in time")
            if sel.select(timeout=min(left, 1.0)):
                return proc.stdout.readline()
            if proc.poll() is not None:
                return proc.stdout.readline()
    finally:
        sel.close()


def control_plane(ctx: Any, db: str, n: int, url: str | None) -> Result:
    timeout = 60 + n / 200
    params = {"n": n, "database_url": url, "timeout": timeout}
    deadline = time.monotonic() + timeout + 120
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bench.control_plane", json.dumps(params)],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            start_new_session=True,
        )
        profiler = None
        try:
            ready = json.loads(_readline(proc, deadline) or "{}")
            if ready.get("event") != "ready":
                raise RuntimeError(f"worker failed to start: {ready or _tail(err)}")
            if ctx.profile:
                profiler = Profiler(ready["pid"], ctx.profile_path(f"control-plane-{db}-{n}"))
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
            line = _readline(proc, deadline)
            if profiler is not None:
                profiler.stop()
            out: dict[str, Any] = (
                json.loads(line) if line.strip() else {"event": "error", "error": _tail(err)}
            )
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        finally:
            if profiler is not None:
                profiler.stop()
            stop_process(proc, grace=10)
    if out.get("event") != "result":
        raise RuntimeError(out.get("error") or "worker gave no result")
    metrics = {
        "jobs_per_s": n / out["seconds"],
        "drain_jobs_per_s": n / out["drain_s"] if out["drain_s"] > 0 else None,
        "seconds": out["seconds"],
        "submit_s": out["submit_s"],
        "drain_s": out["drain_s"],
        "failed": out["failed"],
        "peak_rss_mb": out["peak_rss_mb"],
        "cpu_s": out.get("cpu_s"),
        "cpu_cores": out["cpu_s"] / out["seconds"] if out.get("cpu_s") is not None else None,
    }
    result = Result(
        "control-plane",
        "openhtc",
        db,
        n,
        "jobs_per_s",
        "jobs/s",
        metrics,
        params={
            "runtime": "noop",
            "executor_vcpus": 2000,
            "batches": f"{(n + 999) // 1000} x <=1000",
            "path": "in-process submit() + scheduler + local executor, no HTTP",
        },
    )
    if profiler is not None:
        result.params["profile"] = str(profiler.out)
    return result


def _tail(fh: Any, chars: int = 2000) -> str:
    fh.seek(0)
    return str(fh.read()[-chars:])


# -- W1 and W2 ------------------------------------------------------------------------------------------


def e2e(ctx: Any, db: str, n: int, url: str | None) -> Result:
    return throughput("e2e", ctx, db, n, url, COMMANDS["e2e"], None)


def sleep(ctx: Any, db: str, n: int, url: str | None) -> Result:
    result = throughput("sleep", ctx, db, n, url, COMMANDS["sleep"], 1)
    ideal = (ctx.vcpus or os.cpu_count() or 1) / SLEEP_S
    result.metrics["ideal_jobs_per_s"] = ideal
    result.metrics["efficiency"] = result.metrics["jobs_per_s"] / ideal
    return result


def throughput(
    workload: str,
    ctx: Any,
    db: str,
    n: int,
    url: str | None,
    commands: list[str],
    max_vcpus: int | None,
    runtime: str = "process",
) -> Result:
    """N jobs of ``commands`` in one submit call; the clock stops when all are terminal."""
    timeout = 60 + n / 20
    definition: dict[str, Any] = {"commands": commands, "max_vcpus": max_vcpus}
    with OpenhtcServer(runtime=runtime, database_url=url, vcpus=ctx.vcpus) as srv, srv.api() as api:
        api.new_task("warmup")
        api.submit_jobs(20, **definition)  # first requests pay for lazy imports and caches; not measured
        api.wait_terminal(20, time.monotonic() + 60)
        api.new_task(workload)
        profiler = Profiler(srv.pid, ctx.profile_path(f"{workload}-{db}-{n}")) if ctx.profile else None
        try:
            cpu0 = cpu_seconds(srv.pid)
            start = time.perf_counter()
            api.submit_jobs(n, **definition)
            submitted = time.perf_counter()
            counts = api.wait_terminal(n, time.monotonic() + timeout)
            finished = time.perf_counter()
            cpu1 = cpu_seconds(srv.pid)
        finally:
            if profiler is not None:
                profiler.stop()
        rss = srv.peak_rss_mb()
    seconds = finished - start
    cpu = cpu1 - cpu0 if cpu0 is not None and cpu1 is not None else None
    result = Result(
        workload,
        "openhtc",
        db,
        n,
        "jobs_per_s",
        "jobs/s",
        {
            "jobs_per_s": n / seconds,
            "seconds": seconds,
            "submit_s": submitted - start,
            "failed": counts.get("FAILED", 0),
            "peak_rss_mb": rss,
            "server_cpu_s": cpu,
            "server_cpu_cores": cpu / seconds if cpu is not None else None,
            "server_cpu_ms_per_job": 1000 * cpu / n if cpu is not None else None,
        },
        params={
            "runtime": runtime,
            "executor_vcpus": ctx.vcpus or "server default (CPUs)",
            "job": f"commands {commands}, maxMemory 64" + (f", maxVCpus {max_vcpus}" if max_vcpus else ""),
            "poll": "summary-statistics, every 0.5 % of the elapsed time (10-100 ms)",
        },
    )
    if profiler is not None:
        result.params["profile"] = str(profiler.out)
    if counts.get("FAILED", 0):
        result.notes.append(f"{counts['FAILED']} job(s) FAILED")
    return result


def containers(ctx: Any, db: str, n: int) -> Result:
    """W3 on openhtc: busybox `true` under ``htc server --runtime <ctx.container>`` (bench.containers)."""
    from bench.containers import openhtc_containers

    return openhtc_containers(ctx, db, n)


# -- W4 ------------------------------------------------------------------------------------------


def submit_batch(ctx: Any, db: str, n: int, url: str | None) -> Result:
    with OpenhtcServer(runtime="noop", database_url=url, executor=False) as srv, srv.api() as api:
        api.new_task("warmup")
        api.submit_jobs(1)  # first requests pay for lazy imports and caches; not measured
        api.new_task("submit")
        body = job_batches(n)
        profiler = Profiler(srv.pid, ctx.profile_path(f"submit-{db}-{n}")) if ctx.profile else None
        try:
            cpu0 = cpu_seconds(srv.pid)
            start = time.perf_counter()
            echoes = api.submit(body)
            seconds = time.perf_counter() - start
            cpu1 = cpu_seconds(srv.pid)
        finally:
            if profiler is not None:
                profiler.stop()
        last = f"{echoes[-1]['parentJobId']}:{body[-1]['batchSize'] - 1}"
        t0 = time.perf_counter()
        check = api.job(last)
        confirm_ms = (time.perf_counter() - t0) * 1000
        summary_ms, summary = _timed(api.statuses)
        page_ms, page = _timed(lambda: api.jobs_page(100))
        rss_now = peak_rss_mb(srv.pid, "VmRSS")
        rows_pending = srv.rows_pending()
        rss = srv.peak_rss_mb()
    counted = sum(summary[-1].values())
    result = Result(
        "submit",
        "openhtc",
        db,
        n,
        "seconds",
        "s",
        {
            "seconds": seconds,
            "jobs_per_s": n / seconds,
            "summary_ms": percentile(summary_ms, 50),
            "summary_first_ms": summary_ms[0],
            "page_ms": percentile(page_ms, 50),
            "page_first_ms": page_ms[0],
            "last_job_get_ms": confirm_ms,
            "last_job_status_code": check.status_code,
            "rss_mb": rss_now,
            "peak_rss_mb": rss,
            "rows_pending": rows_pending,
            "server_cpu_s": cpu1 - cpu0 if cpu0 is not None and cpu1 is not None else None,
        },
        params={
            "request": f"{len(body)} x batchSize <=1000 in one POST .../jobs/batch",
            "server": "--no-executor (the scheduler runs; nothing executes)",
            "summary": f"GET .../summary-statistics, median of {len(summary_ms)} calls",
            "page": f"GET .../jobs?pageSize=100, median of {len(page_ms)} calls",
            "rss": "rss_mb: the server's VmRSS after those calls; peak_rss_mb: its VmHWM",
            "rows": "rows_pending: accepted jobs whose rows are not written yet (the submit writes 20,000,"
            " the scheduler the rest as the queue needs them: docs/architecture.md)",
        },
    )
    if profiler is not None:
        result.params["profile"] = str(profiler.out)
    if check.status_code != 200:
        result.notes.append(f"GET of the last job {last} answered {check.status_code}")
    if counted != n:
        result.notes.append(f"summary-statistics counted {counted} jobs, not {n}")
    if page[-1].status_code != 200 or len(page[-1].json().get("items", [])) != 100:
        result.notes.append(f"the jobs page answered {page[-1].status_code} without 100 items")
    return result


def _timed(call: Callable[[], T], times: int = 5) -> tuple[list[float], list[T]]:
    """Milliseconds of each of ``times`` calls, and what each returned."""
    ms, out = [], []
    for _ in range(times):
        t0 = time.perf_counter()
        out.append(call())
        ms.append((time.perf_counter() - t0) * 1000)
    return ms, out


# -- W5 ------------------------------------------------------------------------------------------


_TRUE_JOB = {"batchSize": 1, "htcJobDefinition": {"imageName": "bb", "commands": ["true"], "maxMemory": 64}}


def _one_job(api: Api) -> tuple[str, float, float]:
    """Submit one `true` job: its uuid, and perf_counter() and time.time() at the call's start."""
    start, wall = time.perf_counter(), time.time()
    echo = api.submit([_TRUE_JOB])
    return f"{echo[0]['parentJobId']}:0", start, wall


def _run_pass(api: Api, n: int) -> list[float]:
    """openhtc's submit-and-wait (one request per job: ``POST …/jobs/run``): each call's ms;
    none on a server without the route."""
    out: list[float] = []
    for i in range(n + 3):
        start = time.perf_counter()
        answer = api.run_job(_TRUE_JOB, 30)
        if answer.status_code == 404 and i == 0:
            return []
        body = answer.json()
        if body.get("status") not in TERMINAL:
            raise TimeoutError(f"job {body.get('jobUUID')} not terminal after a 30 s run: {body}")
        if i >= 3:
            out.append((time.perf_counter() - start) * 1000)
        time.sleep(0.02)  # idle between samples
    return out


def _server_latency(body: dict[str, Any]) -> float | None:
    created, completed = parse_time(body.get("createdAt")), parse_time(body.get("completedAt"))
    if created is None or completed is None:
        return None
    return (completed - created) * 1000


def latency(ctx: Any, db: str, n: int, url: str | None) -> Result:
    poll = 0.002
    client_ms: list[float] = []
    pushed_ms: list[float] = []
    pushed_submit_ms: list[float] = []  # the pushed pass's submit calls
    server_pushed_ms: list[float] = []  # completedAt - createdAt in the pushed pass
    pushed_seen_ms: list[float] = []  # completedAt -> the wait's answer received
    submit_ms: list[float] = []
    server_polled_ms: list[float] = []
    server_quiet_ms: list[float] = []
    get_ms: list[float] = []
    to_created_ms: list[float] = []
    to_visible_ms: list[float] = []
    failed = 0
    with OpenhtcServer(runtime="process", database_url=url, vcpus=ctx.vcpus) as srv, srv.api() as api:
        api.new_task("latency")
        profiler = Profiler(srv.pid, ctx.profile_path(f"latency-{db}-{n}")) if ctx.profile else None
        for i in range(n + 3):  # pass 1: poll the job every 2 ms; the first 3 warm up
            job, start, wall = _one_job(api)
            submitted = time.perf_counter()
            deadline = time.monotonic() + 30
            while True:
                t0 = time.perf_counter()
                body = api.job(job).json()
                get_ms.append((time.perf_counter() - t0) * 1000)
                if body.get("status") in TERMINAL:
                    seen = time.time()
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"job {job} not terminal after 30 s: {body.get('status')}")
                time.sleep(poll)
            done = time.perf_counter()
            if i >= 3:
                client_ms.append((done - start) * 1000)
                submit_ms.append((submitted - start) * 1000)
                failed += body["status"] == "FAILED"
                created, completed = parse_time(body.get("createdAt")), parse_time(body.get("completedAt"))
                if created is not None and completed is not None:
                    server_polled_ms.append((completed - created) * 1000)
                    # Same host, same clock: split the client's view at the server's timestamps.
                    to_created_ms.append((created - wall) * 1000)
                    to_visible_ms.append((seen - completed) * 1000)
            time.sleep(0.02)  # idle between samples
        if profiler is not None:  # the polled pass only
            profiler.stop()
        for i in range(n + 3):  # pass 2: openhtc's pushed wait (one long poll per job)
            job, start, _wall = _one_job(api)
            submitted = time.perf_counter()
            body = api.wait_job(job, 30).json()
            seen = time.time()
            if body.get("status") not in TERMINAL:
                raise TimeoutError(f"job {job} not terminal after a 30 s wait: {body.get('status')}")
            if i >= 3:
                pushed_ms.append((time.perf_counter() - start) * 1000)
                pushed_submit_ms.append((submitted - start) * 1000)
                server = _server_latency(body)
                completed = parse_time(body.get("completedAt"))
                if server is not None and completed is not None:
                    server_pushed_ms.append(server)
                    pushed_seen_ms.append((seen - completed) * 1000)
            time.sleep(0.02)  # idle between samples
        run_ms = _run_pass(api, n)  # pass 2b: the submit that waits
        wait = max(0.05, 2 * (percentile(client_ms, 99) or 50) / 1000)
        for _ in range(n):  # pass 3: no polling while the job runs; read its timestamps afterwards
            job, _start, _wall = _one_job(api)
            time.sleep(wait)
            deadline = time.monotonic() + 30
            body = api.job(job).json()
            while body.get("status") not in TERMINAL and time.monotonic() < deadline:
                time.sleep(0.01)
                body = api.job(job).json()
            server = _server_latency(body)
            if server is not None:
                server_quiet_ms.append(server)
            time.sleep(0.02)
        rss = srv.peak_rss_mb()
    metrics: dict[str, Any] = {
        "p50_ms": percentile(client_ms, 50),
        "p99_ms": percentile(client_ms, 99),
        "max_ms": max(client_ms),
        "pushed_p50_ms": percentile(pushed_ms, 50),
        "pushed_p99_ms": percentile(pushed_ms, 99),
        "pushed_max_ms": max(pushed_ms),
        "pushed_submit_call_p50_ms": percentile(pushed_submit_ms, 50),
        "run_p50_ms": percentile(run_ms, 50) if run_ms else None,
        "run_p99_ms": percentile(run_ms, 99) if run_ms else None,
        "server_pushed_p50_ms": percentile(server_pushed_ms, 50),
        "pushed_completed_to_seen_p50_ms": percentile(pushed_seen_ms, 50),
        "submit_call_p50_ms": percentile(submit_ms, 50),
        "get_call_p50_ms": percentile(get_ms, 50),
        "submit_to_created_p50_ms": percentile(to_created_ms, 50),
        "completed_to_seen_p50_ms": percentile(to_visible_ms, 50),
        "server_p50_ms": percentile(server_quiet_ms, 50),
        "server_p99_ms": percentile(server_quiet_ms, 99),
        "server_polled_p50_ms": percentile(server_polled_ms, 50),
        "server_polled_p99_ms": percentile(server_polled_ms, 99),
        "failed": failed,
        "peak_rss_mb": rss,
    }
    shown = (
        report.fmt(metrics["p50_ms"]),
        report.fmt(metrics["pushed_p50_ms"]),
        report.fmt(metrics["server_p50_ms"]),
    )
    log(
        f"latency {db}: client p50 {shown[0]} ms polled, {shown[1]} ms pushed,"
        f" {report.fmt(metrics['run_p50_ms'])} ms submit-and-wait; server p50 {shown[2]} ms"
    )
    return Result(
        "latency",
        "openhtc",
        db,
        n,
        "p50_ms",
        "ms",
        metrics,
        params={
            "runtime": "process",
            "executor_vcpus": ctx.vcpus or "server default (CPUs)",
            "client": "POST batchSize 1, then GET the job every 2 ms until terminal",
            "pushed": "POST batchSize 1, then one GET /openhtc/v1/…/jobs/{id}/wait (long poll)",
            "run": "one POST /openhtc/v1/…/jobs/run: the job submitted, answered once it has ended",
            "server": "completedAt - createdAt (ms resolution), from a 2nd pass without polling",
        },
        notes=[
            "p50_ms/p99_ms: client-observed, from the start of the submit call to the first poll "
            "that shows SUCCEEDED (includes HTTP round trips and up to 2 ms of poll interval)",
            "pushed_*: client-observed, from the start of the submit call to the answer of openhtc's "
            "pushed wait (a long poll the server answers when the job's end is committed); "
            "server_pushed: completedAt - createdAt in that pass; pushed_completed_to_seen: "
            "completedAt -> the wait's answer received",
            "server_*: the job's completedAt - createdAt; server_polled_* from the polled pass",
            "submit_to_created: client's submit start -> createdAt; completed_to_seen: completedAt -> "
            "the poll that saw SUCCEEDED (report flush + GET + poll interval); server timestamps "
            "have 1 ms resolution",
        ],
    )
