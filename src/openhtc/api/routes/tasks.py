"""Tasks: CRUD, archive/unarchive, delete, summaries and groups."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Body, Depends, Request

from openhtc.api import serializers as ser
from openhtc.api.deps import principal, project_for, services, task_for
from openhtc.api.pagination import decode_cursor, page, page_size
from openhtc.api.responses import JSONResponse
from openhtc.api.validation import require_object, str_field
from openhtc.auth.permissions import require_user
from openhtc.auth.tokens import Principal
from openhtc.domain.enums import LifecycleStatus
from openhtc.domain.errors import Conflict, ValidationFailed
from openhtc.domain.limits import check_description, check_name
from openhtc.services import tasks as tasks_service
from openhtc.services.service_set import ServiceSet

router = APIRouter()
TASK = "/htc/projects/{project_id}/tasks/{task_id}"


@router.get("/htc/projects/{project_id}/tasks")
def list_tasks(
    project_id: str,
    request: Request,
    who: Principal = Depends(principal),
    svc: ServiceSet = Depends(services),
) -> JSONResponse:
    project_for(svc, who, project_id)
    size = page_size(request)
    cursor = decode_cursor(request, "pair")
    rows = svc.projects.tasks(project_id, tuple(cursor) if cursor else None, size + 1)
    if who.is_job:
        rows = [r for r in rows if r.id == who.task_id]
    body = page(request, rows, size, lambda r: [r.created_at, r.id])
    body["items"] = [ser.task(r) for r in body["items"]]
    return JSONResponse(body)


@router.post("/htc/projects/{project_id}/tasks")
def create_task(
    project_id: str,
    body: Any = Body(None),
    who: Principal = Depends(principal),
    svc: ServiceSet = Depends(services),
) -> JSONResponse:
    project = project_for(svc, who, project_id)
    require_user(who, "create tasks")
    obj = require_object(body)
    name = str_field(obj, "taskName")
    assert name is not None
    if not name.strip():
        raise ValidationFailed("must not be empty", field="taskName")
    description = str_field(obj, "taskDescription", required=False) or ""
    check_name(name, "taskName", svc.limits)
    check_description(description, "taskDescription", svc.limits)
    return JSONResponse(
        ser.task(svc.projects.create_task(project, name, description, who.user_id, svc.clock.now()))
    )


@router.get(TASK)
def get_task(
    project_id: str, task_id: str, who: Principal = Depends(principal), svc: ServiceSet = Depends(services)
) -> JSONResponse:
    return JSONResponse(ser.task(task_for(svc, who, project_id, task_id)[1]))


@router.patch(TASK)
def patch_task(
    project_id: str,
    task_id: str,
    body: Any = Body(None),
    who: Principal = Depends(principal),
    svc: ServiceSet = Depends(services),
) -> JSONResponse:
    _, task = task_for(svc, who, project_id, task_id)
    require_user(who, "change a task's lifecycle")
    target = str_field(require_object(body), "lifecycleStatus", choices=("ACTIVE", "ARCHIVED"))
    if task.lifecycle_status == LifecycleStatus.DELETED.value:
        raise Conflict(f"task {task_id} is DELETED and cannot change")
    now = svc.clock.now()
    if target == LifecycleStatus.ARCHIVED.value and task.lifecycle_status != target:
        with svc.db.read() as conn:
            if svc.jobs.running_count(conn, task_id):
                raise Conflict(
                    f"task {task_id} still has unfinished jobs; cancel them or wait before archiving"
                )
        svc.projects.update_task(task_id, lifecycle_status=target, archived_at=now)
    elif target == LifecycleStatus.ACTIVE.value and task.lifecycle_status != target:
        svc.projects.update_task(task_id, lifecycle_status=target, archived_at=None, last_active_at=now)
    return JSONResponse(ser.task(task_for(svc, who, project_id, task_id)[1]))


@router.delete(TASK)
def delete_task(
    project_id: str, task_id: str, who: Principal = Depends(principal), svc: ServiceSet = Depends(services)
) -> JSONResponse:
    _, task = task_for(svc, who, project_id, task_id)
    require_user(who, "delete a task")
    if task.lifecycle_status != LifecycleStatus.DELETED.value:
        tasks_service.delete_task(svc, project_id, task_id, svc.clock.now())
    return JSONResponse(ser.task(task_for(svc, who, project_id, task_id)[1]))


@router.get(TASK + "/summary-statistics")
def summary(
    project_id: str, task_id: str, who: Principal = Depends(principal), svc: ServiceSet = Depends(services)
) -> JSONResponse:
    task_for(svc, who, project_id, task_id)
    with svc.db.read() as conn:
        totals = svc.jobs.totals(conn, task_id)
    return JSONResponse(ser.summary(None, totals))


@router.get(TASK + "/group-summary-statistics")
def group_summary(
    project_id: str,
    task_id: str,
    request: Request,
    who: Principal = Depends(principal),
    svc: ServiceSet = Depends(services),
) -> JSONResponse:
    task_for(svc, who, project_id, task_id)
    wanted = request.query_params.getlist("group")
    size = page_size(request)
    after = decode_cursor(request, "str")
    with svc.db.read() as conn:
        if wanted:
            names = sorted(g for g in set(wanted) if after is None or g > after)[: size + 1]
        else:
            names = svc.jobs.groups(conn, task_id, after, size + 1)
        counts = svc.jobs.summary(conn, task_id, names[:size])
    body = page(request, names, size, lambda g: g)
    body["items"] = [ser.summary(g, counts.get(g, {})) for g in body["items"]]
    return JSONResponse(body)


@router.get(TASK + "/groups")
def groups(
    project_id: str, task_id: str, who: Principal = Depends(principal), svc: ServiceSet = Depends(services)
) -> JSONResponse:
    task_for(svc, who, project_id, task_id)
    with svc.db.read() as conn:
        return JSONResponse(svc.jobs.groups(conn, task_id, None, 1_000_000))
