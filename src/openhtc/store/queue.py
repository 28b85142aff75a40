"""The executor side of the store: admission, claiming, reports, heartbeats and recovery.

Claims and reports are batched: one transaction moves many jobs. Every report carries the
attempt number it belongs to, and a report for an attempt the job is no longer on, or from an
executor that no longer holds it, is ignored (fencing). A job whose executor vanished is
recovered when its lease expires or when that executor registers again.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection, Row, and_, func, select, true

from openhtc.domain.enums import ACTIVE_STATUSES, LIMITED_STATUSES, FailureCode, JobStatus
from openhtc.domain.models import AttemptReport, Capacity
from openhtc.scheduler import policy
from openhtc.store.db import Database
from openhtc.store.tables import batches, executors, job_counters, jobs, project_limits, projects, workspaces
from openhtc.store.transitions import STATE_COLUMNS, Change, apply

ACTIVE = [int(s) for s in ACTIVE_STATUSES]
S = JobStatus


class QueueStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    # -- admission ------------------------------------------------------------------------------

    def admit(self, now: float, chunk: int) -> int:
        """Move held jobs to SUBMITTED_TO_PROVIDER where vCPU limits allow. Returns how many."""
        with self.db.write() as conn:
            held_projects = self._projects_with(conn, S.SUBMITTED_TO_RESCALE)
            if not held_projects:
                return 0
            project_rows = conn.execute(
                select(projects.c.id, projects.c.workspace_id).where(projects.c.id.in_(held_projects))
            ).all()
            workspace_of = {row.id: row.workspace_id for row in project_rows}
            ws_limits = dict(
                conn.execute(
                    select(workspaces.c.id, workspaces.c.vcpu_limit).where(
                        workspaces.c.id.in_(set(workspace_of.values()))
                    )
                ).all()
            )
            limits_by_project: dict[str, list[int]] = defaultdict(list)
            for row in conn.execute(
                select(project_limits.c.project_id, project_limits.c.vcpus).where(
                    project_limits.c.project_id.in_(held_projects)
                )
            ):
                limits_by_project[row.project_id].append(row.vcpus)
            free_projects = [
                p
                for p in held_projects
                if not limits_by_project.get(p) and ws_limits.get(workspace_of.get(p, "")) is None
            ]
            admitted_ids: list[int] = []
            if free_projects:
                admitted_ids.extend(job.job_id for job in self._held(conn, free_projects, chunk))
            limited = [p for p in held_projects if p not in free_projects]
            if limited:
                admitted_ids.extend(
                    self._admit_limited(conn, limited, workspace_of, ws_limits, limits_by_project, chunk)
                )
            if not admitted_ids:
                return 0
            rows = conn.execute(select(*STATE_COLUMNS).where(jobs.c.id.in_(admitted_ids))).all()
            apply(
                self.db,
                conn,
                [
                    Change(
                        row,
                        S.SUBMITTED_TO_PROVIDER,
                        {},
                        [(S.SUBMITTED_TO_PROVIDER, row.attempt, now, None, None, False)],
                    )
                    for row in rows
                    if row.status == S.SUBMITTED_TO_RESCALE
                ],
                now,
            )
            return len(rows)

    def _admit_limited(
        self,
        conn: Connection,
        limited: list[str],
        workspace_of: dict[str, str],
        ws_limits: dict[str, int | None],
        limits_by_project: dict[str, list[int]],
        chunk: int,
    ) -> list[int]:
        used = self._vcpus_by_project(conn, LIMITED_STATUSES)
        admitted: list[int] = []
        by_workspace: dict[str, list[str]] = defaultdict(list)
        for project in limited:
            by_workspace[workspace_of.get(project, "")].append(project)
        for workspace_id, project_ids in by_workspace.items():
            ws_projects = [p for p, w in workspace_of.items() if w == workspace_id]
            ws_used = sum(used.get(p, 0) for p in ws_projects) + self._vcpus_of_other_projects(
                conn, workspace_id, set(ws_projects)
            )
            held = self._held(conn, project_ids, chunk)
            admitted.extend(
                policy.admit(
                    held,
                    used,
                    {p: policy.effective_limit(limits_by_project.get(p, [])) for p in project_ids},
                    ws_used,
                    ws_limits.get(workspace_id),
                )
            )
        return admitted

    def _vcpus_of_other_projects(self, conn: Connection, workspace_id: str, known: set[str]) -> int:
        stmt = (
            select(func.coalesce(func.sum(job_counters.c.vcpus), 0))
            .select_from(job_counters.join(projects, projects.c.id == job_counters.c.project_id))
            .where(
                and_(
                    projects.c.workspace_id == workspace_id,
                    job_counters.c.status.in_([int(s) for s in LIMITED_STATUSES]),
                    job_counters.c.project_id.not_in(known) if known else true(),
                )
            )
        )
        return int(conn.execute(stmt).scalar_one())

    def _held(self, conn: Connection, project_ids: Sequence[str], limit: int) -> list[policy.QueuedJob]:
        """Held jobs of each project in queue order, one index range scan per project."""
        held: list[policy.QueuedJob] = []
        for project in project_ids:
            if len(held) >= limit:
                break
            stmt = (
                select(jobs.c.id, jobs.c.project_id, jobs.c.priority, jobs.c.vcpus, jobs.c.memory_mb)
                .where(and_(jobs.c.status == int(S.SUBMITTED_TO_RESCALE), jobs.c.project_id == project))
                .order_by(jobs.c.priority, jobs.c.id)
                .limit(limit - len(held))
            )
            held.extend(
                policy.QueuedJob(r.id, r.project_id, r.priority, r.vcpus, r.memory_mb) for r in conn.execute(stmt)
            )
        return held

    def _projects_with(self, conn: Connection, status: JobStatus) -> list[str]:
        stmt = (
            select(job_counters.c.project_id)
            .where(and_(job_counters.c.status == int(status), job_counters.c.count > 0))
            .group_by(job_counters.c.project_id)
        )
        return [row[0] for row in conn.execute(stmt)]

    def _vcpus_by_project(self, conn: Connection, statuses: Sequence[JobStatus]) -> dict[str, int]:
        stmt = (
            select(job_counters.c.project_id, func.sum(job_counters.c.vcpus))
            .where(job_counters.c.status.in_([int(s) for s in statuses]))
            .group_by(job_counters.c.project_id)
        )
        return {row[0]: int(row[1] or 0) for row in conn.execute(stmt)}

    # -- executors ------------------------------------------------------------------------------

    def register(
        self,
        executor_id: str,
        incarnation: str,
        region: str,
        architectures: list[str],
        capacity: Capacity,
        now: float,
    ) -> int:
        """Record an executor (re)start. Jobs its previous incarnation held are recovered."""
        with self.db.write() as conn:
            stmt = self.db.upsert(executors).values(
                id=executor_id,
                region=region,
                incarnation=incarnation,
                architectures=architectures,
                vcpus=capacity.vcpus,
                memory_mb=capacity.memory_mb,
                last_heartbeat=now,
            )
            conn.execute(
                stmt.on_conflict_do_update(
                    index_elements=["id"],
                    set_={
                        "region": region,
                        "incarnation": incarnation,
                        "architectures": architectures,
                        "vcpus": capacity.vcpus,
                        "memory_mb": capacity.memory_mb,
                        "last_heartbeat": now,
                    },
                )
            )
            rows = self._locked_state(
                conn, and_(jobs.c.executor_id == executor_id, jobs.c.status.in_(ACTIVE))
            )
            return self._fail_attempts(conn, rows, "The executor restarted while the job was running", now)

    def expire_leases(self, now: float) -> int:
        """Recover jobs whose executor stopped renewing its lease."""
        with self.db.write() as conn:
            rows = self._locked_state(conn, and_(jobs.c.status.in_(ACTIVE), jobs.c.lease_expires_at < now))
            return self._fail_attempts(conn, rows, "The executor stopped responding (lease expired)", now)

    def _fail_attempts(self, conn: Connection, rows: Sequence[Row[Any]], reason: str, now: float) -> int:
        reports = {
            row.id: [
                AttemptReport(
                    row.id,
                    row.attempt,
                    S.FAILED,
                    now,
                    None,
                    FailureCode.ErrorInfrastructureFault.value,
                    reason,
                )
            ]
            for row in rows
        }
        apply(self.db, conn, self._changes(rows, reports, None, now), now)
        return len(rows)

    def claim(
        self,
        executor_id: str,
        region: str,
        architectures: Sequence[str],
        free: Capacity,
        max_jobs: int,
        lease_seconds: float,
        now: float,
    ) -> list[tuple[Row[Any], Row[Any]]]:
        """Match queued jobs to an executor's free capacity; returns (job, batch) rows, now RUNNABLE."""
        if max_jobs <= 0 or free.vcpus <= 0:
            return []
        with self.db.write() as conn:
            queued_projects = self._projects_with(conn, S.SUBMITTED_TO_PROVIDER)
            if not queued_projects:
                return []
            running = self._vcpus_by_project(conn, ACTIVE_STATUSES)
            # Every job takes at least one vCPU, so no project can contribute more candidates.
            per_project = min(max_jobs, free.vcpus)
            queues: dict[str, list[policy.QueuedJob]] = {}
            for project in queued_projects:
                stmt = (
                    select(jobs.c.id, jobs.c.project_id, jobs.c.priority, jobs.c.vcpus, jobs.c.memory_mb)
                    .where(
                        and_(
                            jobs.c.status == int(S.SUBMITTED_TO_PROVIDER),
                            jobs.c.project_id == project,
                            jobs.c.region == region,
                            jobs.c.architecture.in_(list(architectures)),
                        )
                    )
                    .order_by(jobs.c.priority, jobs.c.id)
                    .limit(per_project)
                )
                if not self.db.is_sqlite:
                    stmt = stmt.with_for_update(skip_locked=True)
                queues[project] = [
                    policy.QueuedJob(r.id, r.project_id, r.priority, r.vcpus, r.memory_mb)
                    for r in conn.execute(stmt)
                ]
            chosen = policy.dispatch(queues, running, free, max_jobs)
            if not chosen:
                return []
            rows = conn.execute(
                select(jobs).where(jobs.c.id.in_([j.job_id for j in chosen])).order_by(jobs.c.id)
            ).all()
            lease = now + lease_seconds
            apply(
                self.db,
                conn,
                [
                    Change(
                        row,
                        S.RUNNABLE,
                        {"executor_id": executor_id, "lease_expires_at": lease},
                        [(S.RUNNABLE, row.attempt, now, None, None, False)],
                    )
                    for row in rows
                ],
                now,
                executor_id=executor_id,
            )
            batch_rows = {
                b.id: b
                for b in conn.execute(select(batches).where(batches.c.id.in_({r.batch_id for r in rows})))
            }
            return [(row, batch_rows[row.batch_id]) for row in rows]

    def report(self, executor_id: str, reports: Sequence[AttemptReport], now: float) -> int:
        """Apply executor reports; stale ones (old attempt, other executor) are ignored."""
        if not reports:
            return 0
        by_job: dict[int, list[AttemptReport]] = defaultdict(list)
        for report in reports:
            by_job[report.job_id].append(report)
        with self.db.write() as conn:
            rows = self._locked_state(conn, jobs.c.id.in_(list(by_job)))
            fresh = [row for row in rows if row.executor_id == executor_id]
            changes = self._changes(fresh, by_job, executor_id, now)
            apply(self.db, conn, changes, now, executor_id=executor_id)
            return len(changes)

    def heartbeat(
        self, executor_id: str, held: Sequence[tuple[int, int]], lease_seconds: float, now: float
    ) -> list[tuple[int, int]]:
        """Renew leases; returns the (job, attempt) pairs the executor must stop (cancelled or lost)."""
        with self.db.write() as conn:
            conn.execute(executors.update().where(executors.c.id == executor_id).values(last_heartbeat=now))
            conn.execute(
                jobs.update()
                .where(and_(jobs.c.executor_id == executor_id, jobs.c.status.in_(ACTIVE)))
                .values(lease_expires_at=now + lease_seconds)
            )
            if not held:
                return []
            current = {
                row.id: row
                for row in conn.execute(
                    select(jobs.c.id, jobs.c.attempt, jobs.c.status, jobs.c.executor_id).where(
                        jobs.c.id.in_([job_id for job_id, _ in held])
                    )
                )
            }
        stop = []
        for job_id, attempt in held:
            row = current.get(job_id)
            if (
                row is None
                or row.attempt != attempt
                or row.executor_id != executor_id
                or row.status not in ACTIVE
            ):
                stop.append((job_id, attempt))
        return stop

    # -- helpers --------------------------------------------------------------------------------

    def _locked_state(self, conn: Connection, cond: Any) -> Sequence[Any]:
        stmt = (
            select(*STATE_COLUMNS, batches.c.max_retries)
            .select_from(jobs.join(batches, batches.c.id == jobs.c.batch_id))
            .where(cond)
            .order_by(jobs.c.id)
        )
        if not self.db.is_sqlite:
            stmt = stmt.with_for_update(of=jobs)
        return conn.execute(stmt).all()

    def _changes(
        self,
        rows: Sequence[Row[Any]],
        reports: dict[int, list[AttemptReport]],
        executor_id: str | None,
        now: float,
    ) -> list[Change]:
        """Fold each job's reports into one Change, retrying failed attempts when allowed."""
        changes = []
        for row in rows:
            status = S(row.status)
            values: dict[str, Any] = {}
            steps: list[tuple[JobStatus, int, float, str | None, int | None, bool]] = []
            for rep in reports.get(row.id, ()):
                if rep.attempt != row.attempt or status.terminal or status == rep.status:
                    continue
                if rep.status == S.RUNNING:
                    values["started_at"] = rep.at
                if rep.status.terminal:
                    values.update(
                        exit_code=rep.exit_code,
                        failure_code=rep.failure_code,
                        status_reason=rep.reason,
                        lease_expires_at=None,
                    )
                    steps.append((rep.status, row.attempt, rep.at, rep.reason, rep.exit_code, False))
                    if rep.status == S.FAILED and row.attempt <= row.max_retries:
                        retry_reason = f"Retrying after attempt {row.attempt} failed ({rep.failure_code})"
                        steps.append(
                            (S.SUBMITTED_TO_RESCALE, row.attempt + 1, rep.at, retry_reason, None, False)
                        )
                        values.update(
                            attempt=row.attempt + 1,
                            executor_id=None,
                            started_at=None,
                            status_reason=retry_reason,
                        )
                        status = S.SUBMITTED_TO_RESCALE
                    else:
                        values["completed_at"] = rep.at
                        status = rep.status
                    break
                steps.append((rep.status, row.attempt, rep.at, rep.reason, None, False))
                status = rep.status
            if steps:
                changes.append(Change(row, status, values, steps))
        return changes
