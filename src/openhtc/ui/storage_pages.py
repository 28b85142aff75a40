"""The dashboard's storage and images pages: a task's files (browse, download) and a project's
images. The same checks as the API answer them: the task lookup (404 for another workspace's)
and then the storage scope the token routes would give the user (services/storage.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from openhtc.api.deps import app_services, project_for, task_for
from openhtc.api.pagination import first
from openhtc.auth.permissions import require_user
from openhtc.domain.errors import PermissionDenied, Unavailable
from openhtc.services.service_set import ServiceSet
from openhtc.services.storage import StorageService
from openhtc.storage.base import ObjectBody
from openhtc.storage.layout import clean_relative, task_prefix
from openhtc.ui import session

FILES = 100  # objects per page
TASK = "/projects/{project_id}/tasks/{task_id}"


def _storage(svc: ServiceSet) -> StorageService:
    if svc.storage is None:
        raise Unavailable("this server has no storage")
    return svc.storage


def _readable(svc: ServiceSet, who: Any, key: str) -> None:
    if not _storage(svc).scope_of(who, key).can_read(key):
        raise PermissionDenied(f"you may not read {key}")


def attachment(name: str) -> str:
    """``Content-Disposition`` for a download of ``name`` (RFC 6266): an ASCII fallback for old
    clients and the exact name percent-encoded as UTF-8 (RFC 5987), since headers are Latin-1."""
    fallback = "".join(c if " " <= c <= "~" and c not in '"\\' else "_" for c in name)
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(name, safe='')}"


class _Download(StreamingResponse):
    """An object's bytes, closing it however the response ends (sent, failed or disconnected:
    a background task would run only after a complete send)."""

    def __init__(self, body: ObjectBody, headers: dict[str, str]) -> None:
        super().__init__(body.chunks, media_type="application/octet-stream", headers=headers)
        self.body_object = body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.body_object.close()


def add_routes(router: APIRouter, render: Callable[..., Response]) -> None:
    @router.get(TASK + "/files")
    def task_files(project_id: str, task_id: str, request: Request) -> Response:
        svc = app_services(request)
        who = session.viewer(svc, request)
        require_user(who, "browse storage")
        project, task = task_for(svc, who, project_id, task_id)
        root = task_prefix(project_id, task_id)
        _readable(svc, who, root)
        after = first(request, "after") or None
        start = root + clean_relative(after, "after") if after else None
        found = _storage(svc).backend.list(root, start, FILES + 1)
        files = [(o.key[len(root) :], o.size, o.last_modified) for o in found[:FILES]]
        return render(
            request,
            "files.html",
            who=who,
            project=project,
            task=task,
            files=files,
            next_after=files[-1][0] if len(found) > FILES else None,
        )

    @router.get(TASK + "/files/download")
    def download(project_id: str, task_id: str, request: Request) -> Response:
        svc = app_services(request)
        who = session.viewer(svc, request)
        require_user(who, "download files")
        task_for(svc, who, project_id, task_id)
        relative = clean_relative(first(request, "path"), "path")
        key = task_prefix(project_id, task_id) + relative
        _readable(svc, who, key)
        headers = {
            "Content-Disposition": attachment(relative.rsplit("/", 1)[-1]),
            "Cache-Control": "no-store",
            "X-Content-Type-Options": "nosniff",
        }
        body = _storage(svc).backend.get(key)  # NotFound if there is none
        try:
            return _Download(body, {**headers, "Content-Length": str(body.size)})
        except BaseException:
            body.close()
            raise

    @router.get("/projects/{project_id}/images")
    def images(project_id: str, request: Request) -> Response:
        svc = app_services(request)
        who = session.viewer(svc, request)
        project = project_for(svc, who, project_id)
        registry = svc.registry
        if registry is None or not registry.available:
            return render(request, "images.html", who=who, project=project, images=None, registry=None)
        return render(
            request,
            "images.html",
            who=who,
            project=project,
            images=registry.images(project_id),
            registry=registry.container_registry(project_id),
        )
