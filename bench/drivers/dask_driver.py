"""Dask driver: ``distributed.LocalCluster`` with ``slots`` single-threaded worker processes on
127.0.0.1 (no dashboard); every job is one task that runs ``argv`` with ``subprocess.run``.
Futures complete by push, so the client sees the end at once. See _common.py."""

from __future__ import annotations

import subprocess
import time
from importlib.metadata import version
from typing import Any

from _common import (
    Unavailable,
    call_latency,
    functions_figures,
    latency_figures,
    main,
    throughput_figures,
)


def run_job(argv: list[str], _index: int) -> int:
    return subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL).returncode


def double(event: dict[str, Any]) -> Any:
    """The function workload's call (bench/functions.py); defined in the driver (``__main__``)
    so that it is pickled by value to the workers."""
    return event["x"] * 2


def run(p: dict[str, Any]) -> dict[str, Any]:
    try:
        from distributed import Client, LocalCluster
    except ImportError as exc:
        raise Unavailable(f"dask.distributed is not importable: {exc}") from exc
    if p["mode"] == "accept":
        raise Unavailable("no equivalent: Dask keeps submitted tasks in the client and scheduler memory")
    argv, n, slots = list(p["argv"]), int(p["n"]), int(p["slots"])
    t0 = time.perf_counter()
    cluster = LocalCluster(
        n_workers=slots,
        threads_per_worker=1,
        processes=True,
        dashboard_address=None,
        host="127.0.0.1",
        local_directory=p["workdir"],
    )
    try:
        client = Client(cluster)
        client.wait_for_workers(slots)
        out: dict[str, Any] = {"startup_s": time.perf_counter() - t0, "version": version("distributed")}
        if p.get("warmup") and p["mode"] == "functions":
            client.gather(client.map(double, [{"x": i} for i in range(int(p["warmup"]))], pure=False))
        elif p.get("warmup"):
            client.gather(client.map(run_job, [argv] * int(p["warmup"]), range(int(p["warmup"])), pure=False))
        if p["mode"] == "functions":
            events = [{"x": i} for i in range(n)]
            start = time.perf_counter()
            futures = client.map(double, events, pure=False)
            submitted = time.perf_counter()
            results = client.gather(futures)
            done = time.perf_counter()
            out.update(functions_figures(n, start, submitted, done, results))
            interval = float(p.get("interval", 0.02))
            out.update(
                call_latency(
                    lambda i: client.submit(double, {"x": i}, pure=False).result(),
                    int(p["samples"]),
                    interval,
                )
            )
        elif p["mode"] == "throughput":
            start = time.perf_counter()
            futures = client.map(run_job, [argv] * n, range(n), pure=False)
            submitted = time.perf_counter()
            codes = client.gather(futures)
            done = time.perf_counter()
            out.update(throughput_figures(n, start, submitted, done, sum(1 for c in codes if c != 0)))
        elif p["mode"] == "latency":
            samples, failed = [], 0
            for i in range(n):
                start = time.perf_counter()
                failed += client.submit(run_job, argv, i, pure=False).result() != 0
                samples.append(time.perf_counter() - start)
                time.sleep(float(p.get("interval", 0.02)))
            out.update(latency_figures(samples), failed=failed)
        else:
            raise ValueError(f"unknown mode {p['mode']!r}")
        client.close()
    finally:
        cluster.close()
    return out


if __name__ == "__main__":
    raise SystemExit(main(run))
