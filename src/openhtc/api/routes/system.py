"""Health and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from prometheus_client import CollectorRegistry, Gauge, generate_latest
from starlette.responses import Response

from openhtc.api.deps import principal, services
from openhtc.api.errors import error_body
from openhtc.api.responses import JSONResponse
from openhtc.auth.permissions import require_user
from openhtc.auth.tokens import Principal
from openhtc.domain.errors import OpenHTCError
from openhtc.services import overview
from openhtc.services.service_set import ServiceSet

router = APIRouter()


@router.get("/health")
def health(svc: ServiceSet = Depends(services)) -> JSONResponse:
    """200 while the database answers; 503 naming the part that is down otherwise."""
    try:
        svc.db.ping()
    except OpenHTCError as exc:  # Unavailable, InsufficientStorage: see store.db.failure
        body = {"status": "unavailable", "database": "unavailable", **error_body(503, exc.message, exc.error)}
        return JSONResponse(body, status_code=503, headers={"Retry-After": "5"})
    return JSONResponse({"status": "ok", "database": "ok"})


@router.get("/htc/metrics")
def metrics(who: Principal = Depends(principal), svc: ServiceSet = Depends(services)) -> Response:
    require_user(who, "read workspace metrics")  # they name every project of the workspace
    registry = CollectorRegistry()
    jobs = Gauge(
        "htc_jobs", "Jobs by project and status", ["project_id", "project_name", "status"], registry=registry
    )
    vcpus = Gauge(
        "htc_job_vcpus",
        "vCPUs requested by jobs, by project and status",
        ["project_id", "status"],
        registry=registry,
    )
    for row in overview.job_counts(svc, who.workspace_id):
        jobs.labels(row.project_id, row.project_name, row.status.name).set(row.count)
        vcpus.labels(row.project_id, row.status.name).set(row.vcpus)
    ws = svc.accounts.workspace(who.workspace_id)
    if ws is not None and ws.vcpu_limit is not None:
        Gauge("htc_job_limit_vcpus", "Workspace vCPU limit", registry=registry).set(ws.vcpu_limit)
    return Response(generate_latest(registry), media_type="text/plain; version=0.0.4")
