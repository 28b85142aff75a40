"""The executor side of the store: admission, claiming, reports, heartbeats and recovery.

Claims and reports are batched: one transaction moves many jobs. Every report carries the
attempt number it belongs to, and a report for an attempt the job is no longer on, or from an
executor that no longer holds it, is ignored (fencing). A job whose executor vanished is
recovered when its lease expires or when that executor registers again.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Collection, Sequence
from typing import Any, NamedTuple

from sqlalchemy import Connection, and_, bindparam, func, select, text

from openhtc.domain import lifecycle, throughput
from openhtc.domain import scheduling as policy
from openhtc.domain.capacity import ExecutorOffer
from openhtc.domain.enums import ACTIVE_STATUSES, LIMITED_STATUSES, JobStatus
from openhtc.domain.lifecycle import JobRecord
from openhtc.domain.models import AttemptReport, Capacity
from openhtc.domain.recovery import EveryAttempt
from openhtc.store.agent_rows import AgentRows, AgentState, TokenBinding, check_binding
from openhtc.store.db import Database
from openhtc.store.exchanges import ExchangeRows
from openhtc.store.functions import CallResult, save_in
from openhtc.store.tables import (
    batches,
    executors,
    job_counters,
    jobs,
    project_limits,
    projects,
    throughput_minutes,
    workspaces,
)
from openhtc.store.transitions import Applied, JobState, StatusWrites

S = JobStatus
# A claim of at most this many jobs reads their function calls' events with their rows (a lone
# call's event then costs no round trip of its own); a larger one leaves them to the function
# pool, which reads them a chunk of the batch at a time.
EVENTS_WITH_CLAIM = 4
_EVENTS_OF = (
    "SELECT j.id, f.event FROM jobs j JOIN function_calls f ON f.batch_id = j.batch_id AND f.idx = j.idx"
    " WHERE "
)
# The claim's first read (QueueStore._queued_and_running)
_COUNTERS = (
    f"SELECT project_id, SUM(CASE WHEN status = {int(S.SUBMITTED_TO_PROVIDER)} THEN count ELSE 0 END),"
    f" SUM(CASE WHEN status = {int(S.SUBMITTED_TO_PROVIDER)} THEN 0 ELSE vcpus END) FROM job_counters"
    f" WHERE status IN ({int(S.SUBMITTED_TO_PROVIDER)}, {','.join(str(int(s)) for s in ACTIVE_STATUSES)})"
    " GROUP BY project_id"
)
_HELD = [int(s) for s in lifecycle.HELD_STATUSES]  # jobs under an executor's lease
_HELD_SQL = ",".join(str(s) for s in _HELD)


class QueueStore(AgentRows, ExchangeRows):
    def __init__(self, db: Database, max_infra_retries: int = 3) -> None:
        self.db = db
        # re-runs after infrastructure faults a job may have (settings.max_infrastructure_retries)
        self.max_infra_retries = max_infra_retries
        # when (time.monotonic()) the last claim that found nothing queued at all began its read
        self.nothing_queued_at = float("-inf")
        # the last claim found at most EVENTS_WITH_CLAIM jobs queued, of one project (claim's guess)
        self._few_queued = True

    def _writes(self, conn: Connection, now: float, executor_id: str | None = None) -> StatusWrites:
        return StatusWrites(self.db, conn, now, executor_id, self.max_infra_retries)

    # -- admission ------------------------------------------------------------------------------

    def admit(self, now: float, chunk: int) -> int:
        """Move held jobs to SUBMITTED_TO_PROVIDER where vCPU limits allow. Returns how many.

        Jobs of projects with no limit at all are admitted at submission; this handles the rest,
        and any job a retry or a removed limit sent back.
        """
        with self.db.read(snapshot=False) as conn:  # the common case: nothing held, no write lock
            if not self._projects_with(conn, S.SUBMITTED_TO_RESCALE):
                return 0
        with self.db.write() as conn:
            held_projects = self._projects_with(conn, S.SUBMITTED_TO_RESCALE)
            if not held_projects:
                return 0
            limits = load_limits(conn, held_projects)
            free = [p for p in held_projects if limits.unlimited(p)]
            admitted = [job.job_id for job in self._queued(conn, S.SUBMITTED_TO_RESCALE, free, chunk)]
            limited = [p for p in held_projects if not limits.unlimited(p)]
            if limited:
                admitted.extend(self._admit_limited(conn, limited, limits, chunk))
            writes = self._writes(conn, now)
            for job in writes.load_ids(admitted):
                writes.admit(job)  # a job no longer held is left alone
            return writes.flush()

    def _admit_limited(self, conn: Connection, limited: list[str], limits: Limits, chunk: int) -> list[int]:
        used = self._vcpus_by_project(conn, LIMITED_STATUSES)
        admitted: list[int] = []
        by_workspace: dict[str, list[str]] = defaultdict(list)
        for project in limited:
            by_workspace[limits.workspace_of.get(project, "")].append(project)
        for workspace_id, project_ids in by_workspace.items():
            ws_used = self._workspace_vcpus(conn, workspace_id)
            held = self._queued(conn, S.SUBMITTED_TO_RESCALE, project_ids, chunk)
            admitted.extend(
                policy.admit(
                    held,
                    used,
                    {p: policy.effective_limit(limits.by_project.get(p, [])) for p in project_ids},
                    ws_used,
                    limits.workspace_limits.get(workspace_id),
                )
            )
        return admitted

    def _workspace_vcpus(self, conn: Connection, workspace_id: str) -> int:
        stmt = (
            select(func.coalesce(func.sum(job_counters.c.vcpus), 0))
            .select_from(job_counters.join(projects, projects.c.id == job_counters.c.project_id))
            .where(
                and_(
                    projects.c.workspace_id == workspace_id,
                    job_counters.c.status.in_([int(s) for s in LIMITED_STATUSES]),
                )
            )
        )
        return int(conn.execute(stmt).scalar_one())

    def _queued(
        self,
        conn: Connection,
        status: JobStatus,
        project_ids: Sequence[str],
        limit: int,
        extra: str = "",
        params: Sequence[Any] = (),
    ) -> list[policy.QueuedJob]:
        """Jobs of each project in queue order (priority, then age): one index range scan each."""
        out: list[policy.QueuedJob] = []
        cur = self.db.cursor(conn)
        lock = "" if self.db.is_sqlite else " FOR UPDATE SKIP LOCKED"
        # the status a literal: PostgreSQL's queue index is partial (tables.py)
        sql = self.db.sql(
            f"SELECT id, project_id, priority, vcpus, memory_mb FROM jobs WHERE status = {int(status)}"
            f" AND project_id = ?{extra} ORDER BY priority, id LIMIT ?{lock}"
        )
        for project in project_ids:
            if len(out) >= limit:
                break
            cur.execute(sql, (project, *params, limit - len(out)))
            out.extend(policy.QueuedJob(*row) for row in cur.fetchall())
        return out

    def _projects_with(self, conn: Connection, status: JobStatus) -> list[str]:
        cur = self.db.cursor(conn)
        cur.execute(
            self.db.sql("SELECT DISTINCT project_id FROM job_counters WHERE status = ? AND count > 0"),
            (int(status),),
        )
        return [row[0] for row in cur.fetchall()]

    def _queued_and_running(self, conn: Connection) -> tuple[list[str], dict[str, int], int]:
        """The claim's first read, one statement: the projects with jobs queued for executors,
        the vCPUs each project's running jobs hold (``_projects_with`` and
        ``_vcpus_by_project`` of ACTIVE_STATUSES at once, from the counters), and how many
        jobs are queued in all."""
        cur = self.db.cursor(conn)
        # Not pipelined with its BEGIN: psycopg's pipeline costs ~0.1 ms of Python, more than
        # the round trip it saves (55 µs here); it pays off only where it merges several
        # (the claim's guess, below)
        cur.execute(_COUNTERS)
        return self._counted(cur)

    @staticmethod
    def _counted(cur: Any) -> tuple[list[str], dict[str, int], int]:
        projects, running, total = [], {}, 0
        for project, waiting, vcpus in cur.fetchall():
            if waiting and waiting > 0:
                projects.append(project)
                total += int(waiting)
            running[project] = int(vcpus or 0)
        return projects, running, total

    def _vcpus_by_project(self, conn: Connection, statuses: Sequence[JobStatus]) -> dict[str, int]:
        cur = self.db.cursor(conn)
        wanted = ",".join(str(int(s)) for s in statuses)
        cur.execute(
            f"SELECT project_id, SUM(vcpus) FROM job_counters WHERE status IN ({wanted}) GROUP BY project_id"
        )
        return {row[0]: int(row[1] or 0) for row in cur.fetchall()}

    # -- executors ------------------------------------------------------------------------------

    # -- explaining (GET …/jobs/{j}/explain) ----------------------------------------------------

    def limits_of(self, project_id: str) -> tuple[int, int | None, int, int | None]:
        """The vCPUs the project's and its workspace's admitted jobs hold, and their limits."""
        with self.db.read() as conn:
            limits = load_limits(conn, [project_id])
            workspace_id = limits.workspace_of.get(project_id, "")
            used = self._vcpus_by_project(conn, LIMITED_STATUSES).get(project_id, 0)
            return (
                used,
                policy.effective_limit(limits.by_project.get(project_id, [])),
                self._workspace_vcpus(conn, workspace_id),
                limits.workspace_limits.get(workspace_id),
            )

    def queue_ahead(
        self, project_id: str, status: JobStatus, priority: int, job_id: int, cap: int
    ) -> tuple[int, int]:
        """Jobs of the project before ``job_id`` in its queue (priority, then id), and those of a
        higher priority: ranges of ix_jobs_queue, each counted up to ``cap + 1``."""
        sql = (
            "SELECT COUNT(*) FROM (SELECT 1 FROM jobs"
            f" WHERE status = {int(status)} AND project_id = ? AND {{}} LIMIT ?) AS t"
        )
        with self.db.read() as conn:
            cur = self.db.cursor(conn)
            counts = []
            for cond, extra in (
                ("(priority < ? OR (priority = ? AND id < ?))", (priority, priority, job_id)),
                ("priority < ?", (priority,)),
            ):
                cur.execute(self.db.sql(sql.format(cond)), (project_id, *extra, cap + 1))
                counts.append(int(cur.fetchone()[0]))
        return counts[0], counts[1]

    def executor_offers(self, heard_since: float) -> list[ExecutorOffer]:
        """The executors that registered and have been heard from since ``heard_since``."""
        with self.db.read() as conn:
            return executor_offers_in(conn, heard_since)

    def register(
        self,
        executor_id: str,
        incarnation: str,
        region: str,
        architectures: list[str],
        capacity: Capacity,
        now: float,
        may_have_started: Collection[tuple[int, int]] = (),
        version: str | None = None,
        host: str | None = None,
        adopted: Collection[tuple[int, int]] = (),
        lease_seconds: float = 0.0,
    ) -> Applied:
        """Record an executor (re)start. Jobs its previous incarnation held are recovered:
        ``may_have_started`` holds the (job, attempt) pairs it may have started (its markers).
        ``adopted`` ones are still in its runtime's hands: not recovered, their lease renewed
        (``lifecycle.adopt``). Returns what the recovery changed."""
        with self.db.write() as conn:
            values = {
                "region": region,
                "incarnation": incarnation,
                "architectures": architectures,
                "vcpus": capacity.vcpus,
                "memory_mb": capacity.memory_mb,
                "last_heartbeat": now,
                "version": version,
                "host": host,
            }
            stmt = self.db.upsert(executors).values(id=executor_id, **values)
            conn.execute(stmt.on_conflict_do_update(index_elements=["id"], set_=values))
            writes = self._writes(conn, now)
            lost = writes.load(f"j.executor_id = ? AND j.status IN ({_HELD_SQL})", (executor_id,))
            # EveryAttempt: the executor cannot say (its journal lost its tail in a machine crash)
            rebooted = isinstance(may_have_started, EveryAttempt)
            marked = may_have_started if rebooted else set(may_have_started)
            cause = "the executor restarted after its machine did" if rebooted else "the executor restarted"
            kept = set(adopted)
            renewed: list[int] = []
            lease = lifecycle.lease_until(now, lease_seconds)
            for job in lost:
                if (job.id, job.attempt) in kept and lifecycle.adopt(
                    writes.record(job), executor_id, job.attempt, lease
                ):
                    renewed.append(job.id)
                    continue
                writes.lose_executor(job, cause, (job.id, job.attempt) in marked)
            writes.flush()
            if renewed:
                conn.execute(jobs.update().where(jobs.c.id.in_(renewed)).values(lease_expires_at=lease))
        return writes.applied()

    def expire_leases(self, now: float) -> Applied:
        """Recover jobs whose executor stopped renewing its lease; returns what that changed."""
        with self.db.write() as conn:
            writes = self._writes(conn, now)
            # an agent's jobs are recovered by its liveness clock instead (lose_agents)
            for job in writes.load(
                f"j.status IN ({_HELD_SQL}) AND j.lease_expires_at < ?"
                " AND (j.executor_id IS NULL"
                " OR j.executor_id NOT IN (SELECT id FROM executors WHERE kind = 'agent'))",
                (now,),
            ):
                # nobody can say whether it started: it is treated as if it may have
                writes.lose_executor(job, "the executor stopped responding (lease expired)", None)
            writes.flush()
        return writes.applied()

    def claim(
        self,
        executor_id: str,
        region: str,
        architectures: Sequence[str],
        free: Capacity,
        max_jobs: int,
        lease_seconds: float,
        now: float,
        max_timeout_s: int | None = None,
        agent: bool = False,
        events: dict[int, str] | None = None,
    ) -> list[JobState]:
        """Match queued jobs to an executor's free capacity; returns them, now RUNNABLE.
        ``max_timeout_s``: only jobs whose execTimeoutSeconds is at most this (or unset).
        ``agent``: the executor is an agent: nothing for it once lost or draining (agent_rows.py).
        ``events``: filled with the events of the function calls claimed (by job id) when the
        claim takes at most EVENTS_WITH_CLAIM jobs: read with the rows, in their round trip."""
        if max_jobs <= 0 or free.vcpus <= 0 or not architectures:
            return []
        began = time.monotonic()
        # An idle fleet's common case, nothing queued, takes no write lock on SQLite. PostgreSQL's
        # write transaction locks nothing until it writes: the read would only repeat its first
        # statement, a transaction (and 3-4 round trips) more in every claim.
        if self.db.is_sqlite:
            with self.db.read(snapshot=False) as conn:
                if not self._projects_with(conn, S.SUBMITTED_TO_PROVIDER):
                    self.nothing_queued_at = began
                    return []
        # Every job takes at least one vCPU, so no project can contribute more candidates.
        per_project = min(max_jobs, free.vcpus)
        arch_sql = ",".join("?" * len(architectures))
        extra = f" AND region = ? AND architecture IN ({arch_sql}){self._timeout_sql(max_timeout_s)}"
        params = (region, *architectures) + (() if max_timeout_s is None else (max_timeout_s,))
        with self.db.write() as conn:
            writes = self._writes(conn, now, executor_id)
            loaded: dict[int, JobState] = {}
            guessed: dict[int, str] | None = None if events is None else {}
            guess: list[policy.QueuedJob] | None = None
            if self._few_queued and not self.db.is_sqlite and not agent:
                # The last claim found a few jobs of one project queued, or none: a lone call's
                # claim, likely. Its counters, and the queue's head over all projects with its
                # rows and events, in one round trip with BEGIN (two round trips less); used
                # when one project has a few jobs queued, as _candidates_and_rows would read them.
                counters = self.db.cursor(conn)
                guess = self._candidates_and_rows(
                    conn,
                    writes,
                    None,
                    min(per_project, EVENTS_WITH_CLAIM),
                    extra,
                    params,
                    guessed,
                    loaded,
                    counters,
                )
                queued_projects, running, waiting = self._counted(counters)
            else:
                queued_projects, running, waiting = self._queued_and_running(conn)
            # (one project at most: the guess locks the head's rows, which with several
            # projects queued a claim may not take: another executor would skip them)
            self._few_queued = waiting <= EVENTS_WITH_CLAIM and len(queued_projects) <= 1
            if not queued_projects:
                self.nothing_queued_at = began
                return []
            if agent and not self.may_claim(conn, executor_id):
                return []
            # A few jobs queued in all (a lone call's latency): one project's queue head, its
            # rows and its calls' events in one round trip. A busy queue's claims keep the head's
            # one read (the merged statement reads the head twice: PostgreSQL's work per call).
            few = waiting <= EVENTS_WITH_CLAIM
            wanted = events if few else None
            if few and len(queued_projects) == 1 and guess is not None:
                project = queued_projects[0]  # a job of another, queued after the counters' read, waits
                queues = {project: [job for job in guess if job.project_id == project]}
            elif few and len(queued_projects) == 1:
                project = queued_projects[0]
                queues = {
                    project: self._candidates_and_rows(
                        conn, writes, project, per_project, extra, params, wanted, loaded
                    )
                }
            else:
                queues = {
                    project: self._queued(
                        conn, S.SUBMITTED_TO_PROVIDER, [project], per_project, extra, params
                    )
                    for project in queued_projects
                }
            chosen = policy.dispatch(queues, running, free, max_jobs)
            if not chosen:
                return []
            order = {j.job_id: i for i, j in enumerate(chosen)}
            if wanted is not None and guessed:  # the guess's: the events of the jobs claimed
                wanted.update((job_id, event) for job_id, event in guessed.items() if job_id in order)
            missing = [job_id for job_id in order if job_id not in loaded]
            if missing and wanted is None:  # a busy queue, or a row queued meanwhile
                loaded.update((job.id, job) for job in writes.load_ids(missing))
            elif missing and wanted is not None:  # a few jobs of several projects
                cur = self.db.cursor(conn)
                with self.db.pipelined(conn):  # PostgreSQL: the events in the rows' round trip
                    cur.execute(
                        self.db.sql(_EVENTS_OF + self.db.in_ids("j.id")), (self.db.ids_param(missing),)
                    )
                    loaded.update((job.id, job) for job in writes.load_ids(missing))
                wanted.update((int(job_id), str(event)) for job_id, event in cur.fetchall())
            # the executor starts them in this order: keep the one dispatch chose
            claimed = [loaded[job_id] for job_id in order if job_id in loaded]
            writes.claim(claimed, executor_id, lifecycle.lease_until(now, lease_seconds))
            writes.flush(commit=True)
            return claimed

    def _candidates_and_rows(
        self,
        conn: Connection,
        writes: StatusWrites,
        project: str | None,
        limit: int,
        extra: str,
        params: Sequence[Any],
        events: dict[int, str] | None,
        loaded: dict[int, JobState],
        counters: Any = None,
    ) -> list[policy.QueuedJob]:
        """A project's queue head (``_queued``; ``project`` None: over all projects), its rows
        loaded and locked for the writes, and (``events`` given) its function calls' events:
        one round trip on PostgreSQL, with the claim's counters read first on ``counters``
        if given. The load selects the same head again; its own locks keep the rows the first
        statement took."""
        lock = "" if self.db.is_sqlite else " FOR UPDATE SKIP LOCKED"
        of_project = "" if project is None else " AND project_id = ?"
        where = f"status = {int(S.SUBMITTED_TO_PROVIDER)}{of_project}{extra} ORDER BY priority, id LIMIT ?"
        head = f"j.id IN (SELECT id FROM jobs WHERE {where}{lock})"
        args = (*(() if project is None else (project,)), *params, limit)
        cur, other = self.db.cursor(conn), self.db.cursor(conn)
        with self.db.pipelined(conn):
            if counters is not None:
                counters.execute(_COUNTERS)
            cur.execute(
                self.db.sql(
                    f"SELECT id, project_id, priority, vcpus, memory_mb FROM jobs WHERE {where}{lock}"
                ),
                args,
            )
            if events is not None:
                other.execute(self.db.sql(_EVENTS_OF + head), args)
            loaded.update((job.id, job) for job in writes.load(head, args))
        queue = [policy.QueuedJob(*row) for row in cur.fetchall()]
        if events is not None:
            events.update((int(job_id), str(event)) for job_id, event in other.fetchall())
        return queue

    def _timeout_sql(self, max_timeout_s: int | None) -> str:
        """A claim filter on the batch's execTimeoutSeconds (a Slurm pilot's walltime left)."""
        if max_timeout_s is None:
            return ""
        timeout = (
            "CAST(json_extract(b.request, '$.htcJobDefinition.execTimeoutSeconds') AS INTEGER)"
            if self.db.is_sqlite
            else "(b.request->'htcJobDefinition'->>'execTimeoutSeconds')::bigint"
        )
        return f" AND batch_id IN (SELECT b.id FROM batches b WHERE COALESCE({timeout}, 0) <= ?)"

    def report(
        self,
        executor_id: str,
        reports: Sequence[AttemptReport],
        now: float,
        results: Sequence[CallResult] = (),
    ) -> Applied:
        """Apply executor reports; stale ones (old attempt, other executor) are ignored.
        ``results``: function calls' results (the embedded executor's), written in the same
        transaction, first: a call that reads as ended has its result, and a failed report
        leaves neither (the executor retries both together).

        Returns what they changed: only the jobs and statuses the store applied, so what counts
        or wakes on it never sees a stale report.
        """
        if not reports and not results:
            return Applied(now, [], [], 0)
        by_job: dict[int, list[AttemptReport]] = defaultdict(list)
        for report in reports:
            by_job[report.job_id].append(report)
        with self.db.write() as conn:
            writes = self._writes(conn, now, executor_id)
            save_in(self.db, conn, results, executor_id)  # not pipelined: see _queued_and_running
            for job in writes.load_ids(list(by_job)):
                writes.report(job, by_job[job.id])  # in the order sent; stale ones change nothing
            writes.flush(commit=True)
        return writes.applied()

    def executor_rows(self, with_leases: bool) -> tuple[list[Any], dict[str, int]]:
        """Every registered executor's row (by id) and, ``with_leases``, how many jobs each holds
        (executors holding none are left out)."""
        with self.db.read() as conn:
            rows: list[Any] = list(conn.execute(select(executors).order_by(executors.c.id)))
            if not rows or not with_leases:
                return rows, {}
            # Ranges of ix_jobs_executor (executor, status), one per executor and active status:
            # a job keeps its executor id once done, so the index holds every job ever run.
            stmt = (
                select(jobs.c.executor_id, func.count())
                .where(
                    and_(
                        jobs.c.executor_id.in_([r.id for r in rows]),
                        jobs.c.status.in_([int(s) for s in ACTIVE_STATUSES]),
                    )
                )
                .group_by(jobs.c.executor_id)
            )
            return rows, {row[0]: int(row[1]) for row in conn.execute(stmt)}

    # -- the dashboard's last hour (domain/throughput.py; every flush adds to it) ------------------

    def hour(self, now: float, project_ids: Collection[str]) -> throughput.Hour:
        """The projects' completions and failures per minute and queue waits over the last hour,
        summed, up to the minute holding ``now`` (the same on every server)."""
        if not project_ids:
            return throughput.hour(now, ())
        t = throughput_minutes
        stmt = (
            select(t.c.minute, t.c.bucket, func.sum(t.c.count))
            .where(t.c.minute >= throughput.first_minute(now), t.c.project_id.in_(list(project_ids)))
            .group_by(t.c.minute, t.c.bucket)
        )
        with self.db.read() as conn:
            rows = [(int(m), int(b), int(n)) for m, b, n in conn.execute(stmt)]
        return throughput.hour(now, rows)

    def prune_hour(self, now: float) -> int:
        """Delete the rows that left the last hour; returns how many."""
        with self.db.write() as conn:
            gone = conn.execute(
                throughput_minutes.delete().where(throughput_minutes.c.minute < throughput.first_minute(now))
            )
        return int(gone.rowcount or 0)

    def heartbeat(
        self, executor_id: str, held: Sequence[tuple[int, int]], lease_seconds: float, now: float
    ) -> list[tuple[int, int]]:
        """Renew leases; returns the (job, attempt) pairs the executor must stop (cancelled or lost)."""
        with self.db.write() as conn:
            conn.execute(executors.update().where(executors.c.id == executor_id).values(last_heartbeat=now))
            conn.execute(
                jobs.update()
                .where(and_(jobs.c.executor_id == executor_id, text(f"jobs.status IN ({_HELD_SQL})")))
                .values(lease_expires_at=lifecycle.lease_until(now, lease_seconds))
            )
            if not held:
                return []
            current = {
                row.id: JobRecord(row.id, row.status, row.attempt, executor_id=row.executor_id)
                for row in conn.execute(
                    select(jobs.c.id, jobs.c.attempt, jobs.c.status, jobs.c.executor_id).where(
                        jobs.c.id.in_([job_id for job_id, _ in held])
                    )
                )
            }
        return [
            (job_id, attempt)
            for job_id, attempt in held
            if not lifecycle.still_holds(executor_id, attempt, current.get(job_id))
        ]

    # -- agents (htc agent over HTTP) -------------------------------------------------------------

    def register_agent(
        self,
        agent: AgentInfo,
        now: float,
        lease_seconds: float,
        running: Collection[tuple[int, int]],
        may_have_started: Collection[tuple[int, int]],
        binding: TokenBinding | None = None,
    ) -> tuple[Applied, list[tuple[int, int]]]:
        """Record an agent's (re)start or re-register. The attempts it still runs (``running``)
        and the store still gives it stay its own, their leases renewed; the others it held are
        recovered (``may_have_started``: which of those it may have started; ``EveryAttempt``:
        all of them). Returns what the recovery changed and the attempts of ``running`` it must
        kill (no longer its own).
        ``binding``: the agent token it calls with, bound to it here (store/agent_rows.py)."""
        keep = set(running)
        with self.db.write() as conn:
            if binding is not None:  # refused before anything is written
                check_binding(self.db, conn, agent.agent_id, binding)
            values = {
                "region": agent.region,
                "incarnation": agent.incarnation,
                "architectures": list(agent.architectures),
                "vcpus": agent.capacity.vcpus,
                "memory_mb": agent.capacity.memory_mb,
                "last_heartbeat": now,
                "version": agent.version[:64] or None,
                "host": agent.host[:255] or None,
                "kind": "agent",
                "labels": dict(agent.labels),
                "runtime": agent.runtime[:32] or None,
                "lost_at": None,
                "draining": False,
            }
            if binding is not None:
                values["token_hash"] = binding.token_hash
            stmt = self.db.upsert(executors).values(id=agent.agent_id, **values)
            conn.execute(stmt.on_conflict_do_update(index_elements=["id"], set_=values))
            writes = self._writes(conn, now)
            kept: set[tuple[int, int]] = set()
            # EveryAttempt: its journal cannot say (it lost its tail in a crash of its machine)
            rebooted = isinstance(may_have_started, EveryAttempt)
            marked = may_have_started if rebooted else set(may_have_started)
            cause = "the agent restarted after its machine did" if rebooted else "the agent restarted"
            for job in writes.load(f"j.executor_id = ? AND j.status IN ({_HELD_SQL})", (agent.agent_id,)):
                if (job.id, job.attempt) in keep:
                    kept.add((job.id, job.attempt))
                else:
                    writes.lose_executor(job, cause, (job.id, job.attempt) in marked)
            writes.flush()
            if kept:
                conn.execute(
                    jobs.update()
                    .where(and_(jobs.c.executor_id == agent.agent_id, jobs.c.status.in_(_HELD)))
                    .values(lease_expires_at=lifecycle.lease_until(now, lease_seconds))
                )
        return writes.applied(), [key for key in running if key not in kept]

    def agent_state(self, agent_id: str, incarnation: str) -> AgentState:
        """An agent's exchange, read only: why it must register again (None: it need not), its
        region, its architectures, the hash of the token it is bound to and whether it drains.
        Its heartbeat is written later (``agent_beats``)."""
        with self.db.read() as conn:
            row = conn.execute(
                select(
                    executors.c.incarnation,
                    executors.c.lost_at,
                    executors.c.region,
                    executors.c.architectures,
                    executors.c.kind,
                    executors.c.token_hash,
                    executors.c.draining,
                ).where(executors.c.id == agent_id)
            ).first()
        if row is None or row.kind != "agent":
            return AgentState("unknown agent", "", [], None, False)
        bound, draining = row.token_hash, bool(row.draining)
        if row.lost_at is not None:
            return AgentState("agent lost", row.region, [], bound, draining)
        if row.incarnation != incarnation:
            return AgentState("stale incarnation", row.region, [], bound, draining)
        return AgentState(None, row.region, list(row.architectures), bound, draining)

    def agent_beats(self, agent_ids: Collection[str], heard: float) -> None:
        """The agents' coalesced heartbeats: each heard at ``heard`` or later (the earliest of
        the batch); their liveness refreshed, one statement for the whole batch. Their held
        jobs' leases are not renewed: an agent's jobs are recovered by its liveness clock
        (``lose_agents``), never by lease expiry (``expire_leases`` skips them), and renewing
        them rewrote every held job's row each second, under the locks the groups wait for."""
        if not agent_ids:
            return
        ids = sorted(agent_ids)
        with self.db.write() as conn:
            self._lock_agents_in_order(conn, ids)
            conn.execute(
                executors.update()
                .where(and_(executors.c.id.in_(ids), executors.c.last_heartbeat < heard))
                .values(last_heartbeat=heard)
            )

    def records(self, job_ids: Collection[int]) -> dict[int, JobRecord]:
        """The lifecycle records of these jobs, as committed."""
        if not job_ids:
            return {}
        with self.db.read() as conn:
            rows = conn.execute(
                select(jobs.c.id, jobs.c.attempt, jobs.c.status, jobs.c.executor_id, jobs.c.cancelled).where(
                    jobs.c.id.in_(list(job_ids))
                )
            ).all()
        return {
            r.id: JobRecord(r.id, r.status, r.attempt, executor_id=r.executor_id, cancelled=bool(r.cancelled))
            for r in rows
        }

    def log_keys(self, job_ids: Collection[int]) -> dict[int, tuple[str, str, int]]:
        """Where each job's logs live: (task id, parent job id, array index)."""
        with self.db.read() as conn:
            rows = conn.execute(
                select(jobs.c.id, jobs.c.task_id, batches.c.parent_job_id, jobs.c.idx)
                .select_from(jobs.join(batches, batches.c.id == jobs.c.batch_id))
                .where(jobs.c.id.in_(list(job_ids)))
            ).all()
        return {r.id: (r.task_id, r.parent_job_id, r.idx) for r in rows}

    def last_agent_heartbeat(self) -> float | None:
        """When any agent not marked lost was last heard from, through any server."""
        query = select(func.max(executors.c.last_heartbeat)).where(
            and_(executors.c.kind == "agent", executors.c.lost_at.is_(None))
        )
        with self.db.read() as conn:
            value = conn.execute(query).scalar()
        return None if value is None else float(value)

    def _lock_agents_in_order(self, conn: Connection, agent_ids: Collection[str]) -> None:
        """Lock these agents' rows by id, the order a group commit takes them in
        (store/exchanges.py): an ``UPDATE … WHERE id IN (…)`` locks in the order its plan visits
        the rows (on disk), which would let it and a group each hold a row the other waits for.
        SQLite's one write lock needs none of this."""
        if self.db.is_sqlite or not agent_ids:
            return
        conn.execute(
            select(executors.c.id)
            .where(executors.c.id.in_(sorted(agent_ids)))
            .order_by(executors.c.id)
            .with_for_update()
        )

    def lose_agents(self, silent_since: float, now: float) -> tuple[Applied, list[str]]:
        """Mark lost the agents not heard from since ``silent_since``, and recover their jobs
        (nobody can say whether they started: the crash rule treats them as if they may have)."""
        silent = select(executors.c.id).where(
            and_(
                executors.c.kind == "agent",
                executors.c.lost_at.is_(None),
                executors.c.last_heartbeat < silent_since,
            )
        )
        with self.db.read() as conn:  # the common case: nobody silent, no write lock needed
            if conn.execute(silent.limit(1)).first() is None:
                return Applied(now, [], [], 0), []
        with self.db.write() as conn:
            lost = list(conn.execute(silent).scalars())
            if not lost:
                return Applied(now, [], [], 0), []
            self._lock_agents_in_order(conn, lost)
            conn.execute(executors.update().where(executors.c.id.in_(lost)).values(lost_at=now))
            writes = self._writes(conn, now)
            marks = ",".join("?" * len(lost))
            for job in writes.load(f"j.executor_id IN ({marks}) AND j.status IN ({_HELD_SQL})", lost):
                writes.lose_executor(job, "the agent stopped responding (lost)", None)
            writes.flush()
        return writes.applied(), lost


