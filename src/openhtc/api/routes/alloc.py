"""Allocation queues for admins: /openhtc/v1/alloc/... (an openhtc extension; docs/allocation.md).

A queue submits Slurm pilot jobs, each running one ``htc agent``, for a region while it has
queued work (services/allocation.py). A workspace administrator's credentials list them; only an
installation administrator's (services/allocation.py: installation_workspace) change them.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from openhtc.api.deps import principal, services
from openhtc.api.responses import JSONResponse
from openhtc.auth.tokens import Principal
from openhtc.domain import allocation as rules
from openhtc.domain.clock import iso
from openhtc.domain.enums import Role
from openhtc.domain.errors import PermissionDenied, Unauthenticated, ValidationFailed
from openhtc.services.allocation import AllocationService, QueueSpec, installation_workspace
from openhtc.services.service_set import ServiceSet
from openhtc.store.allocation import PilotRow, QueueRow

PREFIX = "/openhtc/v1/alloc/queues"
router = APIRouter()


class QueueBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: str = "slurm"
    region: str = Field(min_length=1, max_length=64)
    timeLimitSeconds: int = Field(gt=rules.DRAIN_BEFORE_END, le=366 * 86400)
    maxPilots: int = Field(rules.DEFAULT_MAX_PILOTS, ge=1, le=100000)
    backlog: int = Field(rules.DEFAULT_BACKLOG, ge=1, le=10000)
    pilotVcpus: int = Field(1, ge=1, le=100000)
    idleTimeoutSeconds: int = Field(int(rules.DEFAULT_IDLE_TIMEOUT), ge=1, le=366 * 86400)
    sbatchArgs: list[str] = Field(default_factory=list, max_length=100)
    dryRun: bool = True


def _admin(who: Principal, svc: ServiceSet) -> AllocationService:
    if who.is_job or who.role != Role.WORKSPACE_ADMIN.value:
        raise PermissionDenied("only a workspace administrator manages allocation queues")
    allocation: AllocationService | None = svc.allocation
    if allocation is None:
        raise PermissionDenied("this server runs no allocation queues")
    return allocation


def _installation_admin(who: Principal, svc: ServiceSet) -> AllocationService:
    """Queues serve the whole installation: only its administrators change them (docs/allocation.md)."""
    allocation = _admin(who, svc)
    if who.workspace_id != installation_workspace(svc):
        raise PermissionDenied(
            "allocation queues are installation-wide: only an administrator of the installation's "
            "admin workspace (installation_admin_workspace; default: the first workspace) may add, "
            "pause, resume or remove them"
        )
    return allocation


def _time(value: float | None) -> str | None:
    return iso(value) if value is not None else None


def pilot_json(p: PilotRow) -> dict[str, Any]:
    return {
        "id": p.id,
        "slurmJobId": p.batch_job_id,
        "state": p.state,
        "agentId": p.agent_id,
        "submittedAt": _time(p.submitted_at),
        "startedAt": _time(p.started_at),
        "endsAt": _time(p.ends_at),
        "endedAt": _time(p.ended_at),
        "detail": p.detail,
    }


def queue_json(q: QueueRow, pilots: list[PilotRow] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": q.id,
        "kind": q.kind,
        "region": q.region,
        "timeLimitSeconds": q.time_limit_s,
        "maxPilots": q.max_pilots,
        "backlog": q.backlog,
        "pilotVcpus": q.pilot_vcpus,
        "idleTimeoutSeconds": q.idle_timeout_s,
        "sbatchArgs": q.extra_args,
        "state": q.state,
        "pauseReason": q.pause_reason,
        "failedSubmissions": q.failed_submissions,
        "failedStarts": q.failed_starts,
        "createdAt": _time(q.created_at),
    }
    if pilots is not None:
        body["pilots"] = [pilot_json(p) for p in pilots]
    return body


@router.get(PREFIX)
def list_queues(who: Principal = Depends(principal), svc: ServiceSet = Depends(services)) -> JSONResponse:
    allocation = _admin(who, svc)
    return JSONResponse({"queues": [queue_json(q, ps) for q, ps in allocation.listing()]})


@router.post(PREFIX)
async def add_queue(
    request: Request, who: Principal = Depends(principal), svc: ServiceSet = Depends(services)
) -> JSONResponse:
    allocation = _installation_admin(who, svc)
    try:
        body = QueueBody.model_validate_json(await request.body())
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise ValidationFailed(f"{where}: {first.get('msg', 'invalid')}", where or None) from None
    spec = QueueSpec(
        body.kind,
        body.region,
        body.timeLimitSeconds,
        body.maxPilots,
        body.backlog,
        body.pilotVcpus,
        body.idleTimeoutSeconds,
        tuple(body.sbatchArgs),
    )
    row = await run_in_threadpool(allocation.add, spec, body.dryRun)
    return JSONResponse(queue_json(row, []), status_code=201)


@router.post(PREFIX + "/{queue_id}/pause")
def pause_queue(
    queue_id: str, who: Principal = Depends(principal), svc: ServiceSet = Depends(services)
) -> JSONResponse:
    return JSONResponse(queue_json(_installation_admin(who, svc).pause(queue_id)))


@router.post(PREFIX + "/{queue_id}/resume")
def resume_queue(
    queue_id: str, who: Principal = Depends(principal), svc: ServiceSet = Depends(services)
) -> JSONResponse:
    return JSONResponse(queue_json(_installation_admin(who, svc).resume(queue_id)))


@router.delete(PREFIX + "/{queue_id}")
def remove_queue(
    queue_id: str, who: Principal = Depends(principal), svc: ServiceSet = Depends(services)
) -> Response:
    _installation_admin(who, svc).remove(queue_id)
    return Response(status_code=204)


@router.get("/openhtc/v1/alloc/queue-depth")
def queue_depth(
    request: Request, region: str | None = None, svc: ServiceSet = Depends(services)
) -> JSONResponse:
    """A region's queue depth for autoscalers (KEDA's metrics-api scaler; docs/deploy-kubernetes.md).
    An agent token (for its region, or any with ``*``) or a workspace administrator's token."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("expected 'Authorization: Bearer <agent token>'")
    try:
        claims = svc.tokens.verify_agent(token.strip())
        scope = str(claims.get("region", "*"))
    except PermissionDenied:  # not an agent token: a user's
        _admin(svc.tokens.verify(token.strip()), svc)
        scope = "*"
    wanted = region or (scope if scope != "*" else svc.settings.region)
    if scope not in ("*", wanted):
        raise PermissionDenied(f"this agent token is for region {scope}, not {wanted}")
    allocation: AllocationService | None = svc.allocation
    if allocation is None:
        raise PermissionDenied("this server runs no allocation queues")
    return JSONResponse(allocation.queue_depth(wanted))
