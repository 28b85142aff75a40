"""Writes job state changes: compare-and-set row updates, events and counters in one go.

The store decides nothing here: a :class:`StatusWrites` loads rows under lock, asks the pure
lifecycle (``domain/lifecycle.py``) what each input does, and writes the records and events it
returns. Every status write in openhtc goes through one inside the caller's transaction, so
the per (task, group, status) counters never drift from the job rows. This is the hottest code
in the server, so it speaks plain DB-API with tuples instead of compiled SQL: ``executemany`` on
SQLite, one statement for all rows on PostgreSQL (see :class:`BulkStatement`).
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Sequence
from typing import Any, NamedTuple

import orjson
from sqlalchemy import Connection

from openhtc.domain import lifecycle, throughput
from openhtc.domain.enums import JobStatus
from openhtc.domain.errors import OpenHTCError
from openhtc.domain.lifecycle import EventRow, JobRecord
from openhtc.domain.models import AttemptReport
from openhtc.store.db import BulkStatement, Database, json_rows

_STATE_SELECT = (
    # the first 14 columns are a JobRecord, in its field order
    "SELECT j.id, j.status, j.attempt, j.failed_attempts, j.infra_retries, b.max_retries, j.executor_id,"
    " j.lease_expires_at, j.started_at, j.completed_at, j.exit_code, j.failure_code, j.status_reason,"
    " j.cancelled, j.task_id, j.group_name, j.project_id, j.vcpus, j.memory_mb, j.batch_id, j.idx, j.region,"
    " j.created_at"
    " FROM jobs j JOIN batches b ON b.id = j.batch_id WHERE "
)
_RECORD = len(JobRecord._fields)
_JOB_COLUMNS = (
    ("status", "smallint"),
    ("attempt", "int"),
    ("failed_attempts", "int"),
    ("infra_retries", "int"),
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
# On PostgreSQL the rows' ids also go in as an array the primary key is probed with: joined on
# the id alone, the planner (which guesses 100 rows for any JSON array, and plans a reused
# prepared statement once) read every row of jobs into a hash table on each call: 1-4 ms of a
# ~5 ms UPDATE of 60 rows at 5,000 jobs, and more as the table grows (bench/pgstats.py).
_UPDATE_ROWS = f"v AS MATERIALIZED (SELECT * FROM {json_rows(_JOB_COLUMNS + _KEY_COLUMNS)})"
_UPDATE_FROM_V = (
    "UPDATE jobs AS j SET "
    + ", ".join(f"{name}=v.{name}" for name, _ in _JOB_COLUMNS)
    + " FROM v WHERE j.id = ANY(ARRAY(SELECT v.id FROM v))"
    + " AND j.id = v.id AND j.status = v.loaded_status AND j.attempt = v.loaded_attempt"
)
_UPDATE = BulkStatement(
    sqlite="UPDATE jobs SET "
    + ", ".join(f"{name}=?" for name, _ in _JOB_COLUMNS)
    + " WHERE id=? AND status=? AND attempt=?",
    postgres=f"WITH {_UPDATE_ROWS} {_UPDATE_FROM_V}",
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

# The dashboard's last hour (domain/throughput.py): what the flush tallied, added to the minute's
# rows. Several servers' flushes add to the same rows: they lock them last, in key order.
_BUMP_THROUGHPUT = BulkStatement.insert(
    "throughput_minutes",
    (("minute", "bigint"), ("project_id", "text"), ("bucket", "smallint"), ("count", "bigint")),
    " ON CONFLICT (minute, project_id, bucket)"
    " DO UPDATE SET count = throughput_minutes.count + excluded.count",
)

# PostgreSQL: a flush's four writes (rows, events, counters, the last hour) in one statement, one
# round trip instead of four; it answers how many rows the compare-and-set updated. The CTEs the
# main query does not read run after it, in their order: job rows, events, the counters in key
# order (the lock order bump_counters keeps), then the last hour's rows in key order.
_FLUSH_PG_CTES = (
    f"WITH {_UPDATE_ROWS}, u AS ({_UPDATE_FROM_V} RETURNING 1),"
    f" e AS ({_INSERT_EVENT.postgres}), c AS ({_BUMP_COUNTERS.postgres}),"
    f" t AS ({_BUMP_THROUGHPUT.postgres})"
)
_FLUSH_PG = f"{_FLUSH_PG_CTES} SELECT count(*) FROM u"
# The same, for a flush that ends its transaction (``flush(commit=True)``): the COMMIT goes in
# the same round trip (pipelined), so the counter rows every claim and report of a project
# updates are locked only while PostgreSQL runs the statement, not until this thread gets the
# GIL back to send a COMMIT (under load a queue of transactions formed behind those locks: the
# report calls' round trip was seconds). The compare-and-set check is in the statement: a row
# that changed under us fails it (22P02, "... job rows changed under us"), so the COMMIT after
# it finds the transaction aborted and writes nothing.
_FLUSH_PG_CHECKED = (
    f"{_FLUSH_PG_CTES} SELECT CASE WHEN count(*) = %s THEN count(*)"
    " ELSE ((%s - count(*))::text || ' job rows changed under us')::int END FROM u"
)


class StoreConsistencyError(OpenHTCError):
    """A compare-and-set write found a row in an unexpected state."""


class JobState(NamedTuple):
    """A job row as loaded under lock (the columns of ``_STATE_SELECT``). Its first fields are
    the job's lifecycle record as loaded (:meth:`StatusWrites.record` gives the current one);
    the rest say where it counts and how it runs. Immutable: the writes compare the row's
    status and attempt with these."""

    id: int
    status: int
    attempt: int
    failed_attempts: int
    infra_retries: int
    max_retries: int
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
    created_at: float


# What a flush changed, one plain tuple per job (see StatusWrites' GC note), in this order: job id,
# task id, project id, vCPUs, status loaded, status now, attempt now, failure code, cancelled, created
# at, the start of the attempt it ran last (None if it never ran), completed at.
Change = tuple[int, str, str, int, int, int, int, str | None, bool, float, float | None, float | None]


class Applied(NamedTuple):
    """What one committed unit of work did: its time, the jobs it changed (:data:`Change`), their
    events (``lifecycle.EventRow``: every status each passed through) and how many it re-queued.
    Stale or repeated reports are in none of them."""

    at: float
    changes: list[Change]
    events: list[EventRow]
    requeued: int


_new = tuple.__new__
_SUCCEEDED = int(JobStatus.SUCCEEDED)
_TERMINAL = frozenset(int(s) for s in JobStatus if s.terminal)
_ENDED_BUCKET, _FAILED_BUCKET = throughput.SUCCEEDED, throughput.FAILED


class StatusWrites:
    """A unit of work for job status changes: applies lifecycle steps to many jobs loaded under
    lock, then writes them all at once: rows, events, counters and the dashboard's last hour."""

    def __init__(
        self,
        db: Database,
        conn: Connection,
        now: float,
        executor_id: str | None = None,
        max_infra_retries: int = 0,
    ) -> None:
        self.db = db
        self.conn = conn
        self.now = now
        self.executor_id = executor_id
        self.max_infra_retries = max_infra_retries  # re-runs after infrastructure faults (settings)
        self.requeued = 0  # jobs sent back to SUBMITTED_TO_RESCALE: the scheduler must admit them
        self.flushed = False
        self.changes: list[Change] = []  # filled by flush (see applied)
        # Every row loaded; the record now of each job a step changed (by id); the events. The
        # last two are kept as plain tuples: the GC stops tracking a plain tuple of plain values,
        # never a NamedTuple, and at thousands of jobs a second every tracked object held until
        # the flush makes each collection longer (a third more store CPU on PostgreSQL).
        self._loaded: list[JobState] = []
        self._changed: dict[int, tuple[Any, ...]] = {}
        self._events: list[tuple[Any, ...]] = []
        # The dashboard's last hour (domain/throughput.py), tallied by flush from the facts it
        # builds changes from, by (project, bucket): jobs that ended (succeeded, failed; cancelled
        # ones not counted), and the queue waits of first attempts that started (to RUNNING).
        self.tally: dict[tuple[str, int], int] = defaultdict(int)

    # -- loading --------------------------------------------------------------------------------

    def load(self, where: str, params: Sequence[Any]) -> list[JobState]:
        """Load and (on PostgreSQL) lock the jobs matching ``where`` (columns of ``j``)."""
        cur = self.db.cursor(self.conn)
        cur.execute(self.db.sql(_STATE_SELECT + where + " ORDER BY j.id" + self.db.for_update), tuple(params))
        states = [_new(JobState, row) for row in cur.fetchall()]
        self._loaded += states
        return states

    def load_ids(self, ids: Sequence[int]) -> list[JobState]:
        if not ids:
            return []
        return self.load(self.db.in_ids("j.id"), (self.db.ids_param(ids),))

    def record(self, job: JobState) -> JobRecord:
        """The job's lifecycle record now: as loaded, or as the last step left it. (``cancelled``
        is 0/1 on SQLite: the lifecycle only tests its truth.)"""
        changed = self._changed.get(job[0])
        return _new(JobRecord, changed if changed is not None else job[:_RECORD])

    # -- changes: each asks the lifecycle, then records what it returned ------------------------

    def apply(self, job: JobState, step: lifecycle.Step, executor_id: str | None = None) -> bool:
        """Record one lifecycle step of a loaded job; returns whether it changed the job.
        ``executor_id``: the executor named on its events (default: this unit's)."""
        record, events, requeued = step
        if not events:
            return False
        self._changed[job[0]] = tuple(record)
        if requeued:
            self.requeued += 1
        executor = self.executor_id if executor_id is None else executor_id
        if executor is None:
            self._events.extend(map(tuple, events))
        else:  # the reporting executor is named on every event of its report (a retry's too)
            self._events.extend(tuple(e) if e[6] is not None else (*e[:6], executor, e[7]) for e in events)
        return True

    def admit(self, job: JobState) -> bool:
        return self.apply(job, lifecycle.admit(self.record(job), self.now))

    def claim(self, jobs: Sequence[JobState], executor_id: str, lease_expires_at: float) -> None:
        """Hand queued jobs to an executor (one lifecycle call for all of them)."""
        # records made one at a time, as the lifecycle takes them: a list of them all would be
        # one more object per job alive at once, and the GC's work grows with those
        if self._changed:
            loaded = (self.record(job) for job in jobs)
        else:  # the common case: all fresh from the database
            loaded = (_new(JobRecord, job[:_RECORD]) for job in jobs)
        records, events = lifecycle.claim(loaded, executor_id, lease_expires_at, self.now)
        changed = self._changed
        for job, record in zip(jobs, records, strict=True):
            changed[job[0]] = record  # a plain row already, as the events (see lifecycle.Event)
        self._events.extend(events)

    def report(self, job: JobState, reports: Sequence[AttemptReport], executor_id: str | None = None) -> bool:
        """Fold an executor's reports on one job; stale or repeated ones change nothing (fencing).
        ``executor_id``: the reporting executor (default: this unit's; a group commit has many)."""
        changed = self._changed.get(job[0])  # self.record, inline: this runs for every job
        rec = _new(JobRecord, changed if changed is not None else job[:_RECORD])
        executor = self.executor_id if executor_id is None else executor_id
        step = lifecycle.report(rec, reports, executor, self.max_infra_retries)
        if step[2]:
            return self.apply(job, step, executor)
        if not step[1]:
            return False
        # the common case, inline: the events already name the reporting executor
        self._changed[job[0]] = tuple(step[0])
        self._events.extend(step[1])  # plain rows already (see lifecycle.Event)
        return True

    def cancel(self, job: JobState) -> bool:
        return self.apply(job, lifecycle.cancel(self.record(job), self.now))

    def lose_executor(self, job: JobState, cause: str, may_have_started: bool | None) -> bool:
        """The executor holding this job is gone: the crash rule decides (domain/lifecycle.py)."""
        step = lifecycle.lose_executor(
            self.record(job), self.now, cause, may_have_started, self.max_infra_retries
        )
        return self.apply(job, step)

    # -- writing --------------------------------------------------------------------------------

    def flush(self, commit: bool = False) -> int:
        """Write every changed job, its events and the counter deltas, once: this ends the unit
        of work (the rows' loaded status and attempt are what the writes compare with). Returns
        how many jobs changed. ``commit``: the flush is the transaction's last write, and on
        PostgreSQL commits it in the same round trip (see _FLUSH_PG_CHECKED)."""
        if self.flushed:
            raise RuntimeError("a StatusWrites is flushed once")
        self.flushed = True
        changed = self._changed
        if not changed and not self._events:
            return 0
        cur = self.db.cursor(self.conn)
        now = self.now
        rows = []
        changes, tally = self.changes, self.tally
        moves: dict[tuple[Any, ...], list[int]] = defaultdict(lambda: [0, 0])
        for job in self._loaded:
            rec = changed.pop(job[0], None)  # once per job, even if loaded twice
            if rec is None:
                continue
            (id_, status, attempt, failed, infra, _, executor, lease, started, completed, exit_code, code,
             reason, cancelled) = rec  # fmt: skip
            loaded = job.status
            rows.append((
                status, attempt, failed, infra, executor, lease, now, started, completed, exit_code, code,
                reason, cancelled, id_, loaded, job.attempt,
            ))  # fmt: skip
            changes.append((
                id_, job.task_id, job.project_id, job.vcpus, loaded, status, attempt, code, cancelled,
                job.created_at, started if started is not None else job.started_at, completed,
            ))  # fmt: skip
            if status != loaded:
                move = moves[(job.task_id, job.group_name, job.project_id, loaded, status)]
                move[0] += 1
                move[1] += job.vcpus
                if status in _TERMINAL and not cancelled:
                    tally[(job.project_id, _ENDED_BUCKET if status == _SUCCEEDED else _FAILED_BUCKET)] += 1
            if started is not None and job.started_at is None and attempt == 1:
                tally[(job.project_id, throughput.wait_bucket(started - job.created_at))] += 1
        if changed:
            raise ValueError(f"steps on jobs not loaded here: {sorted(changed)[:5]}")
        deltas: dict[tuple[str, str, int, str], list[int]] = defaultdict(lambda: [0, 0])
        for (task, group, project, before, after), (jobs, vcpus) in moves.items():
            for status, count, vcpu_delta in lifecycle.counter_deltas(before, after, jobs, vcpus):
                delta = deltas[(task, group, status, project)]
                delta[0] += count
                delta[1] += vcpu_delta
        minute = throughput.minute_of(now)
        hour = [(minute, project, bucket, n) for (project, bucket), n in sorted(tally.items())]
        if self.db.is_sqlite:
            updated = self.db.run_bulk(cur, _UPDATE, rows)
            self.db.run_bulk(cur, _INSERT_EVENT, self._events)
            bump_counters(self.db, self.conn, deltas)
            self.db.run_bulk(cur, _BUMP_THROUGHPUT, hour)
        else:
            params = tuple(map(_json, (rows, self._events, _counter_rows(deltas), hour)))
            if commit:
                _execute_and_commit(self.conn, cur, _FLUSH_PG_CHECKED, (*params, len(rows), len(rows)))
            else:
                cur.execute(_FLUSH_PG, params)
            updated = int(cur.fetchone()[0])
        if updated not in (-1, len(rows)):  # the caller's transaction rolls back what was written
            raise StoreConsistencyError(f"{len(rows) - updated} job rows changed under us")
        return len(rows)

    def applied(self) -> Applied:
        """What the flush wrote (to hand on once the transaction has committed)."""
        return Applied(self.now, self.changes, self._events, self.requeued)


