"""Applies job state changes: compare-and-set row updates, events and counters in one go.

Every status write in openhtc goes through a :class:`Batch` inside the caller's transaction, so
the per (task, group, status) counters never drift from the job rows. This is the hottest code
in the server, so it speaks plain DB-API with tuples instead of compiled SQL: ``executemany`` on
SQLite, one statement for all rows on PostgreSQL (see :class:`BulkStatement`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection

from openhtc.domain import recovery
from openhtc.domain.enums import FailureCode, JobStatus
from openhtc.domain.errors import OpenHTCError
from openhtc.domain.models import AttemptReport
from openhtc.domain.states import TRANSITIONS, check_transition
from openhtc.store.db import BulkStatement, Database, json_rows

S = JobStatus
_FIRST_TERMINAL = int(S.SUCCEEDED)

_STATE_SELECT = (
    "SELECT j.id, j.status, j.attempt, j.failed_attempts, j.executor_id, j.lease_expires_at, j.started_at,"
    " j.completed_at, j.exit_code, j.failure_code, j.status_reason, j.cancelled, j.task_id, j.group_name,"
    " j.project_id, j.vcpus, j.memory_mb, j.batch_id, j.idx, j.region, b.max_retries, j.created_at"
    " FROM jobs j JOIN batches b ON b.id = j.batch_id WHERE "
)
_JOB_COLUMNS = (
    ("status", "smallint"),
    ("attempt", "int"),
    ("failed_attempts", "int"),
    ("executor_id", "text"),
    ("lease_expires_at", "float8"),
    ("updated_at", "float8"),
    ("started_at", "float8"),
    ("completed_at", "float8"),
    ("exit_code", "int"),
    ("failure_code", "text"),
    ("status_reason", "text"),
    ("cancelled", "bool"),
)
# compare-and-set: the row must still be in the status and attempt it was loaded in
_KEY_COLUMNS = (("id", "bigint"), ("loaded_status", "smallint"), ("loaded_attempt", "int"))
_UPDATE = BulkStatement(
    sqlite="UPDATE jobs SET "
    + ", ".join(f"{name}=?" for name, _ in _JOB_COLUMNS)
    + " WHERE id=? AND status=? AND attempt=?",
    postgres="UPDATE jobs AS j SET "
    + ", ".join(f"{name}=v.{name}" for name, _ in _JOB_COLUMNS)
    + f" FROM {json_rows(_JOB_COLUMNS + _KEY_COLUMNS)}"
    + " WHERE j.id = v.id AND j.status = v.loaded_status AND j.attempt = v.loaded_attempt",
)
_EVENT_COLUMNS = (
    ("job_id", "bigint"),
    ("attempt", "int"),
    ("status", "smallint"),
    ("at", "float8"),
    ("reason", "text"),
    ("exit_code", "int"),
    ("executor_id", "text"),
    ("cancelled", "bool"),
)
# ids follow the row order, and the order of one job's events is its history
_INSERT_EVENT = BulkStatement.insert("job_events", _EVENT_COLUMNS)
_COUNTER_COLUMNS = (
    ("task_id", "text"),
    ("group_name", "text"),
    ("status", "smallint"),
    ("project_id", "text"),
    ("count", "bigint"),
    ("vcpus", "bigint"),
)
# rows lock in the order bump_counters gives them
_BUMP_COUNTERS = BulkStatement.insert(
    "job_counters",
    _COUNTER_COLUMNS,
    " ON CONFLICT (task_id, group_name, status)"
    " DO UPDATE SET count = job_counters.count + excluded.count, vcpus = job_counters.vcpus + excluded.vcpus",
)


class StoreConsistencyError(OpenHTCError):
    """A compare-and-set write found a row in an unexpected state."""


@dataclass(slots=True)
class JobState:
    """The mutable part of a job row, loaded under lock, changed in memory, written back."""

    id: int
    status: int
    attempt: int
    failed_attempts: int
    executor_id: str | None
    lease_expires_at: float | None
    started_at: float | None
    completed_at: float | None
    exit_code: int | None
    failure_code: str | None
    status_reason: str | None
    cancelled: bool
    task_id: str
    group_name: str
    project_id: str
    vcpus: int
    memory_mb: int
    batch_id: int
    idx: int
    region: str
    max_retries: int
    created_at: float
    loaded_status: int = 0
    loaded_attempt: int = 0
    dirty: bool = False


class Batch:
    """Collects state changes for many jobs and writes them with three statements."""

    def __init__(self, db: Database, conn: Connection, now: float, executor_id: str | None = None) -> None:
        self.db = db
        self.conn = conn
        self.now = now
        self.executor_id = executor_id
        self.states: list[JobState] = []
        self.requeued = 0  # jobs sent back to SUBMITTED_TO_RESCALE: the scheduler must admit them
        self._events: list[tuple[Any, ...]] = []
        # For the dashboard's throughput (domain/throughput.py), by project: jobs that ended
        # (succeeded, failed; cancelled ones not counted) and queue waits of attempts that started.
        self.ended: dict[str, list[int]] = {}
        self.waits: dict[str, list[float]] = {}

    # -- loading --------------------------------------------------------------------------------

    def load(self, where: str, params: Sequence[Any]) -> list[JobState]:
        """Load and (on PostgreSQL) lock the jobs matching ``where`` (columns of ``j``)."""
        cur = self.db.cursor(self.conn)
        cur.execute(self.db.sql(_STATE_SELECT + where + " ORDER BY j.id" + self.db.for_update), tuple(params))
        states = [JobState(*row) for row in cur.fetchall()]
        for state in states:
            state.cancelled = bool(state.cancelled)
            state.loaded_status, state.loaded_attempt = state.status, state.attempt
        self.states.extend(states)
        return states

    def load_ids(self, ids: Sequence[int]) -> list[JobState]:
        if not ids:
            return []
        return self.load(self.db.in_ids("j.id"), (self.db.ids_param(ids),))

    # -- changes --------------------------------------------------------------------------------

    def move(
        self,
        job: JobState,
        status: JobStatus,
        at: float,
        reason: str | None = None,
        exit_code: int | None = None,
        cancelled: bool = False,
    ) -> None:
        """One step of the lifecycle, checked against the transition table and recorded as an event."""
        if status not in TRANSITIONS[job.status]:  # type: ignore[index]
            check_transition(job.id, S(job.status), status)  # raises with a readable message
        job.status = int(status)
        self._event(job, status, at, reason, exit_code, cancelled)

    def _event(
        self,
        job: JobState,
        status: JobStatus,
        at: float,
        reason: str | None,
        exit_code: int | None,
        cancelled: bool,
    ) -> None:
        job.dirty = True
        self._events.append(
            (
                job.id,
                job.attempt,
                int(status),
                at,
                reason,
                exit_code,
                self.executor_id or job.executor_id,
                cancelled,
            )
        )

    def requeue(self, job: JobState, at: float, reason: str, counted: bool) -> None:
        """Send the job back to SUBMITTED_TO_RESCALE as a new attempt."""
        if counted:
            job.failed_attempts += 1
        self.requeued += 1
        job.attempt += 1
        job.executor_id = None
        job.lease_expires_at = None
        job.started_at = None
        job.status_reason = reason
        self.move(job, S.SUBMITTED_TO_RESCALE, at, reason)

    def fail_attempt(
        self, job: JobState, at: float, failure_code: str, reason: str, exit_code: int | None = None
    ) -> None:
        """End the current attempt as failed; retry it if the retry strategy allows.

        A retried job records the attempt's FAILED event but moves straight on to
        SUBMITTED_TO_RESCALE, so its status never shows FAILED while it still has attempts left.
        """
        check_transition(job.id, S(job.status), S.FAILED)
        self._event(job, S.FAILED, at, reason, exit_code, False)
        job.exit_code = exit_code
        job.failure_code = failure_code
        job.status_reason = reason
        job.lease_expires_at = None
        if job.failed_attempts < job.max_retries:
            self.requeue(
                job, at, f"Retrying after attempt {job.attempt} failed ({failure_code})", counted=True
            )
        else:
            job.failed_attempts += 1
            job.status = int(S.FAILED)
            job.completed_at = at

    def apply_report(self, job: JobState, report: AttemptReport) -> None:
        """Fold one executor report into the job, ignoring stale or repeated ones (fencing)."""
        if report.attempt != job.attempt or job.status >= _FIRST_TERMINAL or job.status == report.status:
            return
        status = report.status
        if status == S.FAILED:
            self.fail_attempt(
                job,
                report.at,
                report.failure_code or FailureCode.ErrorUnknownFailure.value,
                report.reason or "",
                report.exit_code,
            )
            return
        self.move(job, status, report.at, report.reason, report.exit_code)
        if status == S.RUNNING:
            job.started_at = report.at
            self.waits.setdefault(job.project_id, []).append(report.at - job.created_at)
        elif status == S.SUCCEEDED:
            job.exit_code = report.exit_code
            job.failure_code = None
            job.status_reason = report.reason
            job.completed_at = report.at
            job.lease_expires_at = None

    def recover(self, job: JobState, cause: str, may_have_started: bool | None) -> None:
        """The executor holding this job is gone: apply the recovery rule (domain/recovery.py)."""
        outcome = recovery.recover(job.status, may_have_started)
        why = recovery.reason(cause, outcome)
        if outcome is recovery.Recovery.REQUEUE:
            self.requeue(job, self.now, why, counted=False)
        else:
            self.fail_attempt(job, self.now, FailureCode.ErrorInfrastructureFault.value, why)

    # -- writing --------------------------------------------------------------------------------

    def flush(self) -> int:
        """Write every changed job, its events and the counter deltas. Returns how many jobs changed."""
        changed = [s for s in self.states if s.dirty]
        if not changed and not self._events:
            return 0
        cur = self.db.cursor(self.conn)
        rows = [
            (
                s.status,
                s.attempt,
                s.failed_attempts,
                s.executor_id,
                s.lease_expires_at,
                self.now,
                s.started_at,
                s.completed_at,
                s.exit_code,
                s.failure_code,
                s.status_reason,
                s.cancelled,
                s.id,
                s.loaded_status,
                s.loaded_attempt,
            )
            for s in changed
        ]
        updated = self.db.run_bulk(cur, _UPDATE, rows)
        if updated not in (-1, len(rows)):
            raise StoreConsistencyError(f"{len(rows) - updated} job rows changed under us")
        self.db.run_bulk(cur, _INSERT_EVENT, self._events)
        deltas: dict[tuple[str, str, int, str], list[int]] = defaultdict(lambda: [0, 0])
        for s in changed:
            if s.status != s.loaded_status:
                old = deltas[(s.task_id, s.group_name, s.loaded_status, s.project_id)]
                new = deltas[(s.task_id, s.group_name, s.status, s.project_id)]
                old[0] -= 1
                old[1] -= s.vcpus
                new[0] += 1
                new[1] += s.vcpus
                if s.status >= _FIRST_TERMINAL and not s.cancelled:
                    ended = self.ended.setdefault(s.project_id, [0, 0])
                    ended[s.status != S.SUCCEEDED] += 1
        bump_counters(self.db, self.conn, deltas)
        n = len(changed)
        for s in changed:
            s.loaded_status, s.loaded_attempt, s.dirty = s.status, s.attempt, False
        self._events = []
        return n


def bump_counters(db: Database, conn: Connection, deltas: dict[tuple[str, str, int, str], list[int]]) -> None:
    """Add (count, vCPU) deltas keyed by (task, group, status, project).

    The rows are upserted in key order, so transactions that run at once (an executor's report
    and claim, the scheduler's admission) lock the counter rows they share in the same order.
    """
    rows = [(t, g, s, p, d[0], d[1]) for (t, g, s, p), d in sorted(deltas.items()) if d[0] or d[1]]
    db.run_bulk(db.cursor(conn), _BUMP_COUNTERS, rows)
