"""Project and task storage from the client's side, whatever backend the server uses.

A :class:`StorageClient` is made from a storage-token route (``…/storage/token``) and hides the
provider the token names: ``AWS`` (any S3 store; boto3 with the token's temporary credentials,
``AWS_ENDPOINT_URL`` for non-AWS endpoints) or ``OPENHTC`` (the server's own object API under
``OPENHTC_STORAGE_URL`` with the bearer ``OPENHTC_STORAGE_TOKEN``). Tokens expire: a new one is
fetched shortly before, and in the middle of a long transfer too::

    with Session() as htc, StorageClient.for_task(htc.connection, pid, tid) as store:
        store.upload("in.csv", store.resolve("inputs/in.csv"))
        for entry in store.list(store.root_key):
            print(store.relative(entry.key), entry.size)

Keys are full object keys (``projects/{p}/tasks/{t}/out/a.txt``); :meth:`StorageClient.resolve`
turns a path relative to the token's root, or an ``s3://``/``openhtc://`` URI, into one.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO, Protocol
from urllib.parse import quote

import httpx

from openhtc import __version__
from openhtc.client._errors import (
    BadRequest,
    Forbidden,
    HtcConnectionError,
    HtcError,
    NotFound,
    Unauthorized,
    error_from_response,
)
from openhtc.client._transport import Closeable, Connection, segment

__all__ = [
    "REMOTE_PREFIX",
    "Progress",
    "StorageClient",
    "StorageEntry",
    "StorageToken",
    "split_uri",
]

REMOTE_PREFIX = "htc:"
"""``htc:PATH`` names PATH relative to the token's storage root on the command line."""

Progress = Callable[[int], None]
"""Called with the number of bytes moved since the previous call."""

CHUNK = 1 << 20
_LIST_PAGE = 1000


def split_uri(uri: str) -> tuple[str, str, str]:
    """``s3://bucket/projects/p/`` -> ``("s3", "bucket", "projects/p/")``."""
    scheme, sep, rest = uri.partition("://")
    if not sep or not scheme:
        raise ValueError(f"not a storage URI: {uri!r}")
    storage, _, key = rest.partition("/")
    return scheme, storage, key


def _instant(value: Any) -> float | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


@dataclass(frozen=True)
class StorageToken:
    """A storage token response: where the storage is and the credentials that reach it."""

    provider: str
    storage_name: str
    region: str
    shared_path: str  # projectSharedStoragePath
    task_path: str | None  # storagePath: task tokens only
    credentials: dict[str, str]
    expires_at: float | None
    raw: dict[str, Any]

    @classmethod
    def from_response(cls, body: Any) -> StorageToken:
        if not isinstance(body, dict) or not isinstance(body.get("credentials"), dict):
            raise HtcError("malformed storage token response: no credentials")
        shared = body.get("projectSharedStoragePath")
        if not isinstance(shared, str):
            raise HtcError("malformed storage token response: no projectSharedStoragePath")
        task = body.get("storagePath")
        return cls(
            provider=str(body.get("provider", "AWS")).upper(),
            storage_name=str(body.get("storageName") or split_uri(shared)[1]),
            region=str(body.get("region", "")),
            shared_path=shared,
            task_path=task if isinstance(task, str) and task else None,
            credentials={str(k): str(v) for k, v in body["credentials"].items()},
            expires_at=_instant(body.get("expiration")),
            raw=body,
        )

    @property
    def root(self) -> str:
        """The storage this token is for: the task's, else the project's shared storage."""
        return self.task_path or self.shared_path

    @property
    def is_local(self) -> bool:
        """Storage on the server's own files (``openhtc://``), reached through its object API
        only: S3 tools cannot use it. (Servers before 0.2 said so with provider "OPENHTC".)"""
        return split_uri(self.root)[0] == "openhtc" or self.provider == "OPENHTC"

    def environment(self) -> dict[str, str]:
        """The credentials plus ``STORAGE_PATH``: what ``aws s3 ls $STORAGE_PATH`` needs."""
        return {**self.credentials, "STORAGE_PATH": self.root}


@dataclass(frozen=True)
class StorageEntry:
    key: str  # a full key; for a "directory" of a non-recursive listing, ends with "/"
    size: int = 0
    last_modified: float | None = None

    @property
    def is_dir(self) -> bool:
        return self.key.endswith("/")


