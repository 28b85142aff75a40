"""The object store contract every storage backend implements."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

from openhtc.storage.layout import Scope


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    key: str
    size: int
    last_modified: float  # epoch seconds


@dataclass(slots=True)
class ObjectBody:
    """An object being read: its size and its bytes, in chunks; ``close`` releases it."""

    size: int
    chunks: Iterator[bytes]
    _close: list[object] = field(default_factory=list)

    def close(self) -> None:
        for item in self._close:
            close = getattr(item, "close", None)
            if close is not None:
                close()


@dataclass(frozen=True, slots=True)
class Credentials:
    """Scoped credentials as the wire's ``credentials`` map, and when they stop working."""

    values: dict[str, str]
    expires_at: float


class Upload(Protocol):
    """An object being written: bytes go to a temporary place and appear at once on commit."""

    def write(self, data: bytes) -> None: ...

    def commit(self) -> int:
        """Publish the object; returns its size."""
        ...

    def abort(self) -> None: ...


class Backend(Protocol):
    """Where project and task storage lives. Keys are clean (see ``storage.layout``)."""

    provider: str  # the wire's "provider": "AWS" for S3 stores, "UNASSIGNED" for local files
    storage_name: str  # the wire's "storageName": the bucket, or "openhtc-local"

    def url(self, key: str) -> str:
        """The address of a key or prefix as the wire shows it (s3://bucket/key, openhtc://…)."""
        ...

    def open(self) -> None:
        """Get ready at server start (create the bucket or directory if missing)."""
        ...

    def begin_put(self, key: str) -> Upload: ...

    def put_file(self, key: str, path: str) -> None: ...

    def get(self, key: str) -> ObjectBody:
        """The object's bytes; NotFound if there is none."""
        ...

    def download(self, key: str, path: str) -> None: ...

    def list(self, prefix: str, after: str | None, limit: int) -> list[ObjectInfo]:
        """Up to ``limit`` objects under ``prefix`` whose keys sort after ``after``, in key order."""
        ...

    def delete(self, key: str) -> None: ...

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under ``prefix``; returns how many."""
        ...

    def presign_put(self, key: str, ttl: int, api_url: str) -> tuple[str, float]:
        """A URL anyone may PUT the object's bytes to until the returned expiry."""
        ...

    def credentials(self, scope: Scope, ttl: int, session: str, api_url: str) -> Credentials:
        """Temporary credentials reaching exactly ``scope``."""
        ...
