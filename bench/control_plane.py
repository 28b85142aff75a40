"""Workload (a) inside one process: the control plane with the no-op runtime, no HTTP.

Run by the harness as ``python -m bench.control_plane '<json params>'`` so every trial gets a
fresh interpreter (and its own peak RSS). Protocol on stdout, one JSON object per line: first
``{"event": "ready", "pid": …}`` once the server is built and started; the worker then waits for a
line on stdin (time for the harness to attach py-spy) and prints ``{"event": "result", …}``.

The clock starts just before ``submit()`` (the server already running, as an idle server
receiving a batch) and stops when the task's counters show every job SUCCEEDED or FAILED. The
counters are polled in this process, so each poll competes for the GIL with the server's threads:
the interval grows with the elapsed time (0.5 % of it, 5-100 ms) to keep that cost small.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import cpu_seconds, job_batches, peak_rss_mb


def trial(n: int, database_url: str | None, timeout: float, poll: float = 0.005) -> dict[str, Any]:
    from openhtc.auth.tokens import Principal
    from openhtc.config import Settings
    from openhtc.services.submission import submit
    from openhtc.wiring import build_server

    tmp = tempfile.mkdtemp(prefix="openhtc-bench-cp-")
    try:
        settings = Settings(
            data_dir=Path(tmp),
            runtime="noop",
            executor_vcpus=2000,
            executor_memory_mb=10**9,
            database_url=database_url,
        )
        srv = build_server(settings)
        svc = srv.services
        try:
            ws = svc.accounts.workspaces()[0]
            project = svc.projects.create(ws.id, "bench", "", [settings.region], None, "bench", time.time())
            task = svc.projects.create_task(project, "cp", "", "bench", time.time())
            who = Principal("bench", ws.id, "WORKSPACE_ADMIN")
            body = job_batches(n, max_memory=None)
            srv.start()
            print(json.dumps({"event": "ready", "pid": _pid()}), flush=True)
            sys.stdin.readline()

            cpu0 = cpu_seconds()
            start = time.perf_counter()
            submit(svc, who, project, task, body, None)  # wakes the scheduler and executor, as the API does
            submitted = time.perf_counter()
            deadline = time.monotonic() + timeout
            counts: dict[str, int] = {}
            while True:
                with svc.db.read() as conn:
                    counts = svc.jobs.totals(conn, task.id)  # what summary-statistics sums
                done = counts.get("SUCCEEDED", 0) + counts.get("FAILED", 0)
                if done >= n:
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"only {done}/{n} jobs terminal after {timeout:.0f}s: {counts}")
                # Each poll takes the GIL from the server threads: poll finely only early on.
                time.sleep(min(0.1, max(poll, 0.005 * (time.perf_counter() - start))))
            finished = time.perf_counter()
            cpu1 = cpu_seconds()
        finally:
            srv.stop()
        return {
            "event": "result",
            "submit_s": submitted - start,
            "drain_s": finished - submitted,
            "seconds": finished - start,
            "failed": counts.get("FAILED", 0),
            "peak_rss_mb": peak_rss_mb(),
            "cpu_s": cpu1 - cpu0 if cpu0 is not None and cpu1 is not None else None,
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _pid() -> int:
    import os

    return os.getpid()


def main() -> int:
    params = json.loads(sys.argv[1])
    try:
        result = trial(int(params["n"]), params.get("database_url"), float(params["timeout"]))
    except Exception as exc:
        print(json.dumps({"event": "error", "error": f"{type(exc).__name__}: {exc}"}), flush=True)
        return 1
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
