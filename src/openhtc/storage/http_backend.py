"""A storage ``Backend`` over openhtc's own object API (HTTP), as ``htcctl`` uses it.

For machines that cannot see the server's store: ``htc agent`` stages a job's
PROJECT_SHARED_FOLDER and TASK_SHARED_FOLDER through it (a ``SyncStager`` over this backend),
whatever the server stores on (its local disk or S3).

    GET    {api}/htc/storage/objects/{key}          an object's bytes
    PUT    {api}/htc/storage/objects/{key}          write one (streamed; appears whole or not at all)
    DELETE {api}/htc/storage/objects/{key}
    GET    {api}/htc/storage/list?prefix=&after=&pageSize=

Every request carries a bearer token, and the server checks each key against that token's
scope. The token is the one of the job the call is made for (its lease carries it: a job
token reaches its own task's folder read-write and its project's shared folder read-only),
set around the call with :meth:`HttpBackend.acting_as`; never a broader credential. A token that
expired (a long job) is renewed once with the job's refresh token, as the job itself would.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime
from typing import IO, Any
from urllib.parse import quote

import httpx

from openhtc.domain.errors import (
    Conflict,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
    ValidationFailed,
)
from openhtc.domain.models import JobLaunch
from openhtc.storage.base import Credentials, ObjectBody, ObjectInfo
from openhtc.storage.layout import Scope

CHUNK = 1 << 20
PAGE = 1000  # the object API's largest page
BEARER_ENV = "RESCALE_HTC_BEARER_TOKEN"
REFRESH_ENV = "RESCALE_HTC_REFRESH_TOKEN"


@dataclass(slots=True)
class JobToken:
    """The credentials of one job, as its lease carries them."""

    bearer: str
    refresh: str | None = None

    @staticmethod
    def of(launch: JobLaunch) -> JobToken | None:
        """The job's own tokens from its launch environment. openhtc's entries come first in
        ``batch_envs`` (the user's envs follow and may repeat a name): the first one wins."""
        found: dict[str, str] = {}
        for name, value in launch.batch_envs:
            if name in (BEARER_ENV, REFRESH_ENV) and name not in found:
                found[name] = value
        bearer = found.get(BEARER_ENV)
        return JobToken(bearer, found.get(REFRESH_ENV)) if bearer else None


class HttpBackend:
    provider = "UNASSIGNED"
    storage_name = "openhtc-http"

    def __init__(
        self,
        api_url: str,
        token: JobToken | None = None,
        *,
        client: httpx.Client | None = None,
        timeout: float = 60.0,
    ) -> None:
        """``api_url``: the API's base (``http://host:port/api/v1``). ``token``: the default
        credentials, for callers that act for one principal only; otherwise each call runs
        inside :meth:`acting_as`."""
        self.api_url = api_url.rstrip("/")
        self._default = token
        self._token: ContextVar[JobToken | None] = ContextVar(
            f"openhtc-http-backend-{id(self)}", default=None
        )
        timeout_ = httpx.Timeout(timeout, connect=10.0)
        self._client = client or httpx.Client(timeout=timeout_, follow_redirects=False)

    def close(self) -> None:
        self._client.close()

    @contextlib.contextmanager
    def acting_as(self, token: JobToken) -> Iterator[None]:
        """Make the calls of this thread (and context) inside the block with ``token``."""
        reset = self._token.set(token)
        try:
            yield
        finally:
            self._token.reset(reset)

    # -- Backend --------------------------------------------------------------------------------

    def url(self, key: str) -> str:
        return f"{self.api_url}/htc/storage/objects/{quote(key, safe='/')}"

    def open(self) -> None:
        return None

    def begin_put(self, key: str) -> _HttpUpload:
        return _HttpUpload(self, key)

    def put_file(self, key: str, path: str) -> None:
        with open(path, "rb") as fh:
            self._put(key, fh)

    def _put(self, key: str, fh: IO[bytes]) -> int:
        def send(token: JobToken) -> httpx.Response:
            fh.seek(0)
            return self._client.put(self.url(key), content=_chunks(fh), headers=_auth(token))

        body = self._json(self._call(send, f"PUT {key}"))
        return int(body.get("size", 0))

    def get(self, key: str) -> ObjectBody:
        def send(token: JobToken) -> httpx.Response:
            request = self._client.build_request("GET", self.url(key), headers=_auth(token))
            resp = self._client.send(request, stream=True)
            if resp.status_code >= 400:
                resp.read()
                resp.close()
            return resp

        resp = self._call(send, f"GET {key}")
        size = int(resp.headers.get("content-length") or 0)
        return ObjectBody(size, resp.iter_bytes(CHUNK), [resp])

    def download(self, key: str, path: str) -> None:
        body = self.get(key)
        try:
            with open(path, "wb") as fh:
                for chunk in body.chunks:
                    fh.write(chunk)
        except httpx.HTTPError as exc:
            raise Unavailable(f"the server broke off sending {key}: {exc}") from None
        finally:
            body.close()

    def list(self, prefix: str, after: str | None, limit: int) -> list[ObjectInfo]:
        found: list[ObjectInfo] = []
        while len(found) < limit:
            params = {"prefix": prefix, "pageSize": str(min(PAGE, limit - len(found)))}
            if after:
                params["after"] = after

            def send(token: JobToken, params: dict[str, str] = params) -> httpx.Response:
                return self._client.get(
                    f"{self.api_url}/htc/storage/list", params=params, headers=_auth(token)
                )

            body = self._json(self._call(send, f"list {prefix}"))
            items = body.get("items") or []
            found.extend(
                ObjectInfo(item["key"], int(item["size"]), _epoch(item.get("lastModified"))) for item in items
            )
            if not items or not body.get("next"):
                break
            after = items[-1]["key"]
        return found

    def delete(self, key: str) -> None:
        def send(token: JobToken) -> httpx.Response:
            return self._client.delete(self.url(key), headers=_auth(token))

        with contextlib.suppress(NotFound):  # already gone: what was asked
            self._call(send, f"DELETE {key}")

    def delete_prefix(self, prefix: str) -> int:
        count = 0
        while page := self.list(prefix, None, PAGE):
            for obj in page:
                self.delete(obj.key)
                count += 1
        return count

    def presign_put(self, key: str, ttl: int, api_url: str) -> tuple[str, float]:
        raise Unavailable("presigned URLs are made by the server, not through its object API")

    def credentials(self, scope: Scope, ttl: int, session: str, api_url: str) -> Credentials:
        raise Unavailable("storage credentials are minted by the server, not through its object API")

    # -- beyond the Backend contract ------------------------------------------------------------

    def task_deleted(self, project_id: str, task_id: str) -> bool:
        """Whether the task was deleted (its storage freed): no output may bring it back."""

        def send(token: JobToken) -> httpx.Response:
            url = f"{self.api_url}/htc/projects/{quote(project_id, safe='')}/tasks/{quote(task_id, safe='')}"
            return self._client.get(url, headers=_auth(token))

        try:
            body = self._json(self._call(send, f"task {task_id}"))
        except NotFound:
            return True
        return body.get("lifecycleStatus") == "DELETED"

    # -- the wire -------------------------------------------------------------------------------

    def _current(self) -> JobToken:
        token = self._token.get() or self._default
        if token is None:
            raise Unauthenticated("no job token to reach the server's storage with")
        return token

    def _call(self, send: Any, what: str) -> httpx.Response:
        """``send(token)`` once, and again with a renewed token if the server said 401."""
        token = self._current()
        try:
            resp: httpx.Response = send(token)
            if resp.status_code == 401 and token.refresh and self._renew(token):
                resp = send(token)
        except httpx.HTTPError as exc:
            raise Unavailable(f"{what}: cannot reach the server ({exc or type(exc).__name__})") from None
        if resp.status_code < 400:
            return resp
        raise _error(resp, what)

    def _renew(self, token: JobToken) -> bool:
        """A fresh bearer from the job's refresh token (``GET /auth/token``); updates ``token``."""
        resp = self._client.get(
            f"{self.api_url}/auth/token", headers={"Authorization": f"Refresh {token.refresh}"}
        )
        if resp.status_code != 200:
            return False
        token.bearer = resp.json()["tokenValue"]
        return True

    @staticmethod
    def _json(resp: httpx.Response) -> dict[str, Any]:
        try:
            body = resp.json()
        except ValueError:
            raise Unavailable(f"the server answered {resp.status_code} without JSON") from None
        return body if isinstance(body, dict) else {}


class _HttpUpload:
    """Bytes go to a local temporary file; ``commit`` sends them in one PUT."""

    def __init__(self, backend: HttpBackend, key: str) -> None:
        self.backend = backend
        self.key = key
        self._fh = tempfile.TemporaryFile()  # noqa: SIM115 - closed by commit or abort

    def write(self, data: bytes) -> None:
        self._fh.write(data)

    def commit(self) -> int:
        try:
            return self.backend._put(self.key, self._fh)
        finally:
            self._fh.close()

    def abort(self) -> None:
        self._fh.close()


def _auth(token: JobToken) -> dict[str, str]:
    return {"Authorization": f"Bearer {token.bearer}"}


def _chunks(fh: IO[bytes]) -> Iterator[bytes]:
    while chunk := fh.read(CHUNK):
        yield chunk


def _epoch(stamp: str | None) -> float:
    if not stamp:
        return 0.0
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def _error(resp: httpx.Response, what: str) -> Exception:
    """The server's answer as the project's own error (the message it gave, if any)."""
    try:
        body = resp.json()
        message = body.get("message") or body.get("detail") or resp.text
    except ValueError:
        message = resp.text
    text = f"{what}: {str(message)[:300]}"
    status = resp.status_code
    if status == 401:
        return Unauthenticated(text)
    if status == 403:
        return PermissionDenied(text)
    if status == 404:
        return NotFound(text)
    if status == 409:
        return Conflict(text)
    if status in (400, 422):
        return ValidationFailed(text)
    return Unavailable(f"{text} (HTTP {status})")
