"""Start-up checks of `htc server`: each problem becomes one clear line, before anything is made.

The order matters (see :func:`openhtc.wiring.serve`): the settings are checked first, then the
listen port is bound (so a port in use is reported before the data directory, the database or
the admin key exist), then the data directory is locked so that only one server owns it.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
from pathlib import Path

from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from openhtc.config import Settings
from openhtc.domain.errors import InsufficientStorage, OpenHTCError, Unavailable
from openhtc.store.db import failure

LOCK_FILE = "server.lock"


class StartupError(Exception):
    """The server cannot start; the message says why and what to do, in a line or two."""


def check_settings(settings: Settings) -> None:
    """Refuse settings that would be silently ignored."""
    if settings.storage == "local":
        given = [
            name
            for name in ("s3_endpoint", "s3_bucket", "s3_access_key", "s3_secret_key", "s3_role_arn")
            if getattr(settings, name) is not None
        ]
        if "s3_region" in settings.model_fields_set:
            given.append("s3_region")
        if given:
            flags = ", ".join("--" + name.replace("_", "-") for name in given)
            raise StartupError(
                f"{flags} given but storage is 'local', which would ignore them: add --storage s3 "
                "(or --storage seaweedfs), or remove the S3 settings"
            )


def bind_listener(host: str, port: int) -> socket.socket:
    """The API's listening socket, bound now so a port in use is known before anything is made.

    SO_REUSEADDR, as uvicorn sets it: a previous server's connections in TIME_WAIT do not
    make the port look taken.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        reason = "address already in use" if exc.errno == errno.EADDRINUSE else exc.strerror or str(exc)
        raise StartupError(
            f"cannot listen on {host}:{port}: {reason}; stop what uses it or choose another --port"
        ) from None
    sock.set_inheritable(False)
    return sock


class DataDirLock:
    """An exclusive flock on DATA_DIR/server.lock, held for the server's life.

    The kernel drops it when the process ends, however it ends (kill -9 included), so a stale
    file never blocks a restart. The file holds the owner's pid and address for the refusal.
    """

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / LOCK_FILE
        self._fd: int | None = None

    def _refusal(self, pid: str, where: str) -> str:
        return (
            f"data directory {self.path.parent} is in use by another openhtc server "
            f"(pid {pid}, listening on {where}); stop it or choose another --data-dir"
        )

    def acquire(self, host: str, port: int) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise StartupError(_not_writable(self.path.parent, exc)) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 256, 0).decode(errors="replace").split()
            os.close(fd)
            pid, where = [*owner, "?", "?"][:2]
            raise StartupError(self._refusal(pid, where)) from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {host}:{port}\n".encode(), 0)
        except OSError as exc:
            os.close(fd)
            raise StartupError(_not_writable(self.path.parent, exc)) from None
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the lock; the file stays (removing it would race)
            self._fd = None


class SqliteLock(DataDirLock):
    """SQLite allows one server: a flock beside the database file, for two data directories
    whose --database-url name one SQLite file (the data-directory lock covers the default)."""

    def __init__(self, database: Path) -> None:
        super().__init__(database.parent)
        self.database = database
        self.path = database.with_name(database.name + ".server.lock")

    def _refusal(self, pid: str, where: str) -> str:
        return (
            f"SQLite database {self.database} is in use by another openhtc server (pid {pid}, "
            f"listening on {where}); SQLite allows one server: stop it, or use PostgreSQL "
            "(--database-url postgresql://…) to run several servers on one database"
        )


def sqlite_file(settings: Settings) -> Path | None:
    """The SQLite database file, or None for PostgreSQL or an in-memory database."""
    url = settings.resolved_database_url()
    if not url.startswith("sqlite") or "///" not in url:
        return None
    path = url.split("///", 1)[1].split("?", 1)[0]
    return None if not path or path == ":memory:" else Path(path).resolve()


def _not_writable(directory: Path, exc: OSError) -> str:
    return (
        f"data directory {directory} is not writable ({exc.strerror or exc}); "
        "fix its permissions or choose another --data-dir"
    )


def _database_name(settings: Settings) -> str:
    url = settings.resolved_database_url()
    if url.startswith("sqlite"):
        return f"SQLite {url.split('///', 1)[1] if '///' in url else url}"
    return "PostgreSQL " + make_url(url).render_as_string(hide_password=True).split("://", 1)[1]


def explain_database_failure(settings: Settings, exc: BaseException) -> str:
    """One or two lines for a database that cannot be opened at start-up."""
    if isinstance(exc, OpenHTCError) and not isinstance(exc, (Unavailable, InsufficientStorage)):
        return exc.message  # a settings problem found while building the services
    cause = exc.__cause__ if isinstance(exc, OpenHTCError) and exc.__cause__ else exc
    detail = str(cause.orig if isinstance(cause, DBAPIError) else cause).strip().splitlines()[0]
    name = _database_name(settings)
    known = failure(cause)
    if isinstance(known, InsufficientStorage):
        return f"database {name}: the disk is full ({detail}); free space and start again"
    lowered = detail.lower()
    if "file is not a database" in lowered or "malformed" in lowered:
        return (
            f"database {name} is corrupted or not an openhtc database ({detail}); "
            "restore it from a backup, or move it away to start with an empty one"
        )
    if "readonly" in lowered or "read-only" in lowered or "unable to open" in lowered:
        return (
            f"database {name} cannot be written ({detail}); make the file and its directory "
            "writable by this user, or choose another --data-dir / --database-url"
        )
    if isinstance(known, Unavailable):
        return f"cannot reach the database {name} ({detail}); check that it runs and --database-url"
    return f"database {name} cannot be used ({detail})"


def describe(settings: Settings, runtime_name: str) -> list[str]:
    """The start-up summary: where the server listens, what it stores where, what runs jobs."""
    if settings.storage == "local":
        storage = f"local ({settings.data_dir / 'storage'})"
    else:
        endpoint = settings.s3_endpoint or "AWS"
        storage = f"{settings.storage} (endpoint {endpoint}, bucket {settings.s3_bucket})"
    lines = [
        f"listening on http://{settings.host}:{settings.port} (API at /api/v1)",
        f"data directory: {settings.data_dir}",
        f"database: {_database_name(settings)}",
        f"storage: {storage}",
        f"executor runtime: {runtime_name} (configured: {settings.runtime})",
    ]
    if not settings.resolved_database_url().startswith("sqlite"):
        lines.append(
            "several servers may share this database (one leads: GET /health); a registry they "
            "share trusts what `htc admin registry-config` prints (docs/deployment.md)"
        )
    return lines
