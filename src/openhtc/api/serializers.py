"""Store rows -> wire JSON. Null only where Rescale's patched spec allows it; omit otherwise."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from openhtc.domain.capacity import ExecutorOffer, largest_by_region, region_architectures
from openhtc.domain.clock import iso
from openhtc.domain.enums import JobStatus, LifecycleStatus, cloud_provider_of


def project(row: Any, registry_prefix: str | None = None, repositories: Sequence[str] = ()) -> dict[str, Any]:
    """``registry_prefix`` and ``repositories``: the project's container registry, where the
    server has one (see ``api.routes.projects.bodies``)."""
    body: dict[str, Any] = {
        "projectId": row.id,
        "projectName": row.name,
        "projectDescription": row.description,
        "createdBy": row.created_by,
        "workspaceId": row.workspace_id,
        "organizationCode": None,
        "createdAt": iso(row.created_at),
        "regions": list(row.regions or []),
        "projectFolderPath": f"projects/{row.id}/",
    }
    if row.region_settings:
        body["regionSettings"] = row.region_settings
    if registry_prefix is not None:
        # Repositories created through the API or pushed to (see docs/containers.md).
        body["containerRegistry"] = registry_prefix
        body["repositories"] = list(repositories)
    return body


def task(row: Any) -> dict[str, Any]:
    return {
        "projectId": row.project_id,
        "taskId": row.id,
        "taskName": row.name,
        "taskDescription": row.description,
        "createdBy": row.created_by,
        "createdAt": iso(row.created_at),
        "lastActiveAt": iso(row.last_active_at),
        "archivedAt": iso(row.archived_at),
        "deletedAt": iso(row.deleted_at),
        "workspaceId": row.workspace_id,
        "taskFolderPath": f"projects/{row.project_id}/tasks/{row.id}",
        "lifecycleStatus": row.lifecycle_status or LifecycleStatus.ACTIVE.value,
    }


def _container(status: int, exit_code: int | None) -> dict[str, Any] | None:
    if exit_code is None or status < JobStatus.SUCCEEDED:
        return None
    return {"exitCode": exit_code, "reason": "Container Exited"}


def _instance_labels(row: Any, definition: dict[str, Any]) -> dict[str, Any] | None:
    if not row.executor_id:
        return None
    return {
        "csp": cloud_provider_of(row.region),
        "priority": definition.get("priority", "ON_DEMAND_PRIORITY"),
        "instanceType": "openhtc-local",
        "instanceArchitecture": row.architecture,
        "accountId": "openhtc",
        "region": row.region,
    }


def job(row: Any, batch: Any, simple: bool = False) -> dict[str, Any]:
    request = batch.request
    definition = request.get("htcJobDefinition", {})
    status = JobStatus(row.status)
    body: dict[str, Any] = {
        "jobUUID": f"{batch.parent_job_id}:{row.idx}",
        "taskId": row.task_id,
        "projectId": row.project_id,
        "status": status.name,
        "statusReason": row.status_reason,
        "failureCode": row.failure_code,
        "container": _container(row.status, row.exit_code),
        "group": row.group_name,
        "createdAt": iso(row.created_at),
        "updatedAt": iso(row.updated_at),
        "startedAt": iso(row.started_at),
        "completedAt": iso(row.completed_at),
    }
    if simple:
        return body
    body.update(
        {
            "region": row.region,
            "createdBy": batch.created_by,
            "workspaceId": batch.workspace_id,
            "commands": definition.get("commands", []),
            "envs": definition.get("envs", []),
            "tags": request.get("tags", []),
            "architecture": row.architecture,
            "maxVCpus": row.vcpus,
            "minVCpus": row.vcpus,
            "maxMemory": row.memory_mb,
            "maxDiskGiB": definition.get("maxDiskGiB", 10),
            "maxSwap": definition.get("maxSwap"),
            "maxGpus": None,
            "imageName": definition.get("imageName"),
            "instanceId": row.executor_id,
            "instanceLabels": _instance_labels(row, definition),
        }
    )
    if definition.get("execTimeoutSeconds") is not None:
        body["execTimeoutSeconds"] = definition["execTimeoutSeconds"]
    if row.executor_id:
        body["providerJobId"] = f"{row.executor_id}/{row.id}.{row.attempt}"
        body["jobExecutionEnvironment"] = {"instanceId": row.executor_id, "instanceType": "openhtc-local"}
    return body


def event(row: Any, job_uuid: str, index: int) -> dict[str, Any]:
    return {
        # A batch's shared submission events get a distinct id in each of its jobs.
        "eventId": str(row.id) if row.job_id is not None else f"{row.id}.{index}",
        "jobId": job_uuid,
        "dateTime": iso(row.at),
        "status": JobStatus(row.status).name,
        "statusReason": row.reason,
        "container": _container(row.status, row.exit_code),
        "instanceId": row.executor_id,
        "instanceLabels": None,
        "userCancelledEvent": bool(row.cancelled),
        "attempt": row.attempt,
    }


def summary(group: str | None, counts: dict[str, int]) -> dict[str, Any]:
    return {"group": group, "jobStatuses": {s.name: int(counts.get(s.name, 0)) for s in JobStatus}}


def limit(row: Any) -> dict[str, Any]:
    return {
        "id": row.id,
        "projectId": row.project_id,
        "workspaceId": row.workspace_id,
        "vCPUs": row.vcpus,
        "modifierRole": row.modifier_role,
        "createdBy": row.created_by,
        "updatedBy": row.updated_by,
        "createdAt": iso(row.created_at),
        "updatedAt": iso(row.updated_at),
    }


def region(row: Any, architectures: list[str] | None = None) -> dict[str, Any]:
    """A region's settings; ``architectures``: what its executors offer (default: the stored ones)."""
    return {
        "region": row.name,
        "enabled": bool(row.enabled),
        "weight": row.weight,
        "updatedBy": row.updated_by,
        "updatedAt": iso(row.updated_at),
        "supportedArchitectures": list(row.architectures if architectures is None else architectures),
        "cloudProvider": cloud_provider_of(row.name),
    }


def dimensions(region_rows: list[Any], offers: list[ExecutorOffer]) -> list[dict[str, Any]]:
    """What each enabled region offers, per priority, as HTCComputeEnvironment entries: the
    largest registered executor of each region and architecture (none registered: no entry)."""
    largest = largest_by_region(offers)
    out = []
    for row in region_rows:
        if not row.enabled:
            continue
        for arch in region_architectures(row.architectures, offers, row.name):
            capacity = largest.get((row.name, arch))
            if capacity is None:
                continue
            for priority in ("ON_DEMAND_PRIORITY", "ON_DEMAND_ECONOMY"):
                out.append(
                    {
                        "derived": {
                            "architecture": arch,
                            "vCPUs": capacity.vcpus,
                            "memory": float(capacity.memory_mb),
                            "swap": False,
                        },
                        "machineType": "openhtc-local",
                        "priority": priority,
                        "region": row.name,
                        "hyperthreading": True,
                    }
                )
    return out


def retention(
    owner_key: str, owner_id: str, archive_after: int, delete_after: int, created_at: float | None
) -> dict[str, Any]:
    return {
        owner_key: owner_id,
        "archiveAfter": archive_after,
        "deleteAfter": delete_after,
        "createdAt": iso(created_at),
    }
