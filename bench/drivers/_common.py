"""What every peer driver shares (stdlib only: drivers run in the peers' side virtualenv).

A driver is ``python bench/drivers/<peer>.py '<json params>'``. It starts its peer, runs one
workload, stops the peer and prints one JSON line: ``{"event": "result", ...}``, or
``{"event": "error", "error": ..., "unavailable": bool}``. Params (see bench/systems/peer.py):

- ``mode``: ``throughput`` (N copies of ``argv`` at once; wall time from the first submit until
  the client sees all done), ``latency`` (N single jobs, one at a time, on the idle peer) or
  ``accept`` (N jobs submitted with nothing to run them: the time to accept them).
- ``functions``: N calls of ``double(event) = event["x"] * 2`` with their results gathered (wall
  time from the first submit until every result is back), then ``samples`` single calls, one at
  a time, for the p50/p99 of one call (``call_p50_ms``, ``call_p99_ms``).
- ``argv``: the command of every job; ``n``; ``slots``: CPUs the peer may use; ``warmup``: jobs
  run (and not measured) before the clock starts; ``interval``: idle seconds between latency
  samples; ``workdir``: a scratch directory for the peer's files.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any


class Unavailable(Exception):
    """The peer cannot run here (reported as unavailable, not as a failure)."""


def percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def rss_mb(pid: int | str = "self", field: str = "VmRSS") -> float | None:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return round(int(line.split()[1]) / 1024.0, 1)
    except OSError:
        return None
    return None


def tree_rss_mb(root: int) -> float | None:
    """Summed VmRSS of ``root`` and all its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                ppid = int(fh.read().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    total, stack, seen = 0.0, [root], set()
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        seen.add(pid)
        total += rss_mb(pid) or 0.0
        stack.extend(children.get(pid, []))
    return round(total, 1) if total else None


def latency_figures(samples_s: Sequence[float]) -> dict[str, Any]:
    ms = [s * 1000 for s in samples_s]
    return {"p50_ms": percentile(ms, 50), "p99_ms": percentile(ms, 99), "max_ms": max(ms) if ms else None}


def throughput_figures(n: int, start: float, submitted: float, done: float, failed: int) -> dict[str, Any]:
    seconds = done - start
    return {
        "jobs_per_s": n / seconds if seconds > 0 else None,
        "seconds": seconds,
        "submit_s": submitted - start,
        "failed": failed,
    }


def log(message: str) -> None:
    print(f"[driver {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def main(run: Callable[[dict[str, Any]], dict[str, Any]]) -> int:
    params = json.loads(sys.argv[1])
    try:
        out = run(params)
    except Unavailable as exc:
        print(json.dumps({"event": "error", "error": str(exc), "unavailable": True}), flush=True)
        return 1
    except Exception as exc:
        traceback.print_exc()
        print(json.dumps({"event": "error", "error": f"{type(exc).__name__}: {exc}"}), flush=True)
        return 1
    print(json.dumps({"event": "result", **out}, default=str), flush=True)
    return 0


def functions_figures(
    n: int, start: float, submitted: float, done: float, results: Sequence[Any] | None
) -> dict[str, Any]:
    """``calls_per_s`` and the count of calls whose result is wrong (None: none came back)."""
    figures = throughput_figures(n, start, submitted, done, 0)
    figures.pop("failed")
    figures["calls_per_s"] = figures.pop("jobs_per_s")
    if results is not None:
        figures["wrong"] = sum(1 for i, r in enumerate(results) if r != 2 * i)
    return figures


def call_latency(call: Callable[[int], Any], samples: int, idle: float) -> dict[str, Any]:
    """p50/p99 of ``call(i)`` (one call and its result) on the idle peer."""
    times = []
    for i in range(samples):
        time.sleep(idle)
        start = time.perf_counter()
        call(i)
        times.append(time.perf_counter() - start)
    figures = latency_figures(times)
    return {"call_p50_ms": figures["p50_ms"], "call_p99_ms": figures["p99_ms"]}
