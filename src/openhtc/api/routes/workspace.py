"""Regions and workspace settings: dimensions, limits, retention policy; GCP clusters."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Body, Depends, Request

from openhtc.api import serializers as ser
from openhtc.api.deps import principal, services
from openhtc.api.responses import JSONResponse
from openhtc.api.validation import retention_body
from openhtc.auth.permissions import require_user
from openhtc.auth.tokens import Principal
from openhtc.domain.capacity import region_architectures
from openhtc.domain.clock import iso
from openhtc.domain.enums import Role
from openhtc.domain.errors import NotFound, PermissionDenied, ValidationFailed
from openhtc.services.executors import live_offers
from openhtc.services.service_set import ServiceSet

router = APIRouter()
UNLIMITED_VCPUS = 999999  # the schema's maximum; reported when no workspace limit is set


def _own_workspace(who: Principal, workspace_id: str) -> None:
    """Another workspace: 404. A job token, scoped to one task, reads no workspace-wide data: 403."""
    if workspace_id != who.workspace_id:
        raise NotFound(f"workspace {workspace_id} not found")
    require_user(who, "read workspace settings")


@router.get("/htc/regions")
def list_regions(
    request: Request, who: Principal = Depends(principal), svc: ServiceSet = Depends(services)
) -> JSONResponse:
    rows = svc.accounts.regions(who.workspace_id)
    provider = request.query_params.get("cloudProvider")
    enabled = request.query_params.get("enabled")
    if enabled is not None and enabled.lower() not in ("true", "false"):
        raise ValidationFailed("must be true or false", field="enabled")
    offers = live_offers(svc)  # a region offers the architectures its executors registered
    out = [ser.region(r, region_architectures(r.architectures, offers, r.name)) for r in rows]
    if provider:
        out = [r for r in out if r["cloudProvider"] == provider]
    if enabled is not None:
        out = [r for r in out if r["enabled"] == (enabled.lower() == "true")]
    return JSONResponse(out)


@router.get("/htc/regions/{region}")
def get_region(
    region: str, who: Principal = Depends(principal), svc: ServiceSet = Depends(services)
) -> JSONResponse:
    for row in svc.accounts.regions(who.workspace_id):
        if row.name == region:
            architectures = region_architectures(row.architectures, live_offers(svc), row.name)
            return JSONResponse(ser.region(row, architectures))
    raise NotFound(f"region {region} is not configured in this workspace")


@router.get("/htc/workspaces/{workspace_id}/dimensions")
def workspace_dimensions(
    workspace_id: str, who: Principal = Depends(principal), svc: ServiceSet = Depends(services)
) -> JSONResponse:
    _own_workspace(who, workspace_id)
    return JSONResponse(ser.dimensions(svc.accounts.regions(workspace_id), live_offers(svc)))


@router.get("/htc/workspaces/{workspace_id}/limits")
def workspace_limits(
    workspace_id: str, who: Principal = Depends(principal), svc: ServiceSet = Depends(services)
) -> JSONResponse:
    _own_workspace(who, workspace_id)
    ws = svc.accounts.workspace(workspace_id)
    if ws is None:
        raise NotFound(f"workspace {workspace_id} not found")
    body: dict[str, Any] = {
        "workspaceId": ws.id,
        "vCPUs": ws.vcpu_limit if ws.vcpu_limit is not None else UNLIMITED_VCPUS,
    }
    if ws.limit_created_at is not None:
        body.update(
            createdBy=ws.limit_created_by,
            updatedBy=ws.limit_updated_by,
            createdAt=iso(ws.limit_created_at),
            updatedAt=iso(ws.limit_updated_at),
        )
    return JSONResponse(body)


@router.get("/htc/workspaces/{workspace_id}/task-retention-policy")
def get_workspace_retention(
    workspace_id: str, who: Principal = Depends(principal), svc: ServiceSet = Depends(services)
) -> JSONResponse:
    _own_workspace(who, workspace_id)
    ws = svc.accounts.workspace(workspace_id)
    if ws is None or ws.retention_created_at is None:
        raise NotFound("no task retention policy is set for this workspace")
    return JSONResponse(
        ser.retention(
            "workspaceId",
            ws.id,
            ws.retention_archive_after,
            ws.retention_delete_after,
            ws.retention_created_at,
        )
    )


@router.put("/htc/workspaces/{workspace_id}/task-retention-policy")
def put_workspace_retention(
    workspace_id: str,
    body: Any = Body(None),
    who: Principal = Depends(principal),
    svc: ServiceSet = Depends(services),
) -> JSONResponse:
    _own_workspace(who, workspace_id)
    if who.is_job or who.role != Role.WORKSPACE_ADMIN.value:
        raise PermissionDenied("only a workspace administrator may set the workspace retention policy")
    archive_after, delete_after = retention_body(body)
    now = svc.clock.now()
    svc.accounts.update_workspace(
        workspace_id,
        retention_archive_after=archive_after,
        retention_delete_after=delete_after,
        retention_created_at=now,
    )
    return JSONResponse(
        ser.retention("workspaceId", workspace_id, archive_after, delete_after, now), status_code=201
    )


@router.get("/htc/gcp/clusters/{workspace_id}")
def gcp_clusters(workspace_id: str, who: Principal = Depends(principal)) -> JSONResponse:
    _own_workspace(who, workspace_id)
    return JSONResponse({"clusters": []})  # openhtc runs no GCP clusters
