"""Writes job state changes: compare-and-set row updates, events and counters in one go.

The store decides nothing here: a :class:`Batch` loads rows under lock, asks the pure lifecycle
(``domain/lifecycle.py``) what each input does, and writes the records and events it returns.
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

from openhtc.domain import lifecycle
from openhtc.domain.errors import OpenHTCError
from openhtc.domain.lifecycle import JobRecord
from openhtc.domain.models import AttemptReport
from openhtc.store.db import BulkStatement, Database, json_rows

_STATE_SELECT = (
    # the first 13 columns are a JobRecord, in its field order
    "SELECT j.id, j.status, j.attempt, j.failed_attempts, b.max_retries, j.executor_id, j.lease_expires_at,"
    " j.started_at, j.completed_at, j.exit_code, j.failure_code, j.status_reason, j.cancelled, j.task_id,"
    " j.group_name, j.project_id, j.vcpus, j.memory_mb, j.batch_id, j.idx, j.region"
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
    """A job row loaded under lock: its lifecycle record, which only the lifecycle changes
    (``domain/lifecycle.py``), and the fields that say where it counts and how it runs."""

    rec: JobRecord
    id: int  # rec.id, read often (claim order, report grouping)
    task_id: str
    group_name: str
    project_id: str
    vcpus: int
    memory_mb: int
    batch_id: int
    idx: int
    region: str
    loaded_status: int
    loaded_attempt: int
    dirty: bool = False

    @property
    def status(self) -> int:
        return self.rec.status

    @property
    def attempt(self) -> int:
        return self.rec.attempt

    @property
    def executor_id(self) -> str | None:
        return self.rec.executor_id


def _state(row: Sequence[Any]) -> JobState:
    """A JobState from a row of ``_STATE_SELECT`` (built with tuple.__new__: one per job loaded)."""
    rec = _new(JobRecord, row[:13])  # cancelled is 0/1 on SQLite: the lifecycle only tests its truth
    return JobState(rec, rec[0], *row[13:], rec[1], rec[2])  # type: ignore[call-arg]


_new = tuple.__new__


class Batch:
    """Applies lifecycle steps to many jobs and writes them with three statements."""

    def __init__(self, db: Database, conn: Connection, now: float, executor_id: str | None = None) -> None:
        self.db = db
        self.conn = conn
        self.now = now
        self.executor_id = executor_id
        self.states: list[JobState] = []
        self.requeued = 0  # jobs sent back to SUBMITTED_TO_RESCALE: the scheduler must admit them
        self._events: list[tuple[Any, ...]] = []

    # -- loading --------------------------------------------------------------------------------

    def load(self, where: str, params: Sequence[Any]) -> list[JobState]:
        """Load and (on PostgreSQL) lock the jobs matching ``where`` (columns of ``j``)."""
        cur = self.db.cursor(self.conn)
        cur.execute(self.db.sql(_STATE_SELECT + where + " ORDER BY j.id" + self.db.for_update), tuple(params))
        states = [_state(row) for row in cur.fetchall()]
        self.states.extend(states)
        return states

    def load_ids(self, ids: Sequence[int]) -> list[JobState]:
        if not ids:
            return []
        return self.load(self.db.in_ids("j.id"), (self.db.ids_param(ids),))

    # -- changes: each asks the lifecycle, then records what it returned ------------------------

    def apply(self, job: JobState, step: lifecycle.Step) -> bool:
        """Record one lifecycle step of a loaded job; returns whether it changed the job."""
        record, events, requeued = step
        if not events:
            return False
        job.rec = record
        job.dirty = True
        if requeued:
            self.requeued += 1
        job_id, executor, append = record.id, self.executor_id, self._events.append
        for attempt, status, at, reason, exit_code, event_executor, cancelled in events:
            append((job_id, attempt, status, at, reason, exit_code, executor or event_executor, cancelled))
        return True

    def admit(self, job: JobState) -> bool:
        return self.apply(job, lifecycle.admit(job.rec, self.now))

    def claim(self, job: JobState, executor_id: str, lease_expires_at: float) -> bool:
        return self.apply(job, lifecycle.claim(job.rec, executor_id, lease_expires_at, self.now))

    def report(self, job: JobState, report: AttemptReport) -> bool:
        """Fold one executor report into the job; stale or repeated ones change nothing (fencing)."""
        step = lifecycle.report(job.rec, report, self.executor_id)
        if not step[1]:  # the common no-op (a fenced report) and the common one-event step, inline
            return False
        if step[2] or len(step[1]) > 1:
            return self.apply(job, step)
        job.rec = record = step[0]
        job.dirty = True
        attempt, status, at, reason, exit_code, event_executor, cancelled = step[1][0]
        executor = self.executor_id or event_executor
        self._events.append((record.id, attempt, status, at, reason, exit_code, executor, cancelled))
        return True

    def cancel(self, job: JobState) -> bool:
        return self.apply(job, lifecycle.cancel(job.rec, self.now))

    def lose_executor(self, job: JobState, cause: str, may_have_started: bool | None) -> bool:
        """The executor holding this job is gone: the crash rule decides (domain/lifecycle.py)."""
        return self.apply(job, lifecycle.lose_executor(job.rec, self.now, cause, may_have_started))

    # -- writing --------------------------------------------------------------------------------

    def flush(self) -> int:
        """Write every changed job, its events and the counter deltas. Returns how many jobs changed."""
        changed = [s for s in self.states if s.dirty]
        if not changed and not self._events:
            return 0
        cur = self.db.cursor(self.conn)
        now = self.now
        rows = []
        moves: dict[tuple[str, str, str, int, int], list[int]] = defaultdict(lambda: [0, 0])
        for s in changed:
            (id_, status, attempt, failed, _, executor, lease, started, completed, exit_code, code, reason,
             cancelled) = s.rec  # fmt: skip
            rows.append((
                status, attempt, failed, executor, lease, now, started, completed, exit_code, code, reason,
                cancelled, id_, s.loaded_status, s.loaded_attempt,
            ))  # fmt: skip
            if status != s.loaded_status:
                move = moves[(s.task_id, s.group_name, s.project_id, s.loaded_status, status)]
                move[0] += 1
                move[1] += s.vcpus
        updated = self.db.run_bulk(cur, _UPDATE, rows)
        if updated not in (-1, len(rows)):
            raise StoreConsistencyError(f"{len(rows) - updated} job rows changed under us")
        self.db.run_bulk(cur, _INSERT_EVENT, self._events)
        deltas: dict[tuple[str, str, int, str], list[int]] = defaultdict(lambda: [0, 0])
        for (task, group, project, before, after), (jobs, vcpus) in moves.items():
            for status, count, vcpu_delta in lifecycle.counter_deltas(before, after, jobs, vcpus):
                delta = deltas[(task, group, status, project)]
                delta[0] += count
                delta[1] += vcpu_delta
        bump_counters(self.db, self.conn, deltas)
        n = len(changed)
        for s in changed:
            s.loaded_status, s.loaded_attempt, s.dirty = s.rec.status, s.rec.attempt, False
        self._events = []
        return n


def bump_counters(db: Database, conn: Connection, deltas: dict[tuple[str, str, int, str], list[int]]) -> None:
    """Add (count, vCPU) deltas keyed by (task, group, status, project).

    The rows are upserted in key order, so transactions that run at once (an executor's report
    and claim, the scheduler's admission) lock the counter rows they share in the same order.
    """
    rows = [(t, g, s, p, d[0], d[1]) for (t, g, s, p), d in sorted(deltas.items()) if d[0] or d[1]]
    db.run_bulk(db.cursor(conn), _BUMP_COUNTERS, rows)
