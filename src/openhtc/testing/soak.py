"""The soak run: many jobs through one server, sampling what the server holds as they pass.

``soak`` submits ``n`` jobs in ``steps`` equal rounds, waits for each round to finish and then
samples the server and its descendants (:mod:`openhtc.testing.procstats`), and any other
processes named in ``also`` (the ``htc agent`` processes of a cluster, with theirs). ``problems``
judges the samples: descriptors and threads must stay flat after the first round (start-up
noise allowed), and no job may fail; ``slopes`` gives each figure's growth per 1,000 jobs.
Used by ``python -m bench --workload soak`` / ``soak-agents`` and their CI tests.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

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
    stats: ProcStats  # the server's
    others: dict[str, ProcStats] = field(default_factory=dict)  # ``also``'s, by name


def soak(
    pid: int,
    submit: Callable[[int], int | None],
    finished: Callable[[], tuple[int, int]],
    n: int,
    steps: int = 10,
    *,
    timeout_per_job: float = 1.0,
    on_sample: Callable[[Sample], None] | None = None,
    also: Mapping[str, int] | None = None,
) -> list[Sample]:
    """Run ``n`` jobs in ``steps`` rounds. ``submit(k)`` submits k more jobs, and returns how
    many ``finished`` will count for them (None: k; more when it adds function calls, say);
    ``finished()`` returns (terminal, failed) counts of everything submitted so far. ``also``:
    more processes to sample beside the server (name -> pid)."""
    samples: list[Sample] = []
    per_step = max(1, n // steps)
    done = 0  # jobs submitted (of n)
    counted = 0  # what ``finished`` counts of them
    start = time.monotonic()
    while done < n:
        k = min(per_step, n - done)
        round_start = time.monotonic()
        added = submit(k)
        done += k
        counted += k if added is None else added
        deadline = round_start + 60 + k * timeout_per_job
        while True:
            terminal, failed = finished()
            if terminal >= counted:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {terminal}/{counted} jobs finished in time")
            time.sleep(0.1)
        now = time.monotonic()
        others = {name: sample(other) for name, other in (also or {}).items()}
        got = Sample(done, now - start, k / (now - round_start), failed, sample(pid), others)
        samples.append(got)
        if on_sample is not None:
            on_sample(got)
    return samples


def problems(
    samples: list[Sample], pid: int | None = None, also: Mapping[str, int] | None = None
) -> list[str]:
    """What is wrong with a soak run: growth beyond noise (of the server, and of each process
    sampled beside it), or failed jobs. ``pid`` and ``also`` only name descriptors in messages."""
    if not samples:
        return ["no samples"]
    out = _growth("server", [s.stats for s in samples], pid)
    for name in samples[0].others:
        out += _growth(name, [s.others[name] for s in samples], (also or {}).get(name))
    if samples[-1].failed:
        out.append(f"{samples[-1].failed} job(s) failed")
    return out


def _growth(who: str, stats: list[ProcStats], pid: int | None) -> list[str]:
    out: list[str] = []
    first, last = stats[0], stats[-1]
    peak = max(stats[1:] or stats, key=lambda s: s.fds)
    if peak.fds - first.fds > FD_NOISE:
        kinds = f" (now {fd_kinds(pid)})" if pid is not None else ""
        out.append(f"{who} descriptors grew {first.fds} -> {peak.fds}{kinds}")
    if max(s.threads for s in stats) - first.threads > THREAD_NOISE:
        out.append(f"{who} threads grew {first.threads} -> {max(s.threads for s in stats)}")
    if max(s.child_fds for s in stats) - first.child_fds > FD_NOISE * 2:
        out.append(f"{who}'s descendants' descriptors grew {first.child_fds} -> {last.child_fds}")
    if max(s.child_threads for s in stats) - first.child_threads > THREAD_NOISE * 2:
        out.append(f"{who}'s descendants' threads grew {first.child_threads} -> {last.child_threads}")
    return out


FIGURES = ("fds", "threads", "rss_mb", "child_fds", "child_threads", "child_rss_mb")


def slopes(samples: list[Sample]) -> dict[str, dict[str, float]]:
    """Each figure's growth per 1,000 jobs (least squares over the samples after the first,
    which holds the start-up), for the server and each process sampled beside it."""
    warm = samples[1:] if len(samples) > 2 else samples
    xs = [s.jobs for s in warm]
    who: dict[str, list[ProcStats]] = {"server": [s.stats for s in warm]}
    for name in samples[0].others if samples else ():
        who[name] = [s.others[name] for s in warm]
    return {
        name: {f: round(_slope(xs, [float(getattr(st, f)) for st in stats]) * 1000, 2) for f in FIGURES}
        for name, stats in who.items()
    }


def _slope(xs: list[int], ys: list[float]) -> float:
    return statistics.linear_regression(xs, ys).slope if len(set(xs)) > 1 else 0.0


def table(samples: list[Sample], who: str = "server") -> str:
    """The samples of the server (or of a process sampled beside it) as a markdown table."""
    rows = [
        "| jobs | s | jobs/s | failed | fds | threads | RSS MB | child fds | child threads | child RSS MB |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in samples:
        st = s.stats if who == "server" else s.others[who]
        rows.append(
            f"| {s.jobs:,} | {s.seconds:.0f} | {s.jobs_per_s:.0f} | {s.failed} | {st.fds} | {st.threads} "
            f"| {st.rss_mb:.0f} | {st.child_fds} | {st.child_threads} | {st.child_rss_mb:.0f} |"
        )
    return "\n".join(rows)