class AgentInfo(NamedTuple):
    """What an agent says of itself when it registers."""

    agent_id: str
    incarnation: str
    region: str
    architectures: Sequence[str]
    capacity: Capacity
    labels: dict[str, str]
    version: str
    host: str
    runtime: str


class Limits:
    """The vCPU limits that apply to a set of projects."""

    def __init__(
        self,
        workspace_of: dict[str, str],
        workspace_limits: dict[str, int | None],
        by_project: dict[str, list[int]],
    ) -> None:
        self.workspace_of = workspace_of
        self.workspace_limits = workspace_limits
        self.by_project = by_project

    def unlimited(self, project_id: str) -> bool:
        workspace = self.workspace_of.get(project_id, "")
        return not self.by_project.get(project_id) and self.workspace_limits.get(workspace) is None


_OFFERS = select(
    executors.c.region, executors.c.architectures, executors.c.vcpus, executors.c.memory_mb
).where(executors.c.last_heartbeat >= bindparam("since"))


def executor_offers_in(conn: Connection, heard_since: float) -> list[ExecutorOffer]:
    """``QueueStore.executor_offers`` inside a transaction the caller holds."""
    return offers_of(conn.execute(_OFFERS, {"since": heard_since}).all())


def offers_of(rows: Sequence[Any]) -> list[ExecutorOffer]:
    """The offers of rows of ``_OFFERS``."""
    return [ExecutorOffer(r.region, tuple(r.architectures), Capacity(r.vcpus, r.memory_mb)) for r in rows]


def load_limits(conn: Connection, project_ids: Sequence[str]) -> Limits:
    """The project and workspace vCPU limits that apply to ``project_ids``."""
    project_rows = conn.execute(
        select(projects.c.id, projects.c.workspace_id).where(projects.c.id.in_(project_ids))
    ).all()
    workspace_of = {row.id: row.workspace_id for row in project_rows}
    ws_limits = dict(
        conn.execute(
            select(workspaces.c.id, workspaces.c.vcpu_limit).where(
                workspaces.c.id.in_(set(workspace_of.values()))
            )
        ).all()
    )
    by_project: dict[str, list[int]] = defaultdict(list)
    for row in conn.execute(
        select(project_limits.c.project_id, project_limits.c.vcpus).where(
            project_limits.c.project_id.in_(project_ids)
        )
    ):
        by_project[row.project_id].append(row.vcpus)
    return Limits(workspace_of, ws_limits, by_project)
