"""openhtc extension: the dashboard's overview as JSON, for ``htc top`` (docs/extensions.md)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from openhtc.api.deps import principal, services
from openhtc.api.responses import JSONResponse
from openhtc.auth.permissions import require_user
from openhtc.auth.tokens import Principal
from openhtc.services import overview
from openhtc.services.service_set import ServiceSet

router = APIRouter()


@router.get("/openhtc/v1/overview")
def get_overview(who: Principal = Depends(principal), svc: ServiceSet = Depends(services)) -> JSONResponse:
    require_user(who, "read the overview")
    view = overview.snapshot(svc, who)
    return JSONResponse(_json(view))


def _json(view: overview.Snapshot) -> dict[str, Any]:
    hour = view.hour
    return {
        "workspace": {
            "name": view.workspace_name,
            "vcpusInUse": view.vcpus_in_use,
            "vcpuLimit": view.workspace_limit,
        },
        "projects": [
            {
                "id": p.id,
                "name": p.name,
                "jobs": p.counts,
                "vcpusInUse": p.vcpus_in_use,
                "vcpuLimit": p.vcpu_limit,
            }
            for p in view.projects
        ],
        "lastHour": {
            "succeededPerMinute": hour.succeeded,
            "failedPerMinute": hour.failed,
            "started": hour.started,
            "queueWaitP50": hour.wait_p50,
            "queueWaitP95": hour.wait_p95,
        },
        "executors": [
            {
                "id": e.id,
                "online": e.online,
                "region": e.region,
                "architectures": e.architectures,
                "vcpus": e.vcpus,
                "memoryMb": e.memory_mb,
                "lastHeartbeat": e.last_heartbeat,
                "version": e.version,
                "host": e.host,
                "leases": e.leases,
            }
            for e in view.executors
        ],
    }
