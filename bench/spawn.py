"""The spawn floor: how fast this machine can start and reap ``true`` with nothing around it.

The issue defines the floor as a sequential loop of ``os.posix_spawn`` + ``os.waitpid``; one loop
per core (forked children, started together) is reported beside it as the machine's ceiling.
"""

from __future__ import annotations

import os
import shutil
import time

ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}


def true_path() -> str:
    return shutil.which("true") or "/bin/true"


def resolve(argv: list[str] | None) -> list[str]:
    """``argv`` with its program made an absolute path (posix_spawn does not search PATH)."""
    if not argv:
        return [true_path()]
    found = shutil.which(argv[0])
    if found is None:
        raise FileNotFoundError(argv[0])
    return [found, *argv[1:]]


def spawn_loop(n: int, argv: list[str] | None = None) -> float:
    """Seconds to posix_spawn + waitpid ``argv`` (default ``true``) n times in a row."""
    argv = resolve(argv)
    path = argv[0]
    start = time.perf_counter()
    for _ in range(n):
        pid = os.posix_spawn(path, argv, ENV)
        os.waitpid(pid, 0)
    return time.perf_counter() - start


def spawn_latencies(n: int) -> list[float]:
    """Seconds of each of n single spawn + wait round trips."""
    path = true_path()
    argv = [path]
    out = []
    for _ in range(n):
        start = time.perf_counter()
        pid = os.posix_spawn(path, argv, ENV)
        os.waitpid(pid, 0)
        out.append(time.perf_counter() - start)
    return out


def parallel_spawn(n: int, loops: int, argv: list[str] | None = None) -> float:
    """Seconds for `loops` forked children to run n spawns in total, released together."""
    argv = resolve(argv)
    per = [n // loops + (1 if i < n % loops else 0) for i in range(loops)]
    go_r, go_w = os.pipe()
    children = []
    for count in per:
        pid = os.fork()
        if pid == 0:  # child: wait for the start signal, spawn, leave without cleanup
            try:
                os.close(go_w)
                os.read(go_r, 1)
                spawn_loop(count, argv)
            finally:
                os._exit(0)
        children.append(pid)
    os.close(go_r)
    time.sleep(0.1)
    start = time.perf_counter()
    os.write(go_w, b"x" * loops)
    for pid in children:
        os.waitpid(pid, 0)
    elapsed = time.perf_counter() - start
    os.close(go_w)
    return elapsed


def floor(n: int, argv: list[str] | None = None, loops: int | None = None) -> dict[str, float | int]:
    """Sequential and one-loop-per-core spawn rates for n spawns (after a short warm-up)."""
    spawn_loop(min(100, n), argv)
    t0 = os.times()
    seq = spawn_loop(n, argv)
    t1 = os.times()
    cpu = sum(t1[:4]) - sum(t0[:4])  # this process and the reaped children, user + system
    loops = loops or os.cpu_count() or 1
    par = parallel_spawn(n, loops, argv)
    return {
        "jobs_per_s": n / seq,
        "seconds": seq,
        "cpu_ms_per_spawn": 1000 * cpu / n,
        "parallel_jobs_per_s": n / par,
        "parallel_seconds": par,
        "parallel_loops": loops,
    }
