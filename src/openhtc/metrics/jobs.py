"""What the executor protocol tells about jobs, turned into counts and durations.

Counted at the service layer, after the store has committed a claim, a report or a cancel. The
store answers a report with how many jobs it sent back for retry, not with which reports it
applied, so :class:`JobMetrics` remembers the attempts it saw claimed: a report for an attempt
the heartbeat told its executor to stop (cancelled, or leased elsewhere) is not counted again.
A report for an attempt claimed before this process started is counted as it comes.

Everything is aggregated per call under one lock: a claim or report of hundreds of jobs costs a
dict operation per job and one update per label set, never a lock per job.
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from prometheus_client.utils import floatToGoString

from openhtc.domain.enums import JobStatus
from openhtc.domain.models import AttemptReport

CANCELLED = "Cancelled"  # the failure_code label of a user's cancel (Rescale has no failureCode for it)
UNKNOWN = "ErrorUnknownFailure"  # as the store records a FAILED report without a code
MAX_HELD = 200_000  # attempts remembered; past it the oldest are forgotten (lost executors' jobs)


# A held attempt: (attempt, project id, task id, group, vCPUs). Plain tuples and ints here: this
# runs for every job, and an object per job or an enum's name per report would cost more than the
# rest together.
_Held = tuple[int, str, str, str, int]
_RUNNING, _SUCCEEDED, _FAILED = int(JobStatus.RUNNING), int(JobStatus.SUCCEEDED), int(JobStatus.FAILED)
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
        self._held: dict[int, _Held] = {}  # job id ->
        self._started: dict[int, float] = {}  # job id -> its held attempt's RUNNING report time
        self._fenced: set[int] = set()  # job ids whose held attempt was stopped: reports are stale
        self.transitions: dict[tuple[int, str], int] = defaultdict(int)  # (status, failure code)
        self.vcpu_seconds: dict[str, float] = defaultdict(float)  # project id ->
        self.queue_wait = Buckets(DURATION_BOUNDS)
        self.run_time = Buckets(DURATION_BOUNDS)
        self.claim_calls = 0
        self.claimed_jobs = 0
        self.reports = 0
        self.lease_expiries = 0

    # -- recording ------------------------------------------------------------------------------

    def claimed(self, jobs: Sequence[_ClaimedJob], submitted_at: dict[int, float], now: float) -> None:
        """An executor claimed ``jobs`` (now RUNNABLE); ``submitted_at``: batch id -> its submit time."""
        with self._lock:
            self.claim_calls += 1
            if not jobs:
                return
            self.claimed_jobs += len(jobs)
            self.transitions[(int(JobStatus.RUNNABLE), "")] += len(jobs)
            held, observe = self._held, self.queue_wait.observe
            fenced, started = self._fenced, self._started
            for job in jobs:
                held[job.id] = (job.attempt, job.project_id, job.task_id, job.group_name, job.vcpus)
                if fenced or started:  # a new attempt starts clean (its predecessor may have been lost)
                    fenced.discard(job.id)
                    started.pop(job.id, None)
                if job.attempt == 1 and (at := submitted_at.get(job.batch_id)) is not None:
                    observe(max(0.0, now - at))  # a retry's wait is not counted: it waited before
            if len(held) > MAX_HELD:
                for key in list(held)[: len(held) - MAX_HELD // 2]:  # oldest first (insertion order)
                    del held[key]
                    self._started.pop(key, None)
                    self._fenced.discard(key)

    def reported(self, reports: Sequence[AttemptReport], requeued: int) -> None:
        """An executor's reports were applied; ``requeued`` of them sent a job back for a retry."""
        with self._lock:
            self.reports += len(reports)
            if requeued:
                self.transitions[(int(JobStatus.SUBMITTED_TO_RESCALE), "")] += requeued
            by_status = [0] * len(_NAMES)  # index: status; FAILED is counted by failure code
            failed: dict[str, int] = defaultdict(int)
            held, started, fenced = self._held, self._started, self._fenced
            for report in reports:
                job_id, status = report.job_id, report.status
                entry = held.get(job_id)
                if entry is not None:
                    if entry[0] != report.attempt:
                        continue  # an attempt the job has moved past: the store ignored it too
                    if status == _RUNNING:
                        started[job_id] = report.at
                    elif status >= _SUCCEEDED:
                        del held[job_id]
                        began = started.pop(job_id, None)
                        if began is not None:  # its vCPUs were busy until now, killed or not
                            ran = max(0.0, report.at - began)
                            self.run_time.observe(ran)
                            self.vcpu_seconds[entry[1]] += ran * entry[4]
                        if fenced and job_id in fenced:
                            fenced.discard(job_id)
                            continue
                    if fenced and job_id in fenced:
                        continue  # stopped: the store ignored it
                if status == _FAILED:
                    failed[report.failure_code or UNKNOWN] += 1
                else:
                    by_status[status] += 1
            transitions = self.transitions
            for code, n in enumerate(by_status):
                if n:
                    transitions[(code, "")] += n
            for failure, n in failed.items():
                transitions[(_FAILED, failure)] += n

    def stopped(self, attempts: Iterable[tuple[int, int]]) -> None:
        """A heartbeat told an executor to stop these (job, attempt)s: their reports are stale."""
        with self._lock:
            for job_id, attempt in attempts:
                entry = self._held.get(job_id)
                if entry is not None and entry[0] == attempt:
                    self._fenced.add(job_id)

    def cancelled(self, task_id: str, group: str | None, count: int) -> None:
        """A user cancelled ``count`` jobs of a task (or one of its groups): they are FAILED."""
        if not count:
            return
        with self._lock:
            self.transitions[(_FAILED, CANCELLED)] += count
            for job_id, (_, _, task, job_group, _) in self._held.items():
                if task == task_id and (group is None or job_group == group):
                    self._fenced.add(job_id)

    def leases_expired(self, count: int) -> None:
        with self._lock:
            self.lease_expiries += count

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
    def batch_id(self) -> int: ...
    @property
    def project_id(self) -> str: ...
    @property
    def task_id(self) -> str: ...
    @property
    def group_name(self) -> str: ...
    @property
    def vcpus(self) -> int: ...
