"""Ray driver: a local Ray node (``ray.init`` with ``num_cpus=slots``, no dashboard, node IP
127.0.0.1) in the private network namespace the harness gives it; every job is one remote task
(``num_cpus=cpus``) that runs ``argv`` with ``subprocess.run``. ``ray.get`` returns as soon as
the results are pushed back, so the client sees the end at once. See _common.py."""

from __future__ import annotations

import os
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


def double(event: dict[str, Any]) -> Any:
    """The function workload's call (bench/functions.py); defined in the driver (``__main__``)
    so that it is pickled by value to the workers."""
    return event["x"] * 2


def run(p: dict[str, Any]) -> dict[str, Any]:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        import ray
    except ImportError as exc:
        raise Unavailable(f"ray is not importable: {exc}") from exc
    if p["mode"] == "accept":
        raise Unavailable("no equivalent: Ray keeps submitted tasks in the driver and raylet memory")
    argv, n, slots = list(p["argv"]), int(p["n"]), int(p["slots"])

    @ray.remote(num_cpus=int(p.get("cpus", 1)))
    def run_job(args: list[str]) -> int:
        return subprocess.run(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL).returncode

    remote_double = ray.remote(num_cpus=1)(double)
    t0 = time.perf_counter()
    ray.init(
        num_cpus=slots,
        include_dashboard=False,
        log_to_driver=False,
        _node_ip_address="127.0.0.1",
        _temp_dir=os.path.join(p["workdir"], "ray"),
    )
    try:
        out: dict[str, Any] = {"startup_s": time.perf_counter() - t0, "version": version("ray")}
        if p.get("warmup") and p["mode"] == "functions":
            ray.get([remote_double.remote({"x": i}) for i in range(int(p["warmup"]))])
        elif p.get("warmup"):
            ray.get([run_job.remote(argv) for _ in range(int(p["warmup"]))])
        if p["mode"] == "functions":
            start = time.perf_counter()
            refs = [remote_double.remote({"x": i}) for i in range(n)]
            submitted = time.perf_counter()
            results = ray.get(refs)
            done = time.perf_counter()
            out.update(functions_figures(n, start, submitted, done, results))
            interval = float(p.get("interval", 0.02))
            out.update(
                call_latency(lambda i: ray.get(remote_double.remote({"x": i})), int(p["samples"]), interval)
            )
        elif p["mode"] == "throughput":
            start = time.perf_counter()
            refs = [run_job.remote(argv) for _ in range(n)]
            submitted = time.perf_counter()
            codes = ray.get(refs)
            done = time.perf_counter()
            out.update(throughput_figures(n, start, submitted, done, sum(1 for c in codes if c != 0)))
        elif p["mode"] == "latency":
            samples, failed = [], 0
            for _ in range(n):
                start = time.perf_counter()
                failed += ray.get(run_job.remote(argv)) != 0
                samples.append(time.perf_counter() - start)
                time.sleep(float(p.get("interval", 0.02)))
            out.update(latency_figures(samples), failed=failed)
        else:
            raise ValueError(f"unknown mode {p['mode']!r}")
    finally:
        ray.shutdown()
    return out


if __name__ == "__main__":
    raise SystemExit(main(run))
