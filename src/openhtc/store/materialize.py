"""Late materialization: a huge submit is accepted before all of its job rows exist.

A batch reserves a contiguous range of job ids when it is stored (job ``i`` has id
``first_job_id + i``), so every job's id, its place in listings and its page cursor are fixed
at submit. The submit call writes the rows of its first ``chunk`` jobs itself, which covers any
ordinary submit; the rows of the rest are written by the scheduler loop as they are needed:
while a project has fewer than ``2 * chunk`` queued jobs with rows, it writes the next ``chunk``
rows of the project's oldest batches, one transaction each. Until its row exists, job ``i`` of
a batch reads as exactly what it is: a fresh job of that batch (status ``job_status``,
attempt 1, created with the batch). Nothing else can have happened to it: only jobs with rows
are admitted or claimed, and a cancel first writes every missing row of the jobs it cancels.
The counters count every job from the submit on, so summaries are exact throughout. A crash
loses nothing: a batch's ``pending_from`` commits in the same transaction as the rows before
it, and the restarted loop carries on.

Why: a million-job submit on PostgreSQL spent 12.8 s inserting rows into ``jobs`` and its
indexes before it could answer; the rows are needed only when the jobs come up for scheduling.
The price: within one project, a job without a row waits behind the (at most ``2 * chunk``)
queued jobs with rows even if its priority is higher; and cancelling a huge queue writes its
missing rows first.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection

from openhtc.domain.enums import JobStatus
from openhtc.store.db import Database

# Written per job row; every job of a batch shares all but ``id`` and ``idx``.
_COLUMNS = (
    "id, batch_id, idx, task_id, project_id, group_name, region, architecture, status, attempt,"
    " failed_attempts, infra_retries, priority, vcpus, memory_mb, created_at, updated_at, cancelled"
)
_VALUES = "? + seq.i, ?, seq.i, ?, ?, ?, ?, ?, ?, 1, 0, 0, ?, ?, ?, ?, ?, ?"
_PG_VALUES = _VALUES.replace("? + seq.i", "CAST(? AS bigint) + seq.i")
_BATCH_FIELDS = (
    "id, first_job_id, pending_from, batch_size, task_id, project_id, group_name, region,"
    " architecture, job_status, priority, vcpus, memory_mb, created_at"
)
# The statuses a job can have at submit, before anything happened to it.
_FRESH_SQL = f"{int(JobStatus.SUBMITTED_TO_RESCALE)},{int(JobStatus.SUBMITTED_TO_PROVIDER)}"
# Serializes id reservations on PostgreSQL (SQLite serializes every write transaction anyway).
_RESERVE_LOCK_KEY = 0x6F68746301


@dataclass(frozen=True, slots=True)
class PendingJob:
    """A job whose row is not written yet, with the attribute names of a ``jobs`` row."""

    id: int
    batch_id: int
    idx: int
    task_id: str
    project_id: str
    group_name: str
    region: str
    architecture: str
    status: int
    priority: int
    vcpus: int
    memory_mb: int
    created_at: float
    updated_at: float
    attempt: int = 1
    failed_attempts: int = 0
    infra_retries: int = 0
    executor_id: str | None = None
    lease_expires_at: float | None = None
    started_at: float | None = None
    completed_at: float | None = None
    exit_code: int | None = None
    failure_code: str | None = None
    status_reason: str | None = None
    cancelled: bool = False


def pending_job(batch: Any, idx: int) -> PendingJob | None:
    """Job ``idx`` of ``batch`` if its row is not written yet (as of when ``batch`` was read)."""
    if batch.pending_from is None or not batch.pending_from <= idx < batch.batch_size:
        return None
    return PendingJob(
        id=batch.first_job_id + idx,
        batch_id=batch.id,
        idx=idx,
        task_id=batch.task_id,
        project_id=batch.project_id,
        group_name=batch.group_name,
        region=batch.region,
        architecture=batch.architecture,
        status=batch.job_status,
        priority=batch.priority,
        vcpus=batch.vcpus,
        memory_mb=batch.memory_mb,
        created_at=batch.created_at,
        updated_at=batch.created_at,
    )


def pending_jobs(
    batches: Iterable[Any], after_id: int, limit: int, only_ids: set[int] | None = None
) -> list[PendingJob]:
    """Up to ``limit`` jobs without rows, of ``batches`` (in id order), with ids above
    ``after_id``, by id."""
    out: list[PendingJob] = []
    for batch in batches:
        if len(out) >= limit and only_ids is None:
            break
        start = max(batch.pending_from, after_id + 1 - batch.first_job_id)
        if only_ids is not None:
            wanted = sorted(i - batch.first_job_id for i in only_ids)
            indexes: Iterable[int] = (i for i in wanted if start <= i < batch.batch_size)
        else:
            indexes = range(start, min(batch.batch_size, start + limit))
        for idx in indexes:
            job = pending_job(batch, idx)
            if job is not None:
                out.append(job)
    out.sort(key=lambda job: job.id)
    return out[:limit]


class Materializer:
    def __init__(self, db: Database) -> None:
        self.db = db

    def reserve(self, conn: Connection, count: int, under_lock: Callable[[], None] | None = None) -> int:
        """Reserve ``count`` consecutive job ids in this transaction; returns the first.
        ``under_lock`` (PostgreSQL): sends more statements after the lock's, before the read
        that ends the round trip (in a pipeline, they go in it)."""
        cur = self.db.cursor(conn)
        if not self.db.is_sqlite:
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (_RESERVE_LOCK_KEY,))
            if under_lock is not None:
                under_lock()
        # Ids reserved by a batch whose rows are not all written yet are above MAX(id). One
        # statement for both (a round trip less on PostgreSQL); the lock above is its own: a
        # statement's snapshot is taken before the locks it waits for.
        cur.execute(
            "SELECT (SELECT MAX(id) FROM jobs), (SELECT first_job_id + batch_size FROM batches"
            " WHERE first_job_id IS NOT NULL ORDER BY id DESC LIMIT 1)"
        )
        highest, reserved = cur.fetchone()
        return max((highest or 0) + 1, reserved or 1)

    def write(self, conn: Connection, batch: Any, start: int, stop: int) -> None:
        """Write the rows of jobs ``start``..``stop - 1`` of ``batch`` (fields as _BATCH_FIELDS)."""
        if stop <= start:
            return
        select_params = (
            batch.first_job_id,
            batch.id,
            batch.task_id,
            batch.project_id,
            batch.group_name,
            batch.region,
            batch.architecture,
            batch.job_status,
            batch.priority,
            batch.vcpus,
            batch.memory_mb,
            batch.created_at,
            batch.created_at,
            False,
        )
        # The database generates the rows itself: no Python tuple per job.
        cur = self.db.cursor(conn)
        if self.db.is_sqlite:
            cur.execute(
                f"INSERT INTO jobs ({_COLUMNS}) WITH RECURSIVE seq(i) AS"
                " (SELECT ? UNION ALL SELECT i + 1 FROM seq WHERE i < ?)"
                f" SELECT {_VALUES} FROM seq",
                (start, stop - 1, *select_params),
            )
        else:
            cur.execute(
                self.db.sql(
                    f"INSERT INTO jobs ({_COLUMNS}) SELECT {_PG_VALUES}"
                    " FROM generate_series(CAST(? AS integer), CAST(? AS integer)) AS seq(i)"
                ),
                (*select_params, start, stop - 1),
            )

    def run(self, chunk: int, ahead: int) -> int:
        """Write up to ``chunk`` missing job rows, oldest batch first, for the projects with
        fewer than ``ahead`` queued jobs that have rows. Returns how many rows it wrote."""
        with self.db.read() as conn:  # the common case, nothing to write, takes no write lock
            projects = self._wanting_rows(conn, ahead)
        if not projects:
            return 0
        with self.db.write() as conn:
            cur = self.db.cursor(conn)
            marks = ",".join("?" * len(projects))
            lock = "" if self.db.is_sqlite else " FOR UPDATE SKIP LOCKED"
            cur.execute(
                self.db.sql(
                    f"SELECT {_BATCH_FIELDS} FROM batches WHERE pending_from IS NOT NULL"
                    f" AND project_id IN ({marks}) ORDER BY id LIMIT 100{lock}"
                ),
                projects,
            )
            return self._write_pending(conn, _rows(cur), chunk)

    def _wanting_rows(self, conn: Connection, ahead: int) -> list[str]:
        """Projects with jobs still without rows and fewer than ``ahead`` queued ones with rows."""
        cur = self.db.cursor(conn)
        cur.execute(
            "SELECT project_id, SUM(batch_size - pending_from) FROM batches"
            " WHERE pending_from IS NOT NULL GROUP BY project_id"
        )
        unwritten = {row[0]: int(row[1]) for row in cur.fetchall()}
        if not unwritten:
            return []
        # A job without a row is always in its batch's first status, and counted in it.
        marks = ",".join("?" * len(unwritten))
        cur.execute(
            self.db.sql(
                f"SELECT project_id, SUM(count) FROM job_counters WHERE status IN ({_FRESH_SQL})"
                f" AND project_id IN ({marks}) GROUP BY project_id"
            ),
            tuple(unwritten),
        )
        queued = {row[0]: int(row[1]) for row in cur.fetchall()}
        return [p for p, n in unwritten.items() if queued.get(p, 0) - n < ahead]

    def finish(self, conn: Connection, task_id: str, group: str | None) -> None:
        """Write every missing job row of a task (or of one group of it), in ``conn``."""
        cur = self.db.cursor(conn)
        sql = f"SELECT {_BATCH_FIELDS} FROM batches WHERE task_id = ? AND pending_from IS NOT NULL"
        params: tuple[Any, ...] = (task_id,)
        if group is not None:
            sql += " AND group_name = ?"
            params += (group,)
        cur.execute(self.db.sql(sql + " ORDER BY id" + ("" if self.db.is_sqlite else " FOR UPDATE")), params)
        self._write_pending(conn, _rows(cur), None)

    def pending_batches(
        self,
        conn: Connection,
        task_id: str,
        after_id: int,
        limit: int | None,
        group: str | None = None,
        status: int | None = None,
    ) -> list[Any]:
        """The task's batches with jobs still without rows and ids above ``after_id``, in id order:
        the first ``limit`` of them hold the first ``limit`` such jobs (a batch's ids ascend
        with its id)."""
        sql = (
            f"SELECT {_BATCH_FIELDS} FROM batches WHERE task_id = ? AND pending_from IS NOT NULL"
            " AND first_job_id + batch_size > ?"
        )
        params: tuple[Any, ...] = (task_id, after_id + 1)
        if group is not None:
            sql += " AND group_name = ?"
            params += (group,)
        if status is not None:
            sql += " AND job_status = ?"
            params += (status,)
        sql += " ORDER BY id"
        if limit is not None:
            sql += " LIMIT ?"
            params += (limit,)
        cur = self.db.cursor(conn)
        cur.execute(self.db.sql(sql), params)
        return _rows(cur)

    def _write_pending(self, conn: Connection, batches: Sequence[Any], budget: int | None) -> int:
        written = 0
        cur = self.db.cursor(conn)
        for batch in batches:
            if budget is not None and written >= budget:
                break
            stop = batch.batch_size
            if budget is not None:
                stop = min(stop, batch.pending_from + budget - written)
            self.write(conn, batch, batch.pending_from, stop)
            written += stop - batch.pending_from
            cur.execute(
                self.db.sql("UPDATE batches SET pending_from = ? WHERE id = ?"),
                (stop if stop < batch.batch_size else None, batch.id),
            )
        return written


@dataclass(frozen=True, slots=True)
class BatchFields:
    id: int
    first_job_id: int
    pending_from: int
    batch_size: int
    task_id: str
    project_id: str
    group_name: str
    region: str
    architecture: str
    job_status: int
    priority: int
    vcpus: int
    memory_mb: int
    created_at: float


def _rows(cur: Any) -> list[Any]:
    return [BatchFields(*row) for row in cur.fetchall()]
