"""The one storage layout, key validation and token scopes; pure, shared by every backend.

    projects/{projectId}/shared/            project-shared storage (inputs)
    projects/{projectId}/tasks/{taskId}/    task storage (outputs)

Every key that reaches a backend passed :func:`clean_relative` or :func:`clean_key`, so no key
escapes its prefix on a filesystem and no two spellings name one object.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote

from openhtc.domain.errors import ValidationFailed

# Where container runtimes mount the two storage folders inside a job.
PROJECT_SHARED_MOUNT = "/htc/project-shared"
TASK_SHARED_MOUNT = "/htc/task-shared"
PROJECT_SHARED_ENV = "PROJECT_SHARED_FOLDER"
TASK_SHARED_ENV = "TASK_SHARED_FOLDER"

MAX_KEY_BYTES = 1024  # the S3 limit
MAX_SEGMENT_BYTES = 255  # NAME_MAX of every Linux filesystem (the local backend's files)


def shared_prefix(project_id: str) -> str:
    return f"projects/{project_id}/shared/"


def task_prefix(project_id: str, task_id: str) -> str:
    return f"projects/{project_id}/tasks/{task_id}/"


def clean_relative(path: str | None, field: str = "filePath") -> str:
    """A relative object path as given by a user, or ValidationFailed naming ``field``.

    Refused: empty, absolute, backslashes, NUL and control characters, empty, ``.`` or ``..``
    segments, and the same hidden behind (repeated) percent-encoding, such as ``%2e%2e``.
    """
    if path is None or path == "":
        raise ValidationFailed("must not be empty", field=field)
    candidate = path
    for _ in range(4):  # %252e%252e -> %2e%2e -> ..: check every decoding
        _check_segments(candidate, field)
        decoded = unquote(candidate)
        if decoded == candidate:
            break
        candidate = decoded
    else:
        raise ValidationFailed("is percent-encoded too many times", field=field)
    if len(path.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
        raise ValidationFailed(f"is longer than {MAX_KEY_BYTES} bytes", field=field)
    return path


def clean_key(key: str | None, field: str = "key") -> str:
    """A full object key (``projects/…``) with the same rules as :func:`clean_relative`."""
    return clean_relative(key, field)


def clean_prefix(prefix: str | None, field: str = "prefix") -> str:
    """A list prefix: a clean key that may end with ``/``."""
    if not prefix:
        raise ValidationFailed("must not be empty", field=field)
    body = prefix[:-1] if prefix.endswith("/") else prefix
    clean_relative(body, field)
    return prefix


def _check_segments(path: str, field: str) -> None:
    if path.startswith("/"):
        raise ValidationFailed("must be a relative path, not an absolute one", field=field)
    if "\\" in path:
        raise ValidationFailed("must not contain backslashes", field=field)
    if any(ord(c) < 0x20 or c == "\x7f" for c in path):
        raise ValidationFailed("must not contain NUL or control characters", field=field)
    for segment in path.split("/"):
        if segment in ("", ".", ".."):
            raise ValidationFailed(
                "must not contain empty, '.' or '..' path segments (no path traversal)", field=field
            )
        if len(segment.encode("utf-8", "surrogatepass")) > MAX_SEGMENT_BYTES:
            raise ValidationFailed(f"has a path segment longer than {MAX_SEGMENT_BYTES} bytes", field=field)


@dataclass(frozen=True, slots=True)
class Scope:
    """What a storage credential reaches: prefixes readable and writable, and read-only ones."""

    rw: tuple[str, ...] = ()
    ro: tuple[str, ...] = ()

    def can_read(self, key: str) -> bool:
        return any(key.startswith(p) for p in (*self.rw, *self.ro))

    def can_write(self, key: str) -> bool:
        return any(key.startswith(p) for p in self.rw)

    @staticmethod
    def for_user_project(project_id: str) -> Scope:
        return Scope(rw=(shared_prefix(project_id),))

    @staticmethod
    def for_user_task(project_id: str, task_id: str) -> Scope:
        # Users upload inputs too, so a user's task token also writes the project's shared folder.
        return Scope(rw=(task_prefix(project_id, task_id), shared_prefix(project_id)))

    @staticmethod
    def for_job(project_id: str, task_id: str) -> Scope:
        return Scope(rw=(task_prefix(project_id, task_id),), ro=(shared_prefix(project_id),))

    @staticmethod
    def for_job_project(project_id: str) -> Scope:
        return Scope(ro=(shared_prefix(project_id),))


def parse_layout(key: str) -> tuple[str, str | None] | None:
    """(projectId, taskId or None for shared) of a key or prefix inside the layout, else None.

    A prefix must reach at least ``projects/p/shared/`` or ``projects/p/tasks/t/``.
    """
    parts = key.split("/")
    if len(parts) >= 4 and parts[0] == "projects" and parts[2] == "shared":
        return parts[1], None
    if len(parts) >= 5 and parts[0] == "projects" and parts[2] == "tasks" and parts[3]:
        return parts[1], parts[3]
    return None