class _Tokens:
    """The current token; a new one is fetched when less than ``margin`` of its life remains."""

    def __init__(self, fetch: Callable[[], Any], clock: Callable[[], float]) -> None:
        self._fetch = fetch
        self._clock = clock
        self._lock = threading.Lock()
        self._token = self._get()

    def _get(self) -> StorageToken:
        token = StorageToken.from_response(self._fetch())
        self._fetched_at = self._clock()
        return token

    def margin(self) -> float:
        """Renew this long before expiry: a quarter of the token's life, at most 5 minutes."""
        if self._token.expires_at is None:
            return 0.0
        return min(300.0, max(self._token.expires_at - self._fetched_at, 0.0) / 4)

    def current(self, force: bool = False) -> StorageToken:
        with self._lock:
            expires = self._token.expires_at
            if force or (expires is not None and self._clock() >= expires - self.margin()):
                self._token = self._get()
            return self._token


class _Backend(Protocol):
    def list(self, prefix: str, recursive: bool) -> Iterator[StorageEntry]: ...
    def upload(self, path: Path, key: str, progress: Progress | None) -> None: ...
    def download(self, key: str, path: Path, progress: Progress | None) -> None: ...
    def delete(self, key: str) -> None: ...
    def close(self) -> None: ...


def _collapse(entries: Iterator[StorageEntry], prefix: str) -> Iterator[StorageEntry]:
    """A recursive listing shown one level deep: deeper keys become their first directory."""
    seen: set[str] = set()
    for entry in entries:
        rest = entry.key[len(prefix) :]
        if "/" in rest:
            folder = prefix + rest.split("/", 1)[0] + "/"
            if folder not in seen:
                seen.add(folder)
                yield StorageEntry(folder)
        else:
            yield entry


class _OpenhtcBackend:
    """The server's object API (provider OPENHTC), over httpx, with the token as a bearer."""

    def __init__(self, tokens: _Tokens, timeout: float) -> None:
        self._tokens = tokens
        self._client = httpx.Client(timeout=timeout, headers={"User-Agent": f"openhtc-client/{__version__}"})

    def close(self) -> None:
        self._client.close()

    def _send(self, method: str, url_or_key: str, **kwargs: Any) -> httpx.Response:
        """One request; on 401 (the token expired early) once more with a new token."""
        response = None
        extra_headers = kwargs.pop("headers", {})
        for force in (False, True):
            creds = self._tokens.current(force=force).credentials
            base = creds.get("OPENHTC_STORAGE_URL", "").rstrip("/")
            url = url_or_key if "://" in url_or_key else f"{base}/htc/storage/objects/{quote(url_or_key)}"
            headers = {"Authorization": f"Bearer {creds.get('OPENHTC_STORAGE_TOKEN', '')}"}
            headers.update(extra_headers)
            request = self._client.build_request(method, url, headers=headers, **kwargs)
            try:
                response = self._client.send(request, stream=True)
            except httpx.TransportError as exc:
                raise HtcConnectionError(f"cannot reach the storage API at {base}: {exc}") from exc
            if response.status_code != 401 or force or "content" in kwargs:
                break  # a streamed upload body cannot be sent twice
            response.close()
        assert response is not None
        if response.status_code >= 400:
            response.read()
            response.close()
            raise error_from_response(response)
        return response

    def list(self, prefix: str, recursive: bool) -> Iterator[StorageEntry]:
        base = self._tokens.current().credentials.get("OPENHTC_STORAGE_URL", "").rstrip("/")
        url: str | None = f"{base}/htc/storage/list"
        params: dict[str, Any] | None = {"prefix": prefix, "pageSize": _LIST_PAGE}

        def entries() -> Iterator[StorageEntry]:
            nonlocal url, params
            while url:
                response = self._send("GET", url, params=params)
                try:
                    body = json.loads(response.read())
                finally:
                    response.close()
                for item in body.get("items", []):
                    modified = _instant(item.get("lastModified"))
                    yield StorageEntry(str(item["key"]), int(item.get("size", 0)), modified)
                url, params = body.get("next") if body.get("items") else None, None

        return entries() if recursive else _collapse(entries(), prefix)

    def upload(self, path: Path, key: str, progress: Progress | None) -> None:
        size = path.stat().st_size

        def chunks() -> Iterator[bytes]:
            with open(path, "rb") as fh:
                while data := fh.read(CHUNK):
                    if progress:
                        progress(len(data))
                    yield data

        headers = {"Content-Length": str(size), "Content-Type": "application/octet-stream"}
        self._send("PUT", key, content=chunks(), headers=headers).close()

    def download(self, key: str, path: Path, progress: Progress | None) -> None:
        response = self._send("GET", key)
        try:
            with _atomic_file(path) as fh:
                for data in response.iter_bytes(CHUNK):
                    fh.write(data)
                    if progress:
                        progress(len(data))
        finally:
            response.close()

    def delete(self, key: str) -> None:
        self._send("DELETE", key).close()


