"""OCI image config (Entrypoint, Cmd, Env, WorkingDir, User) and user lookup inside a rootfs."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class ImageError(Exception):
    """An image cannot be pulled, verified, unpacked or run; the message says why."""


@dataclass(frozen=True, slots=True)
class ImageConfig:
    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    working_dir: str = ""
    user: str = ""

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> ImageConfig:
        """Parse the ``config`` part of an OCI / Docker image configuration blob."""
        conf = doc.get("config") or doc.get("container_config") or {}
        env = []
        for item in conf.get("Env") or ():
            name, sep, value = str(item).partition("=")
            if sep:
                env.append((name, value))
        return cls(
            entrypoint=tuple(str(a) for a in conf.get("Entrypoint") or ()),
            cmd=tuple(str(a) for a in conf.get("Cmd") or ()),
            env=tuple(env),
            working_dir=str(conf.get("WorkingDir") or ""),
            user=str(conf.get("User") or ""),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "config": {
                "Entrypoint": list(self.entrypoint),
                "Cmd": list(self.cmd),
                "Env": [f"{k}={v}" for k, v in self.env],
                "WorkingDir": self.working_dir,
                "User": self.user,
            }
        }


@dataclass(frozen=True, slots=True)
class User:
    uid: int
    gid: int
    home: str


@contextlib.contextmanager
def open_in_root(root: str, relpath: str) -> Iterator[int]:
    """Open ``root/relpath`` for reading without following any symlink on the way.

    An image's ``/etc/passwd`` may be a symlink (to ``/etc/shadow`` of the host, say): opening
    it with plain ``open()`` on the host would follow it out of the rootfs.
    """
    parts = [p for p in relpath.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        raise OSError(errno.EINVAL, f"bad path {relpath!r}")
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for part in parts[:-1]:
            nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = nxt
        leaf = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW, dir_fd=fd)
    finally:
        os.close(fd)
    try:
        yield leaf
    finally:
        os.close(leaf)


def _table(root: str, relpath: str) -> list[list[str]]:
    try:
        with open_in_root(root, relpath) as fd, os.fdopen(os.dup(fd), "rb") as fh:
            data = fh.read(4 << 20)
    except OSError:
        return []
    rows = []
    for line in data.decode("utf-8", "replace").splitlines():
        if line and not line.startswith("#"):
            rows.append(line.split(":"))
    return rows


def resolve_user(root: str, spec: str) -> User:
    """Map an image ``User`` (``name``, ``uid``, ``name:group``, ``uid:gid``) to numeric ids.

    Names are looked up in the image's own ``/etc/passwd`` and ``/etc/group``, as runc does.
    """
    spec = spec.strip()
    if not spec:
        spec = "0"
    user_part, _, group_part = spec.partition(":")
    passwd = _table(root, "etc/passwd")
    entry = None
    if user_part.isdigit():
        uid = int(user_part)
        entry = next((r for r in passwd if len(r) >= 6 and r[2] == user_part), None)
    else:
        entry = next((r for r in passwd if len(r) >= 6 and r[0] == user_part), None)
        if entry is None or not entry[2].isdigit():
            raise ImageError(f"user {user_part!r} of the image is not in its /etc/passwd")
        uid = int(entry[2])
    # A numeric user missing from /etc/passwd gets group 0, as with docker and runc.
    gid = int(entry[3]) if entry is not None and entry[3].isdigit() else 0
    if group_part:
        if group_part.isdigit():
            gid = int(group_part)
        else:
            group = next((r for r in _table(root, "etc/group") if len(r) >= 3 and r[0] == group_part), None)
            if group is None or not group[2].isdigit():
                raise ImageError(f"group {group_part!r} of the image is not in its /etc/group")
            gid = int(group[2])
    home = entry[5] if entry is not None and entry[5] else "/"
    return User(uid, gid, home)
