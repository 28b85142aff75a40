"""Task retention: archive tasks left inactive, delete tasks left archived.

A policy is ``archiveAfter``/``deleteAfter`` hours (0 disables that step), set on a project or
on its workspace. A project policy, when one exists, is used whole: its zeros switch a step off
even where the workspace policy would run it. :func:`decide` is the pure rule; the
:class:`RetentionSweeper` reads the candidates, applies it and writes the outcome, on a
background thread in the server or one :meth:`~RetentionSweeper.sweep` at a time in tests.

A task counts as active while it has unfinished jobs: the sweep moves such a task's
``lastActiveAt`` forward, so the inactivity clock starts when its last job ends, not when it was
last submitted to. No step runs on a task with unfinished jobs.

The sweep also removes the database log chunks (``log_store = database``) of deleted tasks: a
chunk an agent was writing while its task was deleted, or a killed job's last lines copied after
the delete, lands after the task's logs were deleted, and nothing else would remove it.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from typing import Any

from openhtc.domain.enums import LifecycleStatus
from openhtc.services.periodic import LeaderLoop
from openhtc.services.service_set import ServiceSet
from openhtc.services.shared_logs import DatabaseLogs
from openhtc.services.tasks import delete_task

log = logging.getLogger("openhtc.retention")

HOUR = 3600.0
# Log chunks land after their task's delete within seconds (one request, or one job's kill):
# after its first pass over every deleted task, a sweep looks at the tasks deleted since its
# previous pass, less this margin (servers' clocks, a slow request).
LOG_LOOKBACK = HOUR


@dataclass(frozen=True)
class RetentionPolicy:
    archive_after_hours: int
    delete_after_hours: int


@dataclass(frozen=True)
class TaskFacts:
    lifecycle_status: str
    last_active_at: float
    archived_at: float | None
    unfinished_jobs: int


class Action(enum.Enum):
    NONE = "none"
    TOUCH = "touch"  # busy: record the activity
    ARCHIVE = "archive"
    DELETE = "delete"


def effective_policy(
    project: RetentionPolicy | None, workspace: RetentionPolicy | None
) -> RetentionPolicy | None:
    """The project's policy when it has one, else the workspace's (None: no policy at all)."""
    return project if project is not None else workspace


def decide(policy: RetentionPolicy | None, task: TaskFacts, now: float) -> Action:
    """What retention does to one task now."""
    if policy is None:
        return Action.NONE
    if task.lifecycle_status == LifecycleStatus.ACTIVE.value and policy.archive_after_hours > 0:
        if task.unfinished_jobs:
            return Action.TOUCH if task.last_active_at < now else Action.NONE
        if now - task.last_active_at >= policy.archive_after_hours * HOUR:
            return Action.ARCHIVE
    elif (
        task.lifecycle_status == LifecycleStatus.ARCHIVED.value
        and policy.delete_after_hours > 0
        and task.archived_at is not None
        and not task.unfinished_jobs
        and now - task.archived_at >= policy.delete_after_hours * HOUR
    ):
        return Action.DELETE
    return Action.NONE


def _policy(
    created_at: float | None, archive_after: int | None, delete_after: int | None
) -> RetentionPolicy | None:
    if created_at is None:
        return None
    return RetentionPolicy(archive_after or 0, delete_after or 0)


@dataclass
class SweepResult:
    touched: int = 0
    archived: int = 0
    deleted: int = 0
    log_chunks: int = 0  # left behind by deleted tasks, removed


class RetentionSweeper(LeaderLoop):
    """Applies retention policies every ``settings.retention_sweep_seconds`` on the leader."""

    name = "retention"

    def __init__(self, services: ServiceSet) -> None:
        super().__init__(services, services.settings.retention_sweep_seconds, log)
        self._logs_swept_at: float | None = None  # None: the next pass looks at every deleted task

    def round(self) -> None:
        result = self.sweep()
        if result.archived or result.deleted:
            log.info("retention: archived %d and deleted %d tasks", result.archived, result.deleted)

    def sweep(self) -> SweepResult:
        """One pass over every task under a policy."""
        s = self.services
        now = s.clock.now()
        result = SweepResult()
        touch: list[str] = []
        for row in s.projects.retention_candidates():
            action = decide(_effective(row), _facts(row), now)
            try:
                if action is Action.TOUCH:
                    touch.append(row.id)
                elif action is Action.ARCHIVE:
                    result.archived += s.projects.auto_archive(row.id, row.last_active_at, now)
                elif action is Action.DELETE:
                    delete_task(s, row.project_id, row.id, now)
                    result.deleted += 1
            except Exception:  # one task's failure (say, storage unreachable) must not stop the rest
                log.exception("retention: could not %s task %s", action.value, row.id)
        s.projects.touch_tasks(touch, now)
        result.touched = len(touch)
        s.queue.prune_hour(now)  # the dashboard's last hour: its rows that left it
        result.log_chunks = self._deleted_tasks_logs(now)
        return result

    def _deleted_tasks_logs(self, now: float) -> int:
        """Remove the log chunks of deleted tasks (see the module doc)."""
        logs = self.services.logs
        if not isinstance(logs, DatabaseLogs):
            return 0
        since = None if self._logs_swept_at is None else self._logs_swept_at - LOG_LOOKBACK
        gone = self.services.projects.deleted_since(since)
        removed = logs.delete_tasks(gone)
        self._logs_swept_at = now
        if removed:
            log.info("retention: removed %d log chunk(s) written after their task was deleted", removed)
        return removed


def _effective(row: Any) -> RetentionPolicy | None:
    return effective_policy(
        _policy(row.p_created_at, row.p_archive_after, row.p_delete_after),
        _policy(row.w_created_at, row.w_archive_after, row.w_delete_after),
    )


def _facts(row: Any) -> TaskFacts:
    return TaskFacts(row.lifecycle_status, row.last_active_at, row.archived_at, int(row.unfinished))
