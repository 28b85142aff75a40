"""Projects, their limits, dimensions and retention policies, and tasks."""

from __future__ import annotations

import uuid
from collections.abc import Collection
from typing import Any

from sqlalchemy import Connection, Row, and_, bindparam, delete, func, insert, or_, select, update

from openhtc.domain.capacity import ExecutorOffer
from openhtc.domain.enums import NON_TERMINAL_STATUSES, LifecycleStatus
from openhtc.store.accounts import _REGIONS
from openhtc.store.db import Database
from openhtc.store.queue import _OFFERS, offers_of
from openhtc.store.tables import job_counters, project_limits, projects, tasks, workspaces

# Every request on a project or task looks these up: built once, so SQLAlchemy reuses their
# compiled form and cache key (building a select per call costs more than running it).
_PROJECT = select(projects).where(
    and_(projects.c.id == bindparam("project"), projects.c.workspace_id == bindparam("workspace"))
)
_TASK = select(tasks).where(and_(tasks.c.id == bindparam("task"), tasks.c.project_id == bindparam("project")))


class ProjectStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    # -- projects -------------------------------------------------------------------------------

    def create(
        self,
        workspace_id: str,
        name: str,
        description: str,
        regions: list[str],
        region_settings: Any,
        user_id: str,
        now: float,
    ) -> Row[Any]:
        project_id = str(uuid.uuid4())
        with self.db.write() as conn:
            conn.execute(
                insert(projects).values(
                    id=project_id,
                    workspace_id=workspace_id,
                    name=name,
                    description=description,
                    created_by=user_id,
                    created_at=now,
                    regions=regions,
                    region_settings=region_settings,
                )
            )
            return conn.execute(select(projects).where(projects.c.id == project_id)).one()

    def get(self, workspace_id: str, project_id: str) -> Row[Any] | None:
        with self.db.read() as conn:
            return self.get_in(conn, workspace_id, project_id)

    def submit_target(
        self, workspace_id: str, project_id: str, task_id: str, heard_since: float
    ) -> tuple[Any, Any, list[ExecutorOffer], list[Any]]:
        """What a submit reads before its transaction: the project (None: not in the workspace),
        the task (None: not in that project), the offers of the executors heard from since
        ``heard_since`` and the workspace's regions. PostgreSQL: one round trip for the four."""
        with self.db.read(snapshot=False) as conn:
            project, task, offers, region_rows = self.db.select_together(
                conn,
                [
                    (_PROJECT, {"project": project_id, "workspace": workspace_id}),
                    (_TASK, {"task": task_id, "project": project_id}),
                    (_OFFERS, {"since": heard_since}),
                    (_REGIONS, {"ws": workspace_id}),
                ],
            )
        return (
            project[0] if project else None,
            task[0] if task and project else None,
            offers_of(offers),
            region_rows,
        )

    def task_with(
        self, workspace_id: str, project_id: str, task_id: str, also: tuple[Any, dict[str, Any]]
    ) -> tuple[Any, Any, Any]:
        """The project and the task (as ``submit_target``) and the first row of ``also`` (a
        SELECT, or None): PostgreSQL, one round trip for the three."""
        with self.db.read(snapshot=False) as conn:
            project, task, more = self.db.select_together(
                conn,
                [
                    (_PROJECT, {"project": project_id, "workspace": workspace_id}),
                    (_TASK, {"task": task_id, "project": project_id}),
                    also,
                ],
            )
        return (
            project[0] if project else None,
            task[0] if task and project else None,
            more[0] if more else None,
        )

    def get_in(self, conn: Connection, workspace_id: str, project_id: str) -> Row[Any] | None:
        return conn.execute(_PROJECT, {"project": project_id, "workspace": workspace_id}).first()

    def list_projects(
        self, workspace_id: str, after: tuple[float, str] | None, limit: int, created_by: str | None = None
    ) -> list[Row[Any]]:
        cond = projects.c.workspace_id == workspace_id
        if created_by:
            cond = and_(cond, projects.c.created_by == created_by)
        if after:
            cond = and_(
                cond,
                or_(
                    projects.c.created_at > after[0],
                    and_(projects.c.created_at == after[0], projects.c.id > after[1]),
                ),
            )
        with self.db.read() as conn:
            stmt = select(projects).where(cond).order_by(projects.c.created_at, projects.c.id).limit(limit)
            return list(conn.execute(stmt).all())

    def update(self, project_id: str, **values: Any) -> None:
        with self.db.write() as conn:
            conn.execute(update(projects).where(projects.c.id == project_id).values(**values))

    def status_counts(self, workspace_id: str) -> list[tuple[str, str, int, int, int]]:
        """(project id, project name, status, jobs, vCPUs) for every (project, status) of the
        workspace that has jobs: O(projects x statuses) counter rows, never a scan of jobs."""
        stmt = (
            select(
                job_counters.c.project_id,
                projects.c.name,
                job_counters.c.status,
                func.sum(job_counters.c.count),
                func.sum(job_counters.c.vcpus),
            )
            .select_from(job_counters.join(projects, projects.c.id == job_counters.c.project_id))
            .where(projects.c.workspace_id == workspace_id)
            .group_by(job_counters.c.project_id, projects.c.name, job_counters.c.status)
        )
        with self.db.read() as conn:
            rows = list(conn.execute(stmt))
        return [(p, name, int(s), int(n or 0), int(v or 0)) for p, name, s, n, v in rows]

    def limits(self, project_id: str) -> list[Row[Any]]:
        with self.db.read() as conn:
            return list(
                conn.execute(
                    select(project_limits)
                    .where(project_limits.c.project_id == project_id)
                    .order_by(project_limits.c.id)
                )
            )

    def limit(self, project_id: str, limit_id: int) -> Row[Any] | None:
        with self.db.read() as conn:
            return conn.execute(
                select(project_limits).where(
                    and_(project_limits.c.project_id == project_id, project_limits.c.id == limit_id)
                )
            ).first()

    def set_limit(self, project: Row[Any], vcpus: int, role: str, user_id: str, now: float) -> Row[Any]:
        """Create the limit for ``role``, or overwrite the existing one."""
        with self.db.write() as conn:
            existing = conn.execute(
                select(project_limits).where(
                    and_(project_limits.c.project_id == project.id, project_limits.c.modifier_role == role)
                )
            ).first()
            if existing:
                conn.execute(
                    update(project_limits)
                    .where(project_limits.c.id == existing.id)
                    .values(vcpus=vcpus, updated_by=user_id, updated_at=now)
                )
                limit_id = existing.id
            else:
                limit_id = conn.execute(
                    insert(project_limits)
                    .values(
                        project_id=project.id,
                        workspace_id=project.workspace_id,
                        vcpus=vcpus,
                        modifier_role=role,
                        created_by=user_id,
                        updated_by=user_id,
                        created_at=now,
                        updated_at=now,
                    )
                    .returning(project_limits.c.id)
                ).scalar_one()
            return conn.execute(select(project_limits).where(project_limits.c.id == limit_id)).one()

    def update_limit(self, limit_id: int, vcpus: int, user_id: str, now: float) -> Row[Any]:
        with self.db.write() as conn:
            conn.execute(
                update(project_limits)
                .where(project_limits.c.id == limit_id)
                .values(vcpus=vcpus, updated_by=user_id, updated_at=now)
            )
            return conn.execute(select(project_limits).where(project_limits.c.id == limit_id)).one()

    def delete_limits(self, project_id: str, limit_id: int | None = None) -> int:
        cond = project_limits.c.project_id == project_id
        if limit_id is not None:
            cond = and_(cond, project_limits.c.id == limit_id)
        with self.db.write() as conn:
            return conn.execute(delete(project_limits).where(cond)).rowcount

    # -- tasks ----------------------------------------------------------------------------------

    def create_task(
        self, project: Row[Any], name: str, description: str, user_id: str, now: float
    ) -> Row[Any]:
        task_id = str(uuid.uuid4())
        with self.db.write() as conn:
            conn.execute(
                insert(tasks).values(
                    id=task_id,
                    project_id=project.id,
                    workspace_id=project.workspace_id,
                    name=name,
                    description=description,
                    created_by=user_id,
                    created_at=now,
                    last_active_at=now,
                    lifecycle_status=LifecycleStatus.ACTIVE.value,
                )
            )
            return conn.execute(select(tasks).where(tasks.c.id == task_id)).one()

    def task(self, project_id: str, task_id: str) -> Row[Any] | None:
        with self.db.read() as conn:
            return self.task_in(conn, project_id, task_id)

    def task_in(self, conn: Connection, project_id: str, task_id: str) -> Row[Any] | None:
        return conn.execute(_TASK, {"task": task_id, "project": project_id}).first()

    def tasks(self, project_id: str, after: tuple[float, str] | None, limit: int) -> list[Row[Any]]:
        cond = tasks.c.project_id == project_id
        if after:
            cond = and_(
                cond,
                or_(
                    tasks.c.created_at > after[0], and_(tasks.c.created_at == after[0], tasks.c.id > after[1])
                ),
            )
        with self.db.read() as conn:
            return list(
                conn.execute(select(tasks).where(cond).order_by(tasks.c.created_at, tasks.c.id).limit(limit))
            )

    def deleted_tasks(self, task_ids: Collection[str]) -> set[str]:
        """Which of these tasks were deleted."""
        if not task_ids:
            return set()
        query = select(tasks.c.id).where(
            tasks.c.id.in_(list(task_ids)), tasks.c.lifecycle_status == LifecycleStatus.DELETED.value
        )
        with self.db.read() as conn:
            return {r[0] for r in conn.execute(query)}

    def deleted_since(self, since: float | None) -> list[str]:
        """The tasks deleted at or after ``since`` (None: every deleted task)."""
        query = select(tasks.c.id).where(tasks.c.lifecycle_status == LifecycleStatus.DELETED.value)
        if since is not None:
            query = query.where(tasks.c.deleted_at >= since)
        with self.db.read() as conn:
            return [r[0] for r in conn.execute(query)]

    def update_task(self, task_id: str, **values: Any) -> None:
        with self.db.write() as conn:
            conn.execute(update(tasks).where(tasks.c.id == task_id).values(**values))

    # -- retention ------------------------------------------------------------------------------

    def retention_candidates(self) -> list[Row[Any]]:
        """ACTIVE and ARCHIVED tasks under a project or workspace retention policy, each with both
        policies (``p_*``, ``w_*`` columns) and its count of unfinished jobs (``unfinished``)."""
        unfinished = (
            select(job_counters.c.task_id, func.sum(job_counters.c.count).label("n"))
            .where(job_counters.c.status.in_([int(s) for s in NON_TERMINAL_STATUSES]))
            .group_by(job_counters.c.task_id)
            .subquery()
        )
        stmt = (
            select(
                tasks.c.id,
                tasks.c.project_id,
                tasks.c.lifecycle_status,
                tasks.c.last_active_at,
                tasks.c.archived_at,
                projects.c.retention_created_at.label("p_created_at"),
                projects.c.retention_archive_after.label("p_archive_after"),
                projects.c.retention_delete_after.label("p_delete_after"),
                workspaces.c.retention_created_at.label("w_created_at"),
                workspaces.c.retention_archive_after.label("w_archive_after"),
                workspaces.c.retention_delete_after.label("w_delete_after"),
                func.coalesce(unfinished.c.n, 0).label("unfinished"),
            )
            .join(projects, projects.c.id == tasks.c.project_id)
            .join(workspaces, workspaces.c.id == projects.c.workspace_id)
            .outerjoin(unfinished, unfinished.c.task_id == tasks.c.id)
            .where(
                tasks.c.lifecycle_status.in_([LifecycleStatus.ACTIVE.value, LifecycleStatus.ARCHIVED.value]),
                or_(
                    projects.c.retention_created_at.is_not(None),
                    workspaces.c.retention_created_at.is_not(None),
                ),
            )
        )
        with self.db.read() as conn:
            return list(conn.execute(stmt))

    def touch_tasks(self, task_ids: list[str], now: float) -> None:
        """Record activity (``last_active_at = now``) on ACTIVE tasks."""
        if task_ids:
            with self.db.write() as conn:
                conn.execute(
                    update(tasks)
                    .where(tasks.c.id.in_(task_ids), tasks.c.lifecycle_status == LifecycleStatus.ACTIVE.value)
                    .values(last_active_at=now)
                )

    def auto_archive(self, task_id: str, seen_last_active_at: float, now: float) -> bool:
        """Archive an ACTIVE task unless it changed since it was read (a submit moves
        ``last_active_at`` in the transaction that adds jobs); True if it was archived."""
        with self.db.write() as conn:
            return bool(
                conn.execute(
                    update(tasks)
                    .where(
                        tasks.c.id == task_id,
                        tasks.c.lifecycle_status == LifecycleStatus.ACTIVE.value,
                        tasks.c.last_active_at == seen_last_active_at,
                    )
                    .values(lifecycle_status=LifecycleStatus.ARCHIVED.value, archived_at=now)
                ).rowcount
            )