def _json(rows: list[Any]) -> str:
    """Rows as the JSON text the flush sends: orjson (a group commit's flush carries thousands
    of rows; the standard encoder was a tenth of its writer's time), or, for text orjson
    refuses (a lone surrogate), the standard encoder."""
    try:
        return orjson.dumps(rows).decode()
    except TypeError:
        return json.dumps(rows)


def _execute_and_commit(conn: Connection, cur: Any, statement: str, params: Sequence[Any]) -> None:
    """Run ``statement`` and COMMIT in one round trip (psycopg's pipeline mode). The caller's
    ``db.write()`` block then commits nothing more (psycopg's commit outside a transaction is a
    no-op). A failed statement leaves the transaction aborted: the COMMIT writes nothing."""
    import psycopg

    driver: Any = conn.connection.driver_connection
    try:
        if psycopg.Pipeline.is_supported():
            with driver.pipeline():
                cur.execute(statement, params)
                driver.commit()  # queued behind it; the pipeline syncs (and raises) on exit
        else:  # a libpq before 14 has no pipeline mode: two round trips, the same outcome
            cur.execute(statement, params)
            driver.commit()
    except psycopg.errors.InvalidTextRepresentation as exc:
        if "changed under us" not in str(exc):
            raise
        found = re.search(r'"([^"]*changed under us)"', str(exc))
        raise StoreConsistencyError(found.group(1) if found else str(exc)) from None


def bump_counters(db: Database, conn: Connection, deltas: dict[tuple[str, str, int, str], list[int]]) -> None:
    """Add (count, vCPU) deltas keyed by (task, group, status, project).

    The rows are upserted in key order, so transactions that run at once (an executor's report
    and claim, the scheduler's admission) lock the counter rows they share in the same order.
    """
    db.run_bulk(db.cursor(conn), _BUMP_COUNTERS, _counter_rows(deltas))


def _counter_rows(deltas: dict[tuple[str, str, int, str], list[int]]) -> list[tuple[Any, ...]]:
    return [(t, g, s, p, d[0], d[1]) for (t, g, s, p), d in sorted(deltas.items()) if d[0] or d[1]]
