"""Jobs: batch submit, list, get, events, logs, cancel."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Body, Depends, Request
from starlette.responses import Response

from openhtc.api import serializers as ser
from openhtc.api.deps import job_for, principal, services, task_for, task_job_for
from openhtc.api.pagination import decode_cursor, first, page, page_size
from openhtc.api.responses import JSONResponse
from openhtc.auth.permissions import require_user
from openhtc.auth.tokens import Principal
from openhtc.domain.clock import iso
from openhtc.domain.enums import STATUS_NAMES, JobStatus
from openhtc.domain.errors import ValidationFailed
from openhtc.services.service_set import ServiceSet
from openhtc.services.submission import submit_to
from openhtc.services.tasks import cancel_jobs

router = APIRouter()
JOBS = "/htc/projects/{project_id}/tasks/{task_id}/jobs"


@router.post(JOBS + "/batch")
def submit_batch(
    project_id: str,
    task_id: str,
    request: Request,
    body: Any = Body(None),
    who: Principal = Depends(principal),
    svc: ServiceSet = Depends(services),
) -> JSONResponse:
    return JSONResponse(submit_to(svc, who, project_id, task_id, body, first(request, "group")))


@router.post(JOBS + "/cancel")
def cancel(
    project_id: str,
    task_id: str,
    request: Request,
    who: Principal = Depends(principal),
    svc: ServiceSet = Depends(services),
) -> Response:
    task_for(svc, who, project_id, task_id)
    require_user(who, "cancel jobs")
    cancel_jobs(svc, task_id, first(request, "group"), svc.clock.now())
    return Response(status_code=200)  # "200 with an empty body", as Rescale answers


@router.get(JOBS)
def list_jobs(
    project_id: str,
    task_id: str,
    request: Request,
    who: Principal = Depends(principal),
    svc: ServiceSet = Depends(services),
) -> JSONResponse:
    task_for(svc, who, project_id, task_id)
    size = page_size(request)
    after = decode_cursor(request, "int") or 0
    status_name = first(request, "status")
    if status_name is not None and status_name not in STATUS_NAMES:
        raise ValidationFailed(f"must be one of {', '.join(STATUS_NAMES)}", field="status")
    view = (first(request, "viewType") or "FULL").upper()
    if view not in ("FULL", "SIMPLE"):
        raise ValidationFailed("must be FULL or SIMPLE", field="viewType")
    with svc.db.read() as conn:
        rows = svc.jobs.list_jobs(
            conn,
            task_id,
            after_id=int(after),
            limit=size + 1,
            group=first(request, "group"),
            status=JobStatus[status_name] if status_name else None,
            job_uuids=request.query_params.getlist("jobId"),
        )
        batch_rows = svc.jobs.batches_by_id(conn, {r.batch_id for r in rows[:size]})
    body = page(request, rows, size, lambda r: r.id)
    body["items"] = [ser.job(r, batch_rows[r.batch_id], simple=view == "SIMPLE") for r in body["items"]]
    return JSONResponse(body)


@router.get(JOBS + "/{job_id}")
def get_job(
    project_id: str,
    task_id: str,
    job_id: str,
    who: Principal = Depends(principal),
    svc: ServiceSet = Depends(services),
) -> JSONResponse:
    job, batch = task_job_for(svc, who, project_id, task_id, job_id)
    return JSONResponse(ser.job(job, batch))


@router.get(JOBS + "/{job_id}/events")
def job_events(
    project_id: str,
    task_id: str,
    job_id: str,
    request: Request,
    who: Principal = Depends(principal),
    svc: ServiceSet = Depends(services),
) -> JSONResponse:
    task_for(svc, who, project_id, task_id)
    job, _ = job_for(svc, task_id, job_id)
    size = page_size(request)
    after = decode_cursor(request, "int") or 0
    with svc.db.read() as conn:
        rows = svc.jobs.events(conn, job.id, job.batch_id, int(after), size + 1)
    body = page(request, rows, size, lambda r: r.id)
    body["items"] = [ser.event(r, job_id, job.idx) for r in body["items"]]
    return JSONResponse(body)


@router.get(JOBS + "/{job_id}/logs")
def job_logs(
    project_id: str,
    task_id: str,
    job_id: str,
    request: Request,
    who: Principal = Depends(principal),
    svc: ServiceSet = Depends(services),
) -> JSONResponse:
    task_for(svc, who, project_id, task_id)
    job, batch = job_for(svc, task_id, job_id)
    size = page_size(request, default=100, maximum=10000)
    order = (first(request, "sort") or "desc").lower()
    if order not in ("asc", "desc"):
        raise ValidationFailed("must be asc or desc", field="sort")
    start = _log_position(decode_cursor(request, "position"), job.attempt)
    lines = svc.logs.page(
        (task_id, batch.parent_job_id, job.idx), job.attempt, size + 1, order == "desc", start
    )
    body = page(request, lines, size, lambda line: list(line.after))
    body["items"] = [{"timestamp": iso(line.timestamp), "message": line.message} for line in body["items"]]
    return JSONResponse(body)


def _log_position(cursor: Any, attempts: int) -> tuple[int, int] | None:
    """A logs cursor is [attempt, byte offset]: where the previous page stopped reading."""
    if cursor is None:
        return None
    if (
        isinstance(cursor, list)
        and len(cursor) == 2
        and all(type(v) is int for v in cursor)
        and 1 <= cursor[0] <= attempts
        and cursor[1] >= 0
    ):
        return cursor[0], cursor[1]
    raise ValidationFailed("not a page index this server issued", field="pageIndex")
