"""The function-task workload: N trivial Python handler calls (``return event["x"] * 2``) with their
results fetched back, and the latency of one call on an idle system.

openhtc runs them as one function batch through the API of an ``htc server`` subprocess (process
runtime, the handler shipped as a zip in project storage, results streamed back in order with
``openhtc.client``); the bare loop calls the same function N times in this process, the floor
every system is set against. The peers (Dask, Ray, HyperQueue) run the same function in their
drivers' ``functions`` mode.
"""

from __future__ import annotations

import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

from bench.common import Profiler, Result, cpu_seconds, percentile
from bench.server import OpenhtcServer

HANDLER_MODULE = "bench_handlers"
HANDLER_SOURCE = 'def double(event, context):\n    return event["x"] * 2\n'
HANDLER = f"{HANDLER_MODULE}.double"
IMAGE = "bb"  # the process runtime runs the handler with the server's python3
WARMUP = 100  # calls before the clock starts: workers start, imports and caches warm up
IDLE = 0.02  # seconds between latency samples


def latency_samples(n: int) -> int:
    """Single calls timed for p50/p99: enough for a p99, bounded so the run stays short."""
    return max(20, min(200, n // 50))


def double(event: dict[str, Any], context: Any = None) -> Any:
    return event["x"] * 2


def events(n: int) -> list[dict[str, int]]:
    return [{"x": i} for i in range(n)]


def wrong(results: list[Any]) -> int:
    return sum(1 for i, r in enumerate(results) if r != 2 * i)


class BareLoop:
    """The floor: the handler called N times in a plain loop in this process (no IPC at all)."""

    name = "bare-loop"
    uses_db = False

    def supports(self, workload: str) -> bool:
        return workload == "functions"

    def run(self, workload: str, ctx: Any, db: str, n: int) -> Result:
        payload = events(n)
        start = time.perf_counter()
        results = [double(event, None) for event in payload]
        seconds = time.perf_counter() - start
        samples = []
        for i in range(latency_samples(n)):
            t0 = time.perf_counter()
            double({"x": i}, None)
            samples.append((time.perf_counter() - t0) * 1000)
        return Result(
            workload,
            self.name,
            db,
            n,
            "calls_per_s",
            "calls/s",
            {
                "calls_per_s": n / seconds,
                "seconds": seconds,
                "wrong": wrong(results),
                "call_p50_ms": percentile(samples, 50),
                "call_p99_ms": percentile(samples, 99),
            },
            params={"loop": "[double(event, None) for event in events], in the harness's process"},
        )


def _handler_zip(directory: Path) -> Path:
    path = directory / "bench_handlers.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{HANDLER_MODULE}.py", HANDLER_SOURCE)
    return path


def openhtc_functions(ctx: Any, db: str, n: int, url: str | None) -> Result:
    """One function batch of N calls through the API; the clock runs from the submit until the
    last result is read back. Then single calls, one at a time on the idle server."""
    from openhtc.client import Connection, Session
    from openhtc.client.storage import StorageClient

    with OpenhtcServer(runtime="process", database_url=url, vcpus=ctx.vcpus) as srv, srv.api() as api:
        api.new_task("functions")
        key = (srv.data_dir / "admin-api-key").read_text().strip()
        with Session(connection=Connection(srv.base_url, api_key=key, timeout=300.0)) as htc:
            with (
                tempfile.TemporaryDirectory() as tmp,
                StorageClient.for_project(htc.connection, api.project) as store,
            ):
                store.upload(_handler_zip(Path(tmp)), store.resolve("bench_handlers.zip"))
            task = htc.task(api.project, api.task)
            options: dict[str, Any] = {"code": "bench_handlers.zip", "max_memory": 256}
            task.map(IMAGE, HANDLER, events(WARMUP), **options)  # not measured
            samples = []  # first, while the server is idle and its tables small
            for i in range(latency_samples(n)):
                time.sleep(IDLE)
                t0 = time.perf_counter()
                task.map(IMAGE, HANDLER, [{"x": i}], **options)
                samples.append((time.perf_counter() - t0) * 1000)
            payload = events(n)
            name = f"functions-{db}-{n}"
            profiler = Profiler(srv.pid, ctx.profile_path(name)) if ctx.profile else None
            cpu0, client0 = cpu_seconds(srv.pid), time.process_time()
            start = time.perf_counter()
            batch = task.submit_functions(IMAGE, HANDLER, payload, **options)
            submitted = time.perf_counter()
            results = [result for _, result in batch.results(return_exceptions=True)]
            done = time.perf_counter()
            cpu1, client1 = cpu_seconds(srv.pid), time.process_time()
            profile = profiler.stop() if profiler is not None else None
        rss = srv.peak_rss_mb()
    seconds = done - start
    cpu = cpu1 - cpu0 if cpu0 is not None and cpu1 is not None else None
    result = Result(
        "functions",
        "openhtc",
        db,
        n,
        "calls_per_s",
        "calls/s",
        {
            "calls_per_s": n / seconds,
            "seconds": seconds,
            "submit_s": submitted - start,
            "wrong": wrong(results),
            "call_p50_ms": percentile(samples, 50),
            "call_p99_ms": percentile(samples, 99),
            "call_max_ms": max(samples),
            "peak_rss_mb": rss,
            "server_cpu_s": cpu,
            "server_cpu_us_per_call": 1e6 * cpu / n if cpu is not None else None,
            "client_cpu_s": client1 - client0,
        },
        params={
            "runtime": "process",
            "executor_vcpus": ctx.vcpus or "server default (CPUs)",
            "handler": "double(event, context): return event['x'] * 2, from a zip in project storage",
            "path": "Task.submit_functions (POST …/functions) + FunctionBatch.results() (long-polled pages)",
            "latency": f"{len(samples)} x Task.map of one event (POST, then the results long poll), "
            f"{IDLE * 1000:.0f} ms apart, after the warm-up and before the N calls",
            "cpu": "server_cpu_s: the htc server process (not its workers); client_cpu_s: this "
            "process (submit, results pages, JSON)",
        },
    )
    if profile is not None:
        result.params["profile"] = str(profile)
    if result.metrics["wrong"]:
        result.notes.append(f"{result.metrics['wrong']} call(s) failed or returned a wrong result")
    return result
