"""What the store applied to jobs, turned into counts and durations.

Counted at the service layer from what a committed claim, report, cancel or recovery returns
(``store.transitions.Applied``): the jobs it changed and the statuses each passed through. A
stale or repeated report changes nothing in the store, so it is in none of these and is never
counted; a cancel and a job ending at the same moment are one change or the other, never both.
Nothing here remembers jobs between calls.

Everything is aggregated per call under one lock: a claim or report of hundreds of jobs costs a
few operations per job and one update per label set, never a lock per job.
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from prometheus_client.utils import floatToGoString

from openhtc.domain.enums import JobStatus
from openhtc.store.transitions import Applied

CANCELLED = "Cancelled"  # the failure_code label of a user's cancel (Rescale has no failureCode for it)
UNKNOWN = "ErrorUnknownFailure"  # as the store records a FAILED report without a code

# plain ints: this runs for every job, and an enum's name per job would cost more than the rest
_RUNNABLE, _SUCCEEDED, _FAILED = int(JobStatus.RUNNABLE), int(JobStatus.SUCCEEDED), int(JobStatus.FAILED)
_REQUEUED = int(JobStatus.SUBMITTED_TO_RESCALE)
_NAMES = {int(s): s.name for s in JobStatus}


@dataclass
class Buckets:
    """A histogram without labels: cumulative counts per upper bound, a sum and a count."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)  # the last: above every bound (+Inf)

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    def cumulative(self) -> list[tuple[str, float]]:
        out, running = [], 0
        for bound, count in zip((*map(floatToGoString, self.bounds), "+Inf"), self.counts, strict=True):
            running += count
            out.append((bound, float(running)))
        return out


# seconds: from sub-second `true` jobs to day-long runs, and queue waits of limited projects
DURATION_BOUNDS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600, 86400)


class JobMetrics:
    """Job counts and durations of one server process (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.transitions: dict[tuple[int, str], int] = defaultdict(int)  # (status, failure code)
        self.vcpu_seconds: dict[str, float] = defaultdict(float)  # project id ->
        self.queue_wait = Buckets(DURATION_BOUNDS)
        self.run_time = Buckets(DURATION_BOUNDS)
        self.claim_calls = 0
        self.claimed_jobs = 0
        self.reports = 0
        self.lease_expiries = 0

    # -- recording ------------------------------------------------------------------------------

    def claimed(self, jobs: Sequence[_ClaimedJob], now: float) -> None:
        """An executor claimed ``jobs`` (the store made them RUNNABLE, every one, at ``now``)."""
        with self._lock:
            self.claim_calls += 1
            if not jobs:
                return
            self.claimed_jobs += len(jobs)
            self.transitions[(_RUNNABLE, "")] += len(jobs)
            observe = self.queue_wait.observe
            for job in jobs:
                if job.attempt == 1:  # a retry's wait is not counted: it waited before
                    observe(max(0.0, now - job.created_at))

    def reported(self, count: int, applied: Applied) -> None:
        """An executor sent ``count`` reports; the store applied ``applied`` of them."""
        with self._lock:
            self.reports += count
            self._count(applied)

    def applied(self, applied: Applied) -> None:
        """A cancel or a recovery committed ``applied``."""
        with self._lock:
            self._count(applied)

    def leases_expired(self, applied: Applied) -> None:
        with self._lock:
            self.lease_expiries += len(applied.changes)
            self._count(applied)

    def _count(self, applied: Applied) -> None:
        """Count every status the changed jobs passed through, and each attempt that ended here
        after it ran: its run time, and its vCPUs busy as long (ended, killed or lost alike)."""
        at, changes, events, _ = applied
        if not changes:
            return
        by_status = [0] * (max(_NAMES) + 1)  # index: status; FAILED is counted by failure code
        failed: dict[str, int] = defaultdict(int)
        codes: dict[int, str | None] | None = None
        for event in events:
            status = event[2]
            if status != _FAILED:
                by_status[status] += 1
            elif event[7]:
                failed[CANCELLED] += 1
            else:
                if codes is None:  # built only when an attempt failed
                    codes = {c[0]: c[7] for c in changes}
                failed[codes.get(event[0]) or UNKNOWN] += 1
        transitions = self.transitions
        for status, n in enumerate(by_status):
            if n:
                transitions[(status, "")] += n
        for code, n in failed.items():
            transitions[(_FAILED, code)] += n
        observe, vcpu_seconds = self.run_time.observe, self.vcpu_seconds
        for _, _, project, vcpus, _, status, _, _, _, _, began, completed in changes:
            if began is None:
                continue  # never ran (or still runs: below)
            if status >= _SUCCEEDED:
                ended = completed if completed is not None else at
            elif status == _REQUEUED:  # the attempt ended, another follows
                ended = at
            else:
                continue
            ran = max(0.0, ended - began)
            observe(ran)
            vcpu_seconds[project] += ran * vcpus

    # -- reading --------------------------------------------------------------------------------

    def snapshot(self) -> JobSnapshot:
        with self._lock:
            return JobSnapshot(
                transitions={(_NAMES[s], code): n for (s, code), n in self.transitions.items()},
                vcpu_seconds=dict(self.vcpu_seconds),
                queue_wait=(self.queue_wait.cumulative(), self.queue_wait.total),
                run_time=(self.run_time.cumulative(), self.run_time.total),
                claim_calls=self.claim_calls,
                claimed_jobs=self.claimed_jobs,
                reports=self.reports,
                lease_expiries=self.lease_expiries,
            )


@dataclass(frozen=True)
class JobSnapshot:
    transitions: dict[tuple[str, str], int]
    vcpu_seconds: dict[str, float]
    queue_wait: tuple[list[tuple[str, float]], float]
    run_time: tuple[list[tuple[str, float]], float]
    claim_calls: int
    claimed_jobs: int
    reports: int
    lease_expiries: int


class _ClaimedJob(Protocol):
    """What a claim returns per job (the store's JobState), as far as metrics read it (read-only)."""

    @property
    def id(self) -> int: ...
    @property
    def attempt(self) -> int: ...
    @property
    def created_at(self) -> float: ...