class _S3Backend:
    """An S3 store (provider AWS) through boto3; credentials renew themselves mid-transfer."""

    def __init__(self, tokens: _Tokens, bucket: str) -> None:
        import boto3
        import botocore.session
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config
        from botocore.credentials import CredentialProvider, RefreshableCredentials

        self.bucket = bucket
        first = tokens.current().credentials
        margin = tokens.margin()

        creds = RefreshableCredentials.create_from_metadata(
            metadata=_boto_metadata(tokens.current()),
            refresh_using=lambda: _boto_metadata(tokens.current(force=True)),
            method="openhtc-storage-token",
            advisory_timeout=margin,
            mandatory_timeout=margin / 2,
        )

        class _TokenProvider(CredentialProvider):
            METHOD = "openhtc-storage-token"

            def load(self) -> Any:
                return creds

        session = botocore.session.Session()
        # Ours before every other source, so AWS_* variables and ~/.aws of the caller are ignored.
        session.get_component("credential_provider").insert_before("env", _TokenProvider())
        endpoint = first.get("AWS_ENDPOINT_URL") or None
        config = Config(
            s3={"addressing_style": "path"} if endpoint else {},
            retries={"max_attempts": 5, "mode": "standard"},
        )
        self._s3 = boto3.Session(botocore_session=session).client(
            "s3",
            endpoint_url=endpoint,
            region_name=first.get("AWS_DEFAULT_REGION") or first.get("AWS_REGION") or "us-east-1",
            config=config,
        )
        self._transfer = TransferConfig(multipart_threshold=16 * CHUNK, multipart_chunksize=16 * CHUNK)

    def close(self) -> None:
        self._s3.close()

    def list(self, prefix: str, recursive: bool) -> Iterator[StorageEntry]:
        args: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix}
        if not recursive:
            args["Delimiter"] = "/"
        with _s3_errors(prefix):
            for page in self._s3.get_paginator("list_objects_v2").paginate(**args):
                for folder in page.get("CommonPrefixes", []):
                    yield StorageEntry(folder["Prefix"])
                for obj in page.get("Contents", []):
                    yield StorageEntry(obj["Key"], int(obj["Size"]), obj["LastModified"].timestamp())

    def upload(self, path: Path, key: str, progress: Progress | None) -> None:
        with _s3_errors(key):
            self._s3.upload_file(str(path), self.bucket, key, Callback=progress, Config=self._transfer)

    def download(self, key: str, path: Path, progress: Progress | None) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _s3_errors(key):
            self._s3.download_file(self.bucket, key, str(path), Callback=progress, Config=self._transfer)

    def delete(self, key: str) -> None:
        with _s3_errors(key):
            self._s3.delete_object(Bucket=self.bucket, Key=key)


def _boto_metadata(token: StorageToken) -> dict[str, Any]:
    creds = token.credentials
    expires = token.expires_at if token.expires_at is not None else time.time() + 3600
    return {
        "access_key": creds.get("AWS_ACCESS_KEY_ID", ""),
        "secret_key": creds.get("AWS_SECRET_ACCESS_KEY", ""),
        "token": creds.get("AWS_SESSION_TOKEN") or None,
        "expiry_time": datetime.fromtimestamp(expires).astimezone().isoformat(),
    }


