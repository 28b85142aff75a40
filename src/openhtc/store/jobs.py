"""Batches and jobs: submission, reads, summaries and cancellation."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Row, and_, bindparam, func, insert, literal_column, select

from openhtc.domain import lifecycle
from openhtc.domain.clock import iso
from openhtc.domain.enums import NON_TERMINAL_STATUSES, JobStatus
from openhtc.store.db import BulkStatement, Database
from openhtc.store.materialize import BatchFields, Materializer, pending_job, pending_jobs
from openhtc.store.tables import (
    batches,
    job_counters,
    job_events,
    jobs,
    tasks,
)
from openhtc.store.transitions import Applied, StatusWrites, bump_counters

_NON_TERMINAL_SQL = ",".join(str(int(s)) for s in NON_TERMINAL_STATUSES)
# Reads that every poll of a job or a task makes, built once: SQLAlchemy then reuses their
# compiled form and cache key (building a select per call costs more than running it).
_BATCH_BY_PARENT = select(batches).where(batches.c.parent_job_id == bindparam("parent"))
_JOB_BY_INDEX = select(jobs).where(
    and_(jobs.c.batch_id == bindparam("batch"), jobs.c.idx == bindparam("idx"))
)
_TASK_TOTALS = (
    select(job_counters.c.status, func.sum(job_counters.c.count))
    .where(job_counters.c.task_id == bindparam("task"))
    .group_by(job_counters.c.status)
)
_FIRST_UNFINISHED = (
    select(jobs.c.idx)
    .where(
        and_(
            jobs.c.batch_id == bindparam("batch"),
            jobs.c.idx >= bindparam("idx"),
            jobs.c.status.in_([int(s) for s in NON_TERMINAL_STATUSES]),
        )
    )
    .order_by(jobs.c.idx)
    .limit(1)
)
_PROJECT_OF_TASK = (
    select(job_counters.c.project_id).where(job_counters.c.task_id == bindparam("task")).limit(1)
)
_PROJECT_STATUS_COUNT = select(func.sum(job_counters.c.count)).where(
    and_(job_counters.c.project_id == bindparam("project"), job_counters.c.status == bindparam("status"))
)
# The submit's statements, built once for the same reason (a single-job submit is a client's
# latency). Admission at submit: neither the project nor its workspace has a vCPU limit (the
# three reads of queue.load_limits in one statement, inside the submit's own transaction, so a
# limit committed before the submit is always seen). Plain SQL: on PostgreSQL it goes in one
# round trip with the id reservation's (see submit_batches).
_UNLIMITED = (
    "SELECT w.vcpu_limit IS NULL AND NOT EXISTS (SELECT 1 FROM project_limits l WHERE l.project_id = p.id)"
    " FROM projects p JOIN workspaces w ON w.id = p.workspace_id WHERE p.id = ?"
)
_INSERT_BATCH = insert(batches).returning(batches.c.id)
_BATCH_COLUMNS = tuple(c.name for c in batches.columns)
# PostgreSQL: the batch rows with ids taken beforehand (_BATCH_IDS, with the submit's reads), so
# they go in the COMMIT's round trip instead of one each.
_INSERT_BATCH_WITH_ID = (
    f"INSERT INTO batches ({', '.join(_BATCH_COLUMNS)}) VALUES"
    f" ({', '.join('%s::json' if c == 'request' else '%s' for c in _BATCH_COLUMNS)})"
)
_BATCH_IDS = "SELECT nextval(pg_get_serial_sequence('batches', 'id')) FROM generate_series(1, %s)"
_TOUCH_TASK = "UPDATE tasks SET last_active_at = ? WHERE id = ?"
RARE = 50_000  # jobs of a project in one status, up to which a status filter reads ix_jobs_queue
# The submission events, one per batch and submit-time status (job_id NULL: they belong to every
# job of the batch; see tables.job_events).
_INSERT_SUBMIT_EVENTS = BulkStatement.insert(
    "job_events",
    (
        ("batch_id", "bigint"),
        ("attempt", "int"),
        ("status", "smallint"),
        ("at", "float8"),
        ("cancelled", "bool"),
    ),
)


@dataclass(frozen=True, slots=True)
class NewBatch:
    """A validated batch ready to store: its echo and the per-job scheduling fields."""

    request: dict[str, Any]  # the HTCJobSubmitRequest echo, without server fields
    group: str | None
    batch_size: int
    region: str
    architecture: str
    priority: int
    vcpus: int
    memory_mb: int
    max_retries: int


@dataclass(frozen=True, slots=True)
class Submitted:
    echoes: list[dict[str, Any]]
    settled: bool  # all admitted, all rows written: no scheduler round needed
    first_ids: list[int]  # each batch's first job's id (its row's, once written)
    batch_ids: list[int]  # each batch's row id


@dataclass(frozen=True, slots=True)
class BatchHead:
    """The fields of a batch row an executor's launch reads (see ``JobStore.batch_heads``)."""

    id: int
    parent_job_id: str
    task_id: str
    project_id: str
    workspace_id: str
    created_by: str
    region: str
    request: dict[str, Any]


