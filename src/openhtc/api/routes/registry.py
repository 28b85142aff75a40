"""Container registry routes: repositories, images, image status, the project registry token,
and the Docker registry token endpoint that docker-registry's ``auth.token.realm`` points at."""

from __future__ import annotations

import base64
import binascii

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from openhtc.api.deps import principal, project_for, services
from openhtc.api.responses import JSONResponse
from openhtc.auth.permissions import require_user
from openhtc.auth.tokens import Principal
from openhtc.domain.errors import ImageUnavailable, Unauthenticated
from openhtc.domain.submission import IMAGE_NAME_RE
from openhtc.registry import TOKEN_PATH, Registry, RegistryUnavailable
from openhtc.registry.service import unavailable_message
from openhtc.registry.tokens import JOB_ACTIONS, USER_ACTIONS, parse_scopes
from openhtc.services.service_set import ServiceSet

router = APIRouter()
PREFIX = "/htc/projects/{project_id}/container-registry"


def _registry(svc: ServiceSet) -> Registry:
    if svc.registry is None:
        raise RegistryUnavailable("this server has no container registry")
    return svc.registry


# -- the project's registry ------------------------------------------------------------------


@router.post(PREFIX + "/repo/{repo_name:path}")
def create_repository(
    project_id: str, repo_name: str, who: Principal = Depends(principal), svc: ServiceSet = Depends(services)
) -> JSONResponse:
    """Idempotent: ``successfullyCreated`` is false when the repository already existed.

    ``registryURI`` is the project's registry prefix ending in ``/``, as Rescale answers it: the
    tutorial pushes to ``$REGISTRY_URI$REPO_NAME:$IMAGE_TAG``."""
    project = project_for(svc, who, project_id)
    require_user(who, "create repositories")
    registry = _registry(svc)
    registry.validate_repository(project_id, repo_name)
    row, created = registry.repositories.create(
        project_id, project.workspace_id, repo_name, who.user_id, svc.clock.now()
    )
    return JSONResponse(
        {
            "repositoryName": repo_name,
            "successfullyCreated": created,
            "projectId": project_id,
            "createdBy": row.created_by,
            "workspaceId": project.workspace_id,
            "registryURI": registry.container_registry(project_id),
        }
    )


@router.get(PREFIX + "/images")
def list_images(
    project_id: str, who: Principal = Depends(principal), svc: ServiceSet = Depends(services)
) -> JSONResponse:
    project_for(svc, who, project_id)
    registry = _registry(svc)
    return JSONResponse(
        {"containerRegistry": registry.container_registry(project_id), "images": registry.images(project_id)}
    )


@router.get(PREFIX + "/images/{image_name:path}")
def image_status(
    project_id: str, image_name: str, who: Principal = Depends(principal), svc: ServiceSet = Depends(services)
) -> JSONResponse:
    """READY when the manifest is in the registry, else 404 (``latest`` when no tag is given).

    Under runtimes that never pull (process, noop) every well-formed name is READY, as before the
    registry existed: their jobs name images only for the record.
    """
    project_for(svc, who, project_id)
    if not svc.images_required:
        if not IMAGE_NAME_RE.fullmatch(image_name):
            raise ImageUnavailable(unavailable_message(image_name))
        return JSONResponse({"status": "READY"})
    _registry(svc).require_image(project_id, image_name)
    return JSONResponse({"status": "READY"})


@router.get(PREFIX + "/token")
def registry_login_token(
    project_id: str, who: Principal = Depends(principal), svc: ServiceSet = Depends(services)
) -> Response:
    """The project's registry password (raw text) for ``podman login -u AWS``; a job's is pull-only."""
    project = project_for(svc, who, project_id)
    actions = JOB_ACTIONS if who.is_job else USER_ACTIONS
    token = _registry(svc).login_token(who.user_id, project.workspace_id, project_id, actions)
    return Response(token, media_type="text/plain")


# -- the Docker registry token endpoint -------------------------------------------------------


def _password(request: Request) -> str:
    """The Basic password (any user name, e.g. AWS), or a Bearer token."""
    kind, _, value = request.headers.get("authorization", "").partition(" ")
    value = value.strip()
    if kind.lower() == "basic" and value:
        try:
            _user, sep, password = base64.b64decode(value, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            raise Unauthenticated("malformed Basic credentials") from None
        if sep and password:
            return password
    elif kind.lower() == "bearer" and value:
        return value
    raise Unauthenticated(
        "registry credentials required: log in with user name AWS and the project's registry "
        "token (GET /api/v1/htc/projects/{projectId}/container-registry/token) as the password"
    )


@router.get(TOKEN_PATH)
def registry_token(request: Request, svc: ServiceSet = Depends(services)) -> JSONResponse:
    """Docker registry token spec: ``?service=…&scope=repository:NAME:ACTIONS`` (repeatable)."""
    registry = _registry(svc)
    caller = registry.authenticate(
        _password(request),
        svc.tokens.verify,
        lambda workspace_id, project_id: svc.projects.get(workspace_id, project_id) is not None,
    )
    requested = parse_scopes(request.query_params.getlist("scope"))
    return JSONResponse(registry.issue(caller, requested).response())