_S3_STATUS: Mapping[int, type[HtcError]] = {400: BadRequest, 401: Unauthorized, 403: Forbidden, 404: NotFound}


@contextmanager
def _s3_errors(key: str) -> Iterator[None]:
    """Turn boto3/botocore failures into the client's HtcError family."""
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except ClientError as exc:
        error = exc.response.get("Error", {})
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        code = str(error.get("Code") or status)
        if code in ("404", "NoSuchKey"):
            status = 404
        cls = _S3_STATUS.get(status, HtcError)
        raise cls(
            f"{key}: {error.get('Message') or code}", status_code=status or None, error_type=code
        ) from exc
    except S3UploadFailedError as exc:
        raise HtcError(f"{key}: {exc}") from exc
    except BotoCoreError as exc:
        raise HtcConnectionError(f"{key}: {exc}") from exc


@contextmanager
def _atomic_file(path: Path) -> Iterator[BinaryIO]:
    """A file written beside ``path`` and renamed onto it only once complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


class StorageClient(Closeable):
    """List, upload, download and delete objects of one project's or task's storage."""

    def __init__(
        self,
        fetch_token: Callable[[], Any],
        *,
        clock: Callable[[], float] = time.time,
        timeout: float = 300.0,
    ) -> None:
        self._tokens = _Tokens(fetch_token, clock)
        token = self._tokens.current()
        self.scheme, self.storage_name, self.root_key = split_uri(token.root)
        self._backend: _Backend
        if token.is_local:
            self._backend = _OpenhtcBackend(self._tokens, timeout)
        else:
            self._backend = _S3Backend(self._tokens, self.storage_name)

    @classmethod
    def for_task(cls, conn: Connection, project_id: str, task_id: str, **kwargs: Any) -> StorageClient:
        """Task storage (and, with a user's token, the project's shared storage beside it)."""
        path = f"/htc/projects/{segment(project_id)}/tasks/{segment(task_id)}/storage/token"
        return cls(lambda: conn.get(path), **kwargs)

    @classmethod
    def for_project(cls, conn: Connection, project_id: str, **kwargs: Any) -> StorageClient:
        """The project's shared storage."""
        return cls(lambda: conn.get(f"/htc/projects/{segment(project_id)}/storage/token"), **kwargs)

    def close(self) -> None:
        self._backend.close()

    @property
    def token(self) -> StorageToken:
        """The current token (renewed when it is about to expire)."""
        return self._tokens.current()

    # -- names ----------------------------------------------------------------------------------

    def resolve(self, path: str) -> str:
        """The key for ``htc:REL``, a bare ``REL`` (both relative to the root) or a URI of this storage."""
        if "://" in path:
            scheme, storage, key = split_uri(path)
            if (scheme, storage) != (self.scheme, self.storage_name):
                raise BadRequest(f"{path} is not in this storage ({self.scheme}://{self.storage_name}/)")
            return key
        rel = path.removeprefix(REMOTE_PREFIX).lstrip("/")
        if any(part in (".", "..") for part in rel.split("/")):
            raise BadRequest(f"{path}: '.' and '..' are not allowed in storage paths")
        return self.root_key + rel

    def url(self, key: str) -> str:
        return f"{self.scheme}://{self.storage_name}/{key}"

    def relative(self, key: str) -> str:
        """``key`` relative to the root when it lies under it, else its full URI."""
        return key[len(self.root_key) :] if key.startswith(self.root_key) else self.url(key)

    # -- objects --------------------------------------------------------------------------------

    def list(self, prefix: str, *, recursive: bool = True) -> Iterator[StorageEntry]:
        """Objects under ``prefix`` in key order; without ``recursive``, deeper levels fold into
        one ``…/`` entry each."""
        return self._backend.list(prefix, recursive)

    def upload(self, local: str | os.PathLike[str], key: str, progress: Progress | None = None) -> None:
        """Upload a file (streamed; multipart for big files on S3)."""
        self._backend.upload(Path(local), key, progress)

    def download(self, key: str, local: str | os.PathLike[str], progress: Progress | None = None) -> None:
        """Download an object to a file, creating its directory; the file appears only when complete."""
        self._backend.download(key, Path(local), progress)

    def delete(self, key: str) -> None:
        self._backend.delete(key)
