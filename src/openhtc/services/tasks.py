"""Task lifecycle steps shared by the API and the retention sweeper."""

from __future__ import annotations

from openhtc.domain.enums import LifecycleStatus
from openhtc.services.service_set import ServiceSet
from openhtc.services.shared_logs import DatabaseLogs


def cancel_jobs(
    services: ServiceSet, task_id: str, group: str | None, now: float, batch_id: int | None = None
) -> int:
    """Cancel a task's (or group's, or one batch's) unfinished jobs: the API's and the
    dashboard's cancel, and a delete. Returns how many (counted in the metrics as the store
    applied them)."""
    applied = services.jobs.cancel(task_id, group, now, batch_id)
    if applied.changes:
        services.metrics.jobs.applied(applied)
        services.wakeups.cancel()
    return len(applied.changes)


def delete_task(services: ServiceSet, project_id: str, task_id: str, now: float) -> None:
    """Delete a task: cancel its unfinished jobs, mark it DELETED, free its storage
    (archiving keeps storage; deleting frees it). ``DELETE …/tasks/{id}`` and retention's
    auto-delete both come here."""
    cancel_jobs(services, task_id, None, now)
    services.projects.update_task(task_id, lifecycle_status=LifecycleStatus.DELETED.value, deleted_at=now)
    if services.storage is not None:
        services.storage.delete_task(project_id, task_id)
    if isinstance(services.logs, DatabaseLogs):  # its logs go with its storage
        services.logs.delete_task(task_id)
