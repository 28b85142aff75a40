"""Health and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from prometheus_client import CollectorRegistry, Gauge, generate_latest
from starlette.responses import Response

from openhtc.api.deps import app_services, services
from openhtc.api.errors import error_body
from openhtc.api.responses import JSONResponse
from openhtc.api.routes.auth import principal_for_api_key
from openhtc.auth.permissions import require_user
from openhtc.auth.tokens import Principal
from openhtc.domain.enums import Role
from openhtc.domain.errors import OpenHTCError, Unauthenticated
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
    # leader: whether this server runs the singletons (several servers on one PostgreSQL elect one)
    return JSONResponse({"status": "ok", "database": "ok", "leader": svc.leadership.is_leader})


def scraper(request: Request) -> Principal:
    """The caller of /htc/metrics: a bearer token, as every Rescale route, or an API key
    (``Authorization: Token <apiKey>``), which a Prometheus scrape config can hold: a bearer
    token expires after token_ttl_seconds and Prometheus cannot renew it."""
    svc = app_services(request)
    kind, _, value = request.headers.get("authorization", "").partition(" ")
    if kind.lower() == "bearer" and value.strip():
        return svc.tokens.verify(value.strip())
    if kind.lower() == "token" and value.strip():
        return principal_for_api_key(svc, value.strip())
    raise Unauthenticated("expected 'Authorization: Bearer <token>' or 'Token <apiKey>'")


@router.get("/htc/metrics")
def metrics(who: Principal = Depends(scraper), svc: ServiceSet = Depends(services)) -> Response:
    """Rescale's workspace gauges, then openhtc's own families (docs/metrics.md): the per-project
    ones for the workspace's projects; the server-wide ones for a workspace admin."""
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
    rows = overview.job_counts(svc, who.workspace_id)
    for row in rows:
        jobs.labels(row.project_id, row.project_name, row.status.name).set(row.count)
        vcpus.labels(row.project_id, row.status.name).set(row.vcpus)
    project_ids = {row.project_id for row in rows}
    ws = svc.accounts.workspace(who.workspace_id)
    if ws is not None and ws.vcpu_limit is not None:
        Gauge("htc_job_limit_vcpus", "Workspace vCPU limit", registry=registry).set(ws.vcpu_limit)
    body = generate_latest(registry) + svc.metrics.project_families(project_ids)
    if who.role == Role.WORKSPACE_ADMIN.value:
        body += svc.metrics.server_families()
    # the classic text format, which every Prometheus version parses
    return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")
