"""The soak run: many jobs through one server, sampling what the server holds as they pass.

``soak`` submits ``n`` jobs in ``steps`` equal rounds, waits for each round to finish and then
samples the server and its descendants (:mod:`openhtc.testing.procstats`). ``problems`` judges
the samples: descriptors and threads must stay flat after the first round (start-up noise
allowed), and no job may fail. Used by ``python -m bench --workload soak`` and its CI test.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from openhtc.testing.procstats import ProcStats, fd_kinds, sample

# Growth from the first sample (after one round, once the server is warm) to any later one
# that still counts as noise: a pooled connection, a worker thread started late.
FD_NOISE = 16
THREAD_NOISE = 8


@dataclass(frozen=True, slots=True)
class Sample:
    jobs: int  # jobs finished when sampled
    seconds: float  # since the first submit
    jobs_per_s: float  # of the round that ended here
    failed: int  # jobs FAILED so far
    stats: ProcStats


def soak(
    pid: int,
    submit: Callable[[int], None],
    finished: Callable[[], tuple[int, int]],
    n: int,
    steps: int = 10,
    *,
    timeout_per_job: float = 1.0,
    on_sample: Callable[[Sample], None] | None = None,
) -> list[Sample]:
    """Run ``n`` jobs in ``steps`` rounds. ``submit(k)`` submits k more jobs; ``finished()``
    returns (terminal, failed) counts of everything submitted so far."""
    samples: list[Sample] = []
    per_step = max(1, n // steps)
    done = 0
    start = time.monotonic()
    while done < n:
        k = min(per_step, n - done)
        round_start = time.monotonic()
        submit(k)
        done += k
        deadline = round_start + 60 + k * timeout_per_job
        while True:
            terminal, failed = finished()
            if terminal >= done:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {terminal}/{done} jobs finished in time")
            time.sleep(0.1)
        now = time.monotonic()
        got = Sample(done, now - start, k / (now - round_start), failed, sample(pid))
        samples.append(got)
        if on_sample is not None:
            on_sample(got)
    return samples


def problems(samples: list[Sample], pid: int | None = None) -> list[str]:
    """What is wrong with a soak run: growth beyond noise, or failed jobs."""
    out: list[str] = []
    if not samples:
        return ["no samples"]
    first, last = samples[0].stats, samples[-1].stats
    peak = max(samples[1:] or samples, key=lambda s: s.stats.fds).stats
    if peak.fds - first.fds > FD_NOISE:
        kinds = f" (now {fd_kinds(pid)})" if pid is not None else ""
        out.append(f"server descriptors grew {first.fds} -> {peak.fds}{kinds}")
    if max(s.stats.threads for s in samples) - first.threads > THREAD_NOISE:
        out.append(f"server threads grew {first.threads} -> {max(s.stats.threads for s in samples)}")
    if max(s.stats.child_fds for s in samples) - first.child_fds > FD_NOISE * 2:
        out.append(f"descendants' descriptors grew {first.child_fds} -> {last.child_fds}")
    if max(s.stats.child_threads for s in samples) - first.child_threads > THREAD_NOISE * 2:
        out.append(f"descendants' threads grew {first.child_threads} -> {last.child_threads}")
    if samples[-1].failed:
        out.append(f"{samples[-1].failed} job(s) failed")
    return out


def table(samples: list[Sample]) -> str:
    """The samples as a markdown table."""
    rows = [
        "| jobs | s | jobs/s | failed | fds | threads | RSS MB | child fds | child threads | child RSS MB |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in samples:
        st = s.stats
        rows.append(
            f"| {s.jobs:,} | {s.seconds:.0f} | {s.jobs_per_s:.0f} | {s.failed} | {st.fds} | {st.threads} "
            f"| {st.rss_mb:.0f} | {st.child_fds} | {st.child_threads} | {st.child_rss_mb:.0f} |"
        )
    return "\n".join(rows)
