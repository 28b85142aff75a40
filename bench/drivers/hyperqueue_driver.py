"""HyperQueue driver: ``hyperqueue.cluster.LocalCluster`` (server and worker in the bundled Rust
library) with one worker of ``slots`` cores; every job is one program task. See _common.py.

HyperQueue's Python client learns that a job finished by polling the server once a second
(``wait_for_jobs``), so what its client sees lags the real end by up to 1 s. The driver reports
that client view as the figure and, beside it, the bracket the polls give: the last poll that
still saw unfinished tasks (``jobs_per_s_upper``). For latency, a second pass times each task
to its own last instruction (a marker file it writes, polled every 1 ms) — HyperQueue's best
case, without the poll.
"""

from __future__ import annotations

import os
import shlex
import time
from importlib.metadata import version
from typing import Any

from _common import (
    Unavailable,
    call_latency,
    functions_figures,
    latency_figures,
    log,
    main,
    throughput_figures,
    tree_rss_mb,
)


def double(event: dict[str, Any]) -> Any:
    """The function workload's call (bench/functions.py); defined in the driver (``__main__``)
    so that it is pickled by value. HyperQueue's function tasks return nothing to the client."""
    return event["x"] * 2


def run(p: dict[str, Any]) -> dict[str, Any]:
    try:
        from hyperqueue import Job
        from hyperqueue.cluster import LocalCluster, WorkerConfig
        from hyperqueue.ffi.protocol import ResourceRequest
    except ImportError as exc:
        raise Unavailable(f"hyperqueue is not importable: {exc}") from exc

    argv, n, workdir = list(p["argv"]), int(p["n"]), p["workdir"]
    request = ResourceRequest(cpus=int(p.get("cpus", 1)))

    def functions_job(start: int, count: int) -> Any:
        job = Job()
        for i in range(start, start + count):
            job.function(double, args=({"x": i},), stdout=None, stderr=None, resources=request)
        return job

    def job_of(count: int, args: list[str] = argv) -> Any:
        job = Job()
        for _ in range(count):
            job.program(args, stdout=None, stderr=None, cwd=workdir, resources=request)
        return job

    def wait(submitted: Any) -> tuple[float, int]:
        """Wait like ``Client.wait_for_jobs`` (without its progress bar): returns the time of
        the last poll that still saw unfinished tasks, and the number of failed tasks."""
        seen: dict[str, Any] = {"unfinished_at": time.perf_counter(), "failed": 0}

        def progress(jobs: dict[int, dict[str, Any]]) -> None:
            state = jobs[submitted.id]
            seen["failed"] = state["failed"]
            if not state["completed"]:
                seen["unfinished_at"] = time.perf_counter()

        client.connection.wait_for_jobs([submitted.id], progress)
        return seen["unfinished_at"], seen["failed"]

    t0 = time.perf_counter()
    cluster = LocalCluster(server_dir=os.path.join(workdir, "hq-server"))
    try:
        if p["mode"] != "accept":
            cluster.start_worker(WorkerConfig(cores=int(p["slots"])))
        client = cluster.client()
        startup = time.perf_counter() - t0
        out: dict[str, Any] = {"startup_s": startup, "version": version("hyperqueue")}
        if p["mode"] not in ("accept", "functions") and p.get("warmup"):
            wait(client.submit(job_of(int(p["warmup"]))))
        if p["mode"] == "throughput":
            start = time.perf_counter()
            submitted_job = client.submit(job_of(n))  # building the tasks is part of the client's submit
            submitted = time.perf_counter()
            unfinished_at, failed = wait(submitted_job)
            done = time.perf_counter()
            out.update(throughput_figures(n, start, submitted, done, failed))
            out["jobs_per_s_upper"] = n / (unfinished_at - start) if unfinished_at > start else None
            out["poll_lag_max_s"] = done - unfinished_at
        elif p["mode"] == "latency":
            samples, failed = [], 0
            for _ in range(n):
                start = time.perf_counter()
                failed += wait(client.submit(job_of(1)))[1]
                samples.append(time.perf_counter() - start)
                time.sleep(float(p.get("interval", 0.02)))
            out.update(latency_figures(samples), failed=failed)
            out.update(_marker_pass(client, job_of, argv, n, workdir, float(p.get("interval", 0.02))))
        elif p["mode"] == "functions":
            if p.get("warmup"):
                wait(client.submit(functions_job(0, int(p["warmup"]))))
            start = time.perf_counter()
            submitted_job = client.submit(functions_job(0, n))
            submitted = time.perf_counter()
            unfinished_at, failed = wait(submitted_job)
            done = time.perf_counter()
            out.update(functions_figures(n, start, submitted, done, None), failed=failed)
            out["calls_per_s_upper"] = n / (unfinished_at - start) if unfinished_at > start else None
            interval = float(p.get("interval", 0.02))
            out.update(
                call_latency(lambda i: wait(client.submit(functions_job(i, 1))), int(p["samples"]), interval)
            )
        elif p["mode"] == "accept":
            start = time.perf_counter()
            job = job_of(n)
            built = time.perf_counter()
            client.submit(job)
            done = time.perf_counter()
            out.update(
                seconds=done - start,
                build_s=built - start,
                submit_call_s=done - built,
                rss_mb=tree_rss_mb(os.getpid()),
            )
            log(f"accepted {n} tasks in {done - start:.2f} s")
        else:
            raise ValueError(f"unknown mode {p['mode']!r}")
    finally:
        cluster.stop()
    return out


def _marker_pass(
    client: Any, job_of: Any, argv: list[str], n: int, workdir: str, idle: float
) -> dict[str, Any]:
    """Submit -> the task's own last instruction (it creates a marker file), polled every 1 ms."""
    samples = []
    for i in range(n):
        marker = os.path.join(workdir, f"hq-done-{i}")
        script = shlex.join(argv) + " && : > " + shlex.quote(marker)
        start = time.perf_counter()
        client.submit(job_of(1, ["/bin/sh", "-c", script]))
        while not os.path.exists(marker):
            time.sleep(0.001)
        samples.append(time.perf_counter() - start)
        time.sleep(idle + 0.005)  # no wait(): its 1 s poll would make this pass last n seconds
    figures = latency_figures(samples)
    return {"task_done_p50_ms": figures["p50_ms"], "task_done_p99_ms": figures["p99_ms"]}


if __name__ == "__main__":
    raise SystemExit(main(run))
