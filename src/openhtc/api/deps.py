"""Request plumbing: the services of this app and the authenticated principal.

The two dependencies are ``async``: FastAPI runs a plain ``def`` dependency on a worker thread,
a hop that costs about 0.3 ms of CPU per dependency and request, and neither blocks (token
checks are cached and never touch the database). Endpoints that query the store stay ``def``.
"""

from __future__ import annotations

from typing import Any

from fastapi import Request

from openhtc.auth.permissions import check_found, check_project_scope
from openhtc.auth.tokens import Principal
from openhtc.domain.errors import NotFound, Unauthenticated
from openhtc.services.service_set import ServiceSet


def app_services(request: Request) -> ServiceSet:
    svc: ServiceSet = request.app.state.services
    return svc


async def services(request: Request) -> ServiceSet:
    return app_services(request)


def credentials(request: Request, scheme: str) -> str:
    header = request.headers.get("authorization", "")
    kind, _, value = header.partition(" ")
    if kind.lower() != scheme.lower() or not value.strip():
        raise Unauthenticated(f"expected 'Authorization: {scheme} <…>'")
    return value.strip()


async def principal(request: Request) -> Principal:
    token = credentials(request, "Bearer")
    return app_services(request).tokens.verify(token)


def project_for(svc: ServiceSet, who: Principal, project_id: str) -> Any:
    check_project_scope(who, project_id)
    project = svc.projects.get(who.workspace_id, project_id)
    if project is None:
        raise NotFound(f"project {project_id} not found")
    return project


def task_for(svc: ServiceSet, who: Principal, project_id: str, task_id: str) -> tuple[Any, Any]:
    return _task_and_job(svc, who, project_id, task_id, None)[:2]


def task_job_for(
    svc: ServiceSet, who: Principal, project_id: str, task_id: str, job_id: str
) -> tuple[Any, Any]:
    """``task_for`` then ``job_for`` in one read transaction (the job reads a client polls or
    waits on: one transaction less per request)."""
    found = _task_and_job(svc, who, project_id, task_id, job_id)[2]
    if found is None:
        raise NotFound(f"job {job_id} not found in task {task_id}")
    return found


def _task_and_job(
    svc: ServiceSet, who: Principal, project_id: str, task_id: str, job_id: str | None
) -> tuple[Any, Any, Any]:
    """The project, the task and (``job_id`` given) the job, scope checked; the job is None
    when not found (or not asked for). Read without a transaction (two round trips less on
    PostgreSQL): project and task rows are never deleted (a deleted task keeps its row), and
    the job's read allows for a row written between its two statements (``JobStore.get``)."""
    check_project_scope(who, project_id)
    with svc.db.read(snapshot=False) as conn:
        project = svc.projects.get_in(conn, who.workspace_id, project_id)
        task = svc.projects.task_in(conn, project_id, task_id) if project is not None else None
        found = svc.jobs.get(conn, task_id, job_id) if task is not None and job_id is not None else None
    check_found(who, project_id, task_id, project, task)
    return project, task, found


def job_for(svc: ServiceSet, task_id: str, job_id: str) -> tuple[Any, Any]:
    """A job of a task the caller was already checked for (``task_for``), and its batch (read
    without a transaction: ``JobStore.get`` allows for a row written between its statements)."""
    with svc.db.read(snapshot=False) as conn:
        found = svc.jobs.get(conn, task_id, job_id)
    if found is None:
        raise NotFound(f"job {job_id} not found in task {task_id}")
    return found
