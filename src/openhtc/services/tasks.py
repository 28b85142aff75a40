"""Task lifecycle steps shared by the API and the retention sweeper."""

from __future__ import annotations

from openhtc.domain.enums import LifecycleStatus
from openhtc.services.service_set import ServiceSet


def delete_task(services: ServiceSet, project_id: str, task_id: str, now: float) -> None:
    """Delete a task: cancel its unfinished jobs, mark it DELETED, free its storage
    (archiving keeps storage; deleting frees it). ``DELETE …/tasks/{id}`` and retention's
    auto-delete both come here."""
    if services.jobs.cancel(task_id, None, now):
        services.wakeups.cancel()
    services.projects.update_task(task_id, lifecycle_status=LifecycleStatus.DELETED.value, deleted_at=now)
    if services.storage is not None:
        services.storage.delete_task(project_id, task_id)