FRESH_BATCHES = 256  # batches remembered from their submit until an executor claims a job of each
_SMALL = 16 * 1024  # bytes of commands, envs and claims: a larger request is not kept in memory


def _small(request: dict[str, Any]) -> bool:
    definition = request.get("htcJobDefinition", {})
    size = sum(len(c) for c in definition.get("commands", []))
    for pair in (*definition.get("envs", []), *definition.get("claims", [])):
        size += len(str(pair.get("name", ""))) + len(str(pair.get("value", "")))
    return size <= _SMALL


class JobStore:
    def __init__(self, db: Database, materialize_chunk: int = 20000) -> None:
        self.db = db
        self._heads: dict[int, BatchHead] = {}  # see batch_heads
        self._heads_lock = threading.Lock()
        self.materializer = Materializer(db)
        self.materialize_chunk = materialize_chunk

    # -- writes ---------------------------------------------------------------------------------

    def submit(
        self,
        task: Row[Any],
        new_batches: Sequence[NewBatch],
        user_id: str,
        now: float,
        also: Callable[[Connection, list[int]], None] | None = None,
    ) -> list[dict[str, Any]]:
        """``submit_batches``' echoes."""
        return self.submit_batches(task, new_batches, user_id, now, also).echoes

    def submit_batches(
        self,
        task: Row[Any],
        new_batches: Sequence[NewBatch],
        user_id: str,
        now: float,
        also: Callable[[Connection, list[int]], None] | None = None,
    ) -> Submitted:
        """Store batches and all their jobs in one transaction.

        Jobs start in SUBMITTED_TO_RESCALE. When neither the project nor the workspace has a vCPU
        limit they are admitted at once (SUBMITTED_TO_PROVIDER, with both events recorded), so the
        common case costs no second pass over the rows. Rows beyond the first
        ``materialize_chunk`` jobs of the call are written later (see store/materialize.py).
        ``also`` writes more in the same transaction, given the new batches' ids (function
        tasks: their events), with plain DB-API statements whose results it does not read (on
        PostgreSQL they go with the COMMIT in one round trip). ``Submitted.settled``: every job
        was admitted and has its row, so the scheduler has nothing to do for this submit.
        """
        echoes: list[dict[str, Any]] = []
        settled = True
        heads: list[BatchHead] = []
        db = self.db
        with db.write() as conn:
            # On PostgreSQL a lone job's submit is a client's latency, and each statement a
            # round trip: BEGIN, the reads and the batches' ids go in one, then the batch and
            # job rows, counters, events, the task's row and the COMMIT in one (SQLite: the
            # batch rows' ids come from their inserts).
            limits, ids = db.cursor(conn), db.cursor(conn)
            with db.pipelined(conn):
                limits.execute(db.sql(_UNLIMITED), (task.project_id,))
                # the batches' ids taken under reserve's lock: in the order of their jobs' ids
                first_id = self.materializer.reserve(
                    conn,
                    sum(nb.batch_size for nb in new_batches),
                    lambda: ids.execute(_BATCH_IDS, (len(new_batches),)),
                )
                unlimited = (limits.fetchone() or (None,))[0]
            reserved = [] if db.is_sqlite else [int(row[0]) for row in ids.fetchall()]
            batch_rows: list[tuple[Any, ...]] = []  # PostgreSQL: written with the COMMIT
            steps = lifecycle.submitted(admit=unlimited is None or bool(unlimited))
            status = steps[-1]
            settled = status == JobStatus.SUBMITTED_TO_PROVIDER
            cur = db.cursor(conn)
            batch_ids: list[int] = []
            rows: list[tuple[BatchFields, int]] = []  # job rows to write, after every batch row
            first_ids: list[int] = []
            budget = self.materialize_chunk
            counters: dict[tuple[str, str, int, str], list[int]] = {}
            for nb in new_batches:
                parent = str(uuid.uuid4())
                group = nb.group or parent
                echo = {
                    **nb.request,
                    "taskId": task.id,
                    "projectId": task.project_id,
                    "parentJobId": parent,
                    "createdBy": user_id,
                    "workspaceId": task.workspace_id,
                    "group": group,
                    "batchSize": nb.batch_size,
                    "regions": [nb.region],
                    "rescaleTimeReceived": iso(now),
                    "jobDefinitionName": f"jobdef-{parent}",
                }
                written = min(nb.batch_size, budget)
                settled = settled and written == nb.batch_size
                batch_row = {
                    "parent_job_id": parent,
                    "task_id": task.id,
                    "project_id": task.project_id,
                    "workspace_id": task.workspace_id,
                    "group_name": group,
                    "batch_size": nb.batch_size,
                    "created_by": user_id,
                    "created_at": now,
                    "region": nb.region,
                    "max_retries": nb.max_retries,
                    "request": echo,
                    "first_job_id": first_id,
                    "pending_from": written if written < nb.batch_size else None,
                    "job_status": int(status),
                    "architecture": nb.architecture,
                    "priority": nb.priority,
                    "vcpus": nb.vcpus,
                    "memory_mb": nb.memory_mb,
                }
                if reserved:
                    batch_id = reserved[len(batch_ids)]
                    given = {**batch_row, "id": batch_id, "request": json.dumps(echo)}
                    batch_rows.append(tuple(given[c] for c in _BATCH_COLUMNS))
                else:
                    batch_id = conn.execute(_INSERT_BATCH, batch_row).scalar_one()
                fields = BatchFields(
                    id=batch_id,
                    first_job_id=first_id,
                    pending_from=0,
                    batch_size=nb.batch_size,
                    task_id=task.id,
                    project_id=task.project_id,
                    group_name=group,
                    region=nb.region,
                    architecture=nb.architecture,
                    job_status=int(status),
                    priority=nb.priority,
                    vcpus=nb.vcpus,
                    memory_mb=nb.memory_mb,
                    created_at=now,
                )
                rows.append((fields, written))
                first_ids.append(first_id)
                first_id += nb.batch_size
                budget -= written
                batch_ids.append(batch_id)
                if _small(echo):
                    heads.append(
                        BatchHead(
                            batch_id,
                            parent,
                            task.id,
                            task.project_id,
                            task.workspace_id,
                            user_id,
                            nb.region,
                            echo,
                        )
                    )
                counts = counters.setdefault((task.id, group, int(status), task.project_id), [0, 0])
                counts[0] += nb.batch_size
                counts[1] += nb.batch_size * nb.vcpus
                echoes.append(echo)
            with db.pipelined(conn, commit=True):
                if batch_rows:  # before their jobs' rows (the foreign key)
                    cur.executemany(_INSERT_BATCH_WITH_ID, batch_rows)
                for fields, written in rows:
                    self.materializer.write(conn, fields, 0, written)
                bump_counters(db, conn, counters)
                db.run_bulk(
                    cur,
                    _INSERT_SUBMIT_EVENTS,
                    [(batch_id, 1, int(step), now, False) for batch_id in batch_ids for step in steps],
                )
                if also is not None:
                    also(conn, batch_ids)
                cur.execute(db.sql(_TOUCH_TASK), (now, task.id))
        self._remember(heads)  # only once committed: a rolled-back batch's id may be reused
        return Submitted(echoes, settled, first_ids, batch_ids)

    def _remember(self, heads: list[BatchHead]) -> None:
        with self._heads_lock:
            if len(self._heads) + len(heads) > FRESH_BATCHES:
                self._heads.clear()
            self._heads.update((head.id, head) for head in heads)

    def batch_heads(self, ids: set[int]) -> dict[int, Any]:
        """What an executor needs of each batch to launch its jobs (``BatchHead``'s fields, all
        fixed at submit): from memory for the batches this server submitted lately, so a
        client's lone job is claimed without another read; the others from the database."""
        with self._heads_lock:
            found: dict[int, Any] = {i: head for i in ids if (head := self._heads.pop(i, None))}
        missing = ids - found.keys()
        if missing:
            with self.db.read() as conn:
                found.update(self.batches_by_id(conn, missing))
        return found

    def cancel(self, task_id: str, group: str | None, now: float, batch_id: int | None = None) -> Applied:
        """Fail every non-terminal job of the task (or group, or one batch of the group) with
        userCancelledEvent set; returns what that changed."""
        with self.db.write() as conn:
            self.materializer.finish(conn, task_id, group)  # a cancel reaches jobs without rows too
            writes = StatusWrites(self.db, conn, now)
            where = f"j.task_id = ? AND j.status IN ({_NON_TERMINAL_SQL})"
            params: tuple[Any, ...] = (task_id,)
            if group is not None:
                where += " AND j.group_name = ?"
                params += (group,)
            if batch_id is not None:
                where += " AND j.batch_id = ?"
                params += (batch_id,)
            for job in writes.load(where, params):
                writes.cancel(job)
            if writes.flush():
                conn.execute(tasks.update().where(tasks.c.id == task_id).values(last_active_at=now))
        return writes.applied()

    # -- reads ----------------------------------------------------------------------------------

    def batch_by_parent(self, conn: Connection, parent_job_id: str) -> Row[Any] | None:
        return conn.execute(*self.batch_by_parent_query(parent_job_id)).first()

    @staticmethod
    def batch_by_parent_query(parent_job_id: str) -> tuple[Any, dict[str, Any]]:
        """``batch_by_parent``'s SELECT and parameters (to read it with others: select_together)."""
        return _BATCH_BY_PARENT, {"parent": parent_job_id}

    def batches_by_id(self, conn: Connection, ids: set[int]) -> dict[int, Row[Any]]:
        if not ids:
            return {}
        rows = conn.execute(select(batches).where(batches.c.id.in_(ids))).all()
        return {row.id: row for row in rows}

    def get(self, conn: Connection, task_id: str, job_uuid: str) -> tuple[Any, Row[Any]] | None:
        """The job (a row, or a PendingJob while its row is not written) and its batch row for
        ``{parentJobId}:{index}``."""
        parent, sep, index = job_uuid.rpartition(":")
        # ASCII digits only ("²".isdigit() is true), and no index beyond any batch (a larger
        # number would overflow the INTEGER column on PostgreSQL).
        if not sep or not (index.isascii() and index.isdigit()) or len(index) > 9:
            return None
        batch = self.batch_by_parent(conn, parent)  # read first: see materialize.pending_job
        if batch is None or batch.task_id != task_id:
            return None
        job: Any = conn.execute(_JOB_BY_INDEX, {"batch": batch.id, "idx": int(index)}).first()
        if job is None:
            job = pending_job(batch, int(index))
        return (job, batch) if job is not None else None

    def list_jobs(
        self,
        conn: Connection,
        task_id: str,
        *,
        after_id: int,
        limit: int,
        group: str | None = None,
        status: JobStatus | None = None,
        job_uuids: Sequence[str] = (),
        failure_code: str | None = None,
    ) -> list[Any]:
        """Jobs by id: rows, merged with the jobs whose rows are not written yet (which have no
        failure code: a failure code filter reads rows only)."""
        # The batches first: a row written between the two reads then shows up twice, never
        # not at all, and the row wins.
        pending = (
            []
            if failure_code is not None
            else self.materializer.pending_batches(
                conn,
                task_id,
                after_id,
                None if job_uuids else limit,
                group,
                None if status is None else int(status),
            )
        )
        only: set[int] | None = None
        if job_uuids:
            only = set(self._ids_for_uuids(conn, task_id, job_uuids))
        stmt = self.list_statement(conn, task_id, after_id, limit, group, status, failure_code, only)
        rows: list[Any] = list(conn.execute(stmt).all())
        if not pending:
            return rows
        seen = {row.id for row in rows}
        rows += [job for job in pending_jobs(pending, after_id, limit, only) if job.id not in seen]
        rows.sort(key=lambda row: row.id)
        return rows[:limit]

    def list_statement(
        self,
        conn: Connection,
        task_id: str,
        after_id: int,
        limit: int,
        group: str | None = None,
        status: JobStatus | None = None,
        failure_code: str | None = None,
        only: set[int] | None = None,
    ) -> Any:
        """The select of a page of job rows (``bench.joblist`` and a test EXPLAIN it): each filter
        is an index range; keyset paging by id, no OFFSET, no count."""
        cond = and_(jobs.c.task_id == task_id, jobs.c.id > after_id)
        if group is not None:
            cond = and_(cond, jobs.c.group_name == group)
        if status is not None:
            cond = and_(cond, jobs.c.status == int(status))
        if failure_code is not None:  # ix_jobs_task_failure: only jobs that failed are in it
            cond = and_(cond, jobs.c.failure_code == failure_code, jobs.c.failure_code.is_not(None))
        if only is not None:
            cond = and_(cond, jobs.c.id.in_(only))
        stmt = select(jobs).where(cond).order_by(jobs.c.id).limit(limit)
        if status is not None and group is None and failure_code is None and only is None:
            rare = self._rare_status(conn, task_id, status, after_id, limit)
            if rare is not None:
                return rare
        return stmt

    def _rare_status(
        self, conn: Connection, task_id: str, status: JobStatus, after_id: int, limit: int
    ) -> Any:
        """A status few of the project's jobs are in (FAILED, RUNNING in a task of a million jobs
        that succeeded) is read from its range of ix_jobs_queue (status, project) and sorted
        (on PostgreSQL: of the partial index holding that status, and SUCCEEDED is walked),
        instead of walking the task's ids past every job in other statuses; None: the status is
        common (more than RARE jobs of the project), and the walk finds a page soon. The other
        terms are written so that no index serves them (``|| ''``, ``+ 0``): both planners then
        take the queue index, whatever their statistics say."""
        if status == JobStatus.SUCCEEDED and not self.db.is_sqlite:
            return None  # no PostgreSQL index holds succeeded jobs by status (tables.py)
        found = conn.execute(_PROJECT_OF_TASK, {"task": task_id}).first()
        if found is None:
            return None
        in_project = conn.execute(
            _PROJECT_STATUS_COUNT, {"project": found[0], "status": int(status)}
        ).scalar()
        if int(in_project or 0) > RARE:
            return None
        return (
            select(jobs)
            .where(
                and_(
                    # a literal: PostgreSQL's status indexes are partial (tables.py)
                    jobs.c.status == literal_column(str(int(status))),
                    jobs.c.project_id == found[0],
                    jobs.c.task_id.concat("") == task_id,
                    jobs.c.id + 0 > after_id,
                )
            )
            .order_by(jobs.c.id + 0)
            .limit(limit)
        )

    def _ids_for_uuids(self, conn: Connection, task_id: str, job_uuids: Sequence[str]) -> list[int]:
        ids = []
        for job_uuid in job_uuids:
            found = self.get(conn, task_id, job_uuid)
            if found:
                ids.append(found[0].id)
        return ids

    def materialize(self) -> int:
        """Write up to ``materialize_chunk`` job rows still missing, for projects whose queue of
        jobs with rows runs short (the scheduler loop calls this)."""
        return self.materializer.run(self.materialize_chunk, ahead=2 * self.materialize_chunk)

    def events(
        self, conn: Connection, job_id: int, batch_id: int, after_id: int, limit: int
    ) -> list[Row[Any]]:
        """The job's own events and its batch's shared ones, in the order they happened."""
        own = select(job_events).where(and_(job_events.c.job_id == job_id, job_events.c.id > after_id))
        shared = select(job_events).where(
            and_(
                job_events.c.batch_id == batch_id,
                job_events.c.job_id.is_(None),
                job_events.c.id > after_id,
            )
        )
        rows = [*conn.execute(own.order_by(job_events.c.id).limit(limit)), *conn.execute(shared)]
        return sorted(rows, key=lambda row: row.id)[:limit]

    def summary(
        self, conn: Connection, task_id: str, groups: Sequence[str] | None = None
    ) -> dict[str, dict[str, int]]:
        """Counts per group and status name, read from the counters (O(groups), not O(jobs))."""
        cond = job_counters.c.task_id == task_id
        if groups:
            cond = and_(cond, job_counters.c.group_name.in_(list(groups)))
        out: dict[str, dict[str, int]] = {}
        for group, status, count in conn.execute(
            select(job_counters.c.group_name, job_counters.c.status, job_counters.c.count).where(cond)
        ):
            out.setdefault(group, {})[JobStatus(status).name] = int(count)
        return out

    def totals(self, conn: Connection, task_id: str) -> dict[str, int]:
        """Counts per status name over all of a task's groups (summed by the database)."""
        rows = conn.execute(_TASK_TOTALS, {"task": task_id})
        return {JobStatus(status).name: int(count) for status, count in rows if count}

    def groups(self, conn: Connection, task_id: str, after: str | None, limit: int) -> list[str]:
        cond = job_counters.c.task_id == task_id
        if after is not None:
            cond = and_(cond, job_counters.c.group_name > after)
        stmt = (
            select(job_counters.c.group_name)
            .where(cond)
            .group_by(job_counters.c.group_name)
            .order_by(job_counters.c.group_name)
            .limit(limit)
        )
        return [row[0] for row in conn.execute(stmt)]

    def first_unfinished(self, conn: Connection, batch: Any, from_idx: int = 0) -> int | None:
        """The lowest index >= ``from_idx`` of a batch's jobs that has not ended, or None when
        all have. A terminal status is final, so a waiter re-asks from the last answer: the
        whole wait reads each row of the batch about once (its (batch_id, idx) index)."""
        if batch.pending_from is not None:  # rows not yet written: those jobs have not ended
            from_idx = min(from_idx, batch.pending_from)
        row = conn.execute(_FIRST_UNFINISHED, {"batch": batch.id, "idx": from_idx}).first()
        if row is not None:
            return int(row[0])
        return batch.pending_from

    def running_count(self, conn: Connection, task_id: str) -> int:
        stmt = select(func.coalesce(func.sum(job_counters.c.count), 0)).where(
            and_(
                job_counters.c.task_id == task_id,
                job_counters.c.status.in_([int(s) for s in NON_TERMINAL_STATUSES]),
            )
        )
        return int(conn.execute(stmt).scalar_one())
