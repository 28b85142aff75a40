"""The soak workload: N container jobs (busybox ``true``) through one ``htc server``, sampling
what the server and its descendants hold every N/10 jobs (``openhtc.testing.soak``).

Descriptors and threads must stay flat after the first tenth (start-up noise allowed) and no
job may fail; otherwise the result is an error and ``python -m bench`` exits non-zero. The
runtime is ``--runtime`` (bwrap by default; podman or process).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.common import Result, log
from bench.containers import IMAGE, _push_image
from bench.server import TERMINAL, OpenhtcServer
from openhtc.testing.soak import Sample, problems, soak, table


def openhtc_soak(ctx: Any, db: str, n: int) -> Result:
    kind = ctx.runtime
    work = Path(tempfile.mkdtemp(prefix="openhtc-bench-soak-"))
    try:
        server = OpenhtcServer(runtime=kind, database_url=ctx.database_url(db), vcpus=ctx.vcpus)
        with server as srv, srv.api() as api:
            api.new_task("soak")
            if kind != "process":
                _push_image(api, work)

            def submit(k: int) -> None:
                api.submit_jobs(k, image=IMAGE)

            def finished() -> tuple[int, int]:
                counts = api.statuses()
                return sum(counts.get(s, 0) for s in TERMINAL), counts.get("FAILED", 0)

            def show(s: Sample) -> None:
                st = s.stats
                log(
                    f"soak {kind}: {s.jobs:,} jobs, {s.jobs_per_s:.0f} jobs/s, {s.failed} failed; "
                    f"server fds {st.fds} threads {st.threads} RSS {st.rss_mb:.0f} MB; "
                    f"children {st.children}: fds {st.child_fds} threads {st.child_threads} "
                    f"RSS {st.child_rss_mb:.0f} MB"
                )

            start = time.monotonic()
            samples = soak(srv.pid, submit, finished, n, steps=10, timeout_per_job=0.5, on_sample=show)
            seconds = time.monotonic() - start
            found = problems(samples, srv.pid)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log(f"soak {kind} / {db} / N={n}:\n{table(samples)}")
    first, last = samples[0].stats, samples[-1].stats
    result = Result(
        "soak",
        "openhtc",
        db,
        n,
        "jobs_per_s",
        "jobs/s",
        {
            "jobs_per_s": n / seconds,
            "seconds": seconds,
            "failed": samples[-1].failed,
            "fds_first": first.fds,
            "fds_last": last.fds,
            "fds_max": max(s.stats.fds for s in samples),
            "threads_first": first.threads,
            "threads_max": max(s.stats.threads for s in samples),
            "rss_mb_first": first.rss_mb,
            "rss_mb_last": last.rss_mb,
            "child_fds_first": first.child_fds,
            "child_fds_max": max(s.stats.child_fds for s in samples),
            "child_threads_max": max(s.stats.child_threads for s in samples),
        },
        params={
            "runtime": kind,
            "job": "busybox `true`, maxMemory 64" if kind != "process" else "`true`",
            "samples": [
                {"jobs": s.jobs, "jobs_per_s": round(s.jobs_per_s, 1), "failed": s.failed, **asdict(s.stats)}
                for s in samples
            ],
        },
    )
    if found:
        result.status = "error"
        result.notes += found
    return result
