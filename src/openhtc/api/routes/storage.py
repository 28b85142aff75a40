"""Storage: token routes, presigned uploads, storage options, and openhtc's object API.

The object API (``/htc/storage/objects``, ``/htc/storage/list``) serves every backend: it takes
an openhtc storage token (the local backend's credentials) or a normal API bearer token, whose
principal reaches what its token routes would give it. On an S3 backend, tools use S3 itself
with the token's AWS credentials; the object API is there for clients that speak only HTTP.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Request
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response, StreamingResponse

from openhtc.api.deps import credentials, principal, project_for, services, task_for
from openhtc.api.pagination import first, page_size
from openhtc.api.responses import JSONResponse
from openhtc.auth.tokens import Principal
from openhtc.domain.clock import iso
from openhtc.domain.errors import NotFound
from openhtc.services.service_set import ServiceSet
from openhtc.services.storage import StorageService, StorageToken
from openhtc.storage.layout import clean_key, clean_prefix

router = APIRouter()
PROJECT = "/htc/projects/{project_id}/storage"
TASK = "/htc/projects/{project_id}/tasks/{task_id}/storage"


def _storage(svc: ServiceSet) -> StorageService:
    if svc.storage is None:
        raise NotFound("this server has no storage configured")
    return svc.storage


def _origin(request: Request) -> str:
    proto = request.headers.get("x-forwarded-proto") or request.url.scheme
    host = request.headers.get("x-forwarded-host") or request.headers.get("host") or request.url.netloc
    return f"{proto}://{host}"


def api_url(request: Request) -> str:
    """The absolute base of this API as the caller reached it (behind a proxy too)."""
    return _origin(request) + "/api/v1"


def token_body(token: StorageToken) -> dict[str, Any]:
    body: dict[str, Any] = {
        "projectSharedStoragePath": token.shared_path,
        "projectId": token.project_id,
        "storageName": token.storage_name,
        "region": token.region,
        "user": token.user,
        "expiration": iso(token.credentials.expires_at),
        "credentials": token.credentials.values,
        "provider": token.provider,
    }
    if token.task_id is not None:
        body["storagePath"] = token.task_path
        body["taskId"] = token.task_id
    return body


# -- project storage ----------------------------------------------------------------------------


def _project_token(request: Request, svc: ServiceSet, who: Principal, project_id: str) -> StorageToken:
    project = project_for(svc, who, project_id)
    return _storage(svc).project_token(who, project, api_url(request))


@router.get(PROJECT + "/token")
def project_token(
    project_id: str,
    request: Request,
    who: Principal = Depends(principal),
    svc: ServiceSet = Depends(services),
) -> JSONResponse:
    return JSONResponse(token_body(_project_token(request, svc, who, project_id)))


@router.get(PROJECT + "/token/{region}")
def project_token_in(
    project_id: str,
    region: str,
    request: Request,
    who: Principal = Depends(principal),
    svc: ServiceSet = Depends(services),
) -> JSONResponse:
    _storage(svc).check_region(region)
    return JSONResponse(token_body(_project_token(request, svc, who, project_id)))


@router.get(PROJECT + "/tokens")
def project_tokens(
    project_id: str,
    request: Request,
    who: Principal = Depends(principal),
    svc: ServiceSet = Depends(services),
) -> JSONResponse:
    token = token_body(_project_token(request, svc, who, project_id))
    return JSONResponse({"defaultRegion": _storage(svc).region, "regionStores": [token]})


@router.get(PROJECT + "/presigned-url")
def project_presigned_url(
    project_id: str,
    request: Request,
    who: Principal = Depends(principal),
    svc: ServiceSet = Depends(services),
) -> JSONResponse:
    project = project_for(svc, who, project_id)
    url, expires = _storage(svc).presigned_put(
        who, project.id, None, first(request, "filePath"), api_url(request)
    )
    return JSONResponse(_presigned_body(svc, url, expires))


def _presigned_body(svc: ServiceSet, url: str, expires: float) -> dict[str, Any]:
    return {
        "url": url,
        "storageName": _storage(svc).backend.storage_name,
        "region": _storage(svc).region,
        "expiration": iso(expires),
    }


# -- task storage -------------------------------------------------------------------------------


def _task_token(
    request: Request, svc: ServiceSet, who: Principal, project_id: str, task_id: str
) -> StorageToken:
    _, task = task_for(svc, who, project_id, task_id)
    return _storage(svc).task_token(who, task, api_url(request))


@router.get(TASK + "/token")
def task_token(
    project_id: str,
    task_id: str,
    request: Request,
    who: Principal = Depends(principal),
    svc: ServiceSet = Depends(services),
) -> JSONResponse:
    return JSONResponse(token_body(_task_token(request, svc, who, project_id, task_id)))


@router.get(TASK + "/token/{region}")
def task_token_in(
    project_id: str,
    task_id: str,
    region: str,
    request: Request,
    who: Principal = Depends(principal),
    svc: ServiceSet = Depends(services),
) -> JSONResponse:
    _storage(svc).check_region(region)
    return JSONResponse(token_body(_task_token(request, svc, who, project_id, task_id)))


@router.get(TASK + "/tokens")
def task_tokens(
    project_id: str,
    task_id: str,
    request: Request,
    who: Principal = Depends(principal),
    svc: ServiceSet = Depends(services),
) -> JSONResponse:
    token = token_body(_task_token(request, svc, who, project_id, task_id))
    return JSONResponse({"defaultRegion": _storage(svc).region, "regionStores": [token]})


@router.get(TASK + "/regional-storage")
def regional_storage(
    project_id: str,
    task_id: str,
    request: Request,
    who: Principal = Depends(principal),
    svc: ServiceSet = Depends(services),
) -> JSONResponse:
    token = _task_token(request, svc, who, project_id, task_id)
    store = {
        "region": token.region,
        "projectPath": token.shared_path,
        "taskPath": token.task_path,
        "credentials": token.credentials.values,
        "provider": token.provider,
    }
    return JSONResponse({"rescaleRegion": _storage(svc).region, "regionalStores": [store]})


@router.get(TASK + "/presigned-url")
def task_presigned_url(
    project_id: str,
    task_id: str,
    request: Request,
    who: Principal = Depends(principal),
    svc: ServiceSet = Depends(services),
) -> JSONResponse:
    _, task = task_for(svc, who, project_id, task_id)
    url, expires = _storage(svc).presigned_put(
        who, project_id, task, first(request, "filePath"), api_url(request)
    )
    return JSONResponse(_presigned_body(svc, url, expires))


# -- storage options ----------------------------------------------------------------------------


def _option(svc: ServiceSet) -> dict[str, str]:
    backend = _storage(svc).backend
    return {"storageName": backend.storage_name, "region": _storage(svc).region, "provider": backend.provider}


@router.get("/htc/storage")
def storage_options(
    _who: Principal = Depends(principal), svc: ServiceSet = Depends(services)
) -> JSONResponse:
    return JSONResponse([_option(svc)])


@router.get("/htc/storage/region/{region}")
def storage_option(
    region: str, _who: Principal = Depends(principal), svc: ServiceSet = Depends(services)
) -> JSONResponse:
    _storage(svc).check_region(region)
    return JSONResponse(_option(svc))


# -- the object API -----------------------------------------------------------------------------


@router.get("/htc/storage/objects/{key:path}")
def get_object(key: str, request: Request, svc: ServiceSet = Depends(services)) -> Response:
    key = clean_key(key)
    _storage(svc).access(credentials(request, "Bearer")).check_read(key)
    body = _storage(svc).backend.get(key)
    return StreamingResponse(
        body.chunks,
        media_type="application/octet-stream",
        headers={"Content-Length": str(body.size)},
        background=BackgroundTask(body.close),
    )


@router.put("/htc/storage/objects/{key:path}")
async def put_object(key: str, request: Request, svc: ServiceSet = Depends(services)) -> JSONResponse:
    key = clean_key(key)
    access = await run_in_threadpool(_storage(svc).access, credentials(request, "Bearer"))
    await run_in_threadpool(access.check_write, key)
    return JSONResponse({"key": key, "size": await _receive(request, svc, key)})


@router.put("/htc/storage/upload/{key:path}")
async def presigned_upload(key: str, request: Request, svc: ServiceSet = Depends(services)) -> JSONResponse:
    """Where the local backend's presigned URLs point: no credentials but the URL's signature."""
    key = clean_key(key)
    _storage(svc).check_presigned(key, first(request, "expires"), first(request, "signature"))
    return JSONResponse({"key": key, "size": await _receive(request, svc, key)})


async def _receive(request: Request, svc: ServiceSet, key: str) -> int:
    """Stream the request body into the object; nothing appears unless all of it arrived."""
    upload = await run_in_threadpool(_storage(svc).backend.begin_put, key)
    try:
        async for chunk in request.stream():
            if chunk:
                upload.write(chunk)
        return await run_in_threadpool(upload.commit)
    except BaseException:
        upload.abort()
        raise


@router.delete("/htc/storage/objects/{key:path}")
def delete_object(key: str, request: Request, svc: ServiceSet = Depends(services)) -> Response:
    key = clean_key(key)
    _storage(svc).access(credentials(request, "Bearer")).check_write(key)
    _storage(svc).backend.delete(key)
    return Response(status_code=204)


@router.get("/htc/storage/list")
def list_objects(request: Request, svc: ServiceSet = Depends(services)) -> JSONResponse:
    prefix = clean_prefix(first(request, "prefix"))
    size = page_size(request, default=1000, maximum=1000)
    after = first(request, "after") or None
    _storage(svc).access(credentials(request, "Bearer")).check_list(prefix)
    found = _storage(svc).backend.list(prefix, after, size + 1)
    body: dict[str, Any] = {
        "items": [{"key": o.key, "size": o.size, "lastModified": iso(o.last_modified)} for o in found[:size]]
    }
    if len(found) > size:
        params = [(k, v) for k, v in request.query_params.multi_items() if k != "after"]
        params.append(("after", found[size - 1].key))
        body["next"] = f"{_origin(request)}{request.url.path}?{urlencode(params)}"
    return JSONResponse(body)
