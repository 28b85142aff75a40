"""Apply image layers (tar streams) to a root filesystem directory, safely.

Whiteouts follow the OCI layer spec: ``dir/.wh.name`` deletes ``name`` from the layers below,
``dir/.wh..wh..opq`` hides everything the layers below put in ``dir``. Entries are checked
before anything is written: absolute names and ``..`` reject the image; an entry whose parent
is a symlink rejects it too (a layer could otherwise write through ``etc -> /etc`` onto the
host); hard links must point inside the rootfs; device nodes are skipped (jobs get their own
``/dev``). Ownership is not kept: files belong to the executor's user, which the sandbox maps to
the job's user. Set-uid and set-gid bits are dropped.
"""

from __future__ import annotations

import os
import shutil
import stat
import tarfile
from typing import IO

from openhtc.runtimes.images.oci import ImageError

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
MOUNT_POINTS = ("proc", "dev", "sys", "tmp", "etc")
_O_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def clean_name(name: str) -> str:
    """The normalised relative path of a layer entry ('' for the root itself)."""
    if name.startswith("/"):
        raise ImageError(f"layer entry {name!r} is an absolute path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ImageError(f"layer entry {name!r} leaves the root filesystem")
    return "/".join(parts)


class LayerUnpacker:
    """Unpacks the layers of one image, lowest first, into ``root``."""

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        os.makedirs(self.root, exist_ok=True)
        self._dirs: set[str] = {""}  # relative paths known to be real directories
        self.size = 0  # bytes of file data written, for the cache's size accounting
        self.skipped: list[str] = []

    def _full(self, rel: str) -> str:
        return os.path.join(self.root, rel) if rel else self.root

    def _parent(self, rel: str, create: bool) -> bool:
        """Make sure every directory above ``rel`` is a real directory (no symlink).

        Returns False when one is missing and ``create`` is False.
        """
        parent = rel.rpartition("/")[0]
        if parent in self._dirs:
            return True
        path = ""
        for part in parent.split("/"):
            path = f"{path}/{part}" if path else part
            if path in self._dirs:
                continue
            try:
                st = os.lstat(self._full(path))
            except FileNotFoundError:
                if not create:
                    return False
                os.mkdir(self._full(path), 0o755)
            else:
                if stat.S_ISLNK(st.st_mode):
                    raise ImageError(f"layer entry {rel!r} goes through the symlink {path!r}")
                if not stat.S_ISDIR(st.st_mode):
                    if not create:
                        return False
                    raise ImageError(f"layer entry {rel!r} is below {path!r}, which is not a directory")
            self._dirs.add(path)
        return True

    def _remove(self, rel: str) -> None:
        full = self._full(rel)
        try:
            st = os.lstat(full)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(full)
            self._dirs = {d for d in self._dirs if d != rel and not d.startswith(rel + "/")}
        else:
            os.unlink(full)

    def _opaque(self, rel: str, seen: set[str]) -> None:
        """Hide what lower layers put in ``rel``; keep what this layer already added."""
        full = self._full(rel)
        if not os.path.isdir(full) or os.path.islink(full):
            return
        for entry in os.scandir(full):
            child = f"{rel}/{entry.name}" if rel else entry.name
            if child not in seen:
                self._remove(child)
            elif entry.is_dir(follow_symlinks=False):
                self._opaque(child, seen)

    def apply(self, stream: IO[bytes]) -> None:
        """Apply one layer, a tar stream (plain, gzip, bzip2 or xz)."""
        seen: set[str] = set()
        try:
            with tarfile.open(fileobj=stream, mode="r|*") as tar:
                for member in tar:
                    self._entry(tar, member, seen)
        except tarfile.TarError as exc:
            raise ImageError(f"a layer is not a valid tar archive: {exc}") from exc

    def _entry(self, tar: tarfile.TarFile, member: tarfile.TarInfo, seen: set[str]) -> None:
        rel = clean_name(member.name)
        if not rel:
            return
        base = rel.rpartition("/")[2]
        if base.startswith(WHITEOUT):
            if not self._parent(rel, create=False):
                return
            directory = rel.rpartition("/")[0]
            if base == OPAQUE:
                self._opaque(directory, seen)
            else:
                target = f"{directory}/{base[len(WHITEOUT) :]}" if directory else base[len(WHITEOUT) :]
                if target not in seen:
                    self._remove(target)
            return
        if (
            member.ischr()
            or member.isblk()
            or not (member.isdir() or member.isreg() or member.issym() or member.islnk() or member.isfifo())
        ):
            self.skipped.append(rel)
            return
        self._parent(rel, create=True)
        full = self._full(rel)
        mode = member.mode & 0o1777  # no set-uid / set-gid
        seen.add(rel)
        try:
            existing = os.lstat(full)
        except FileNotFoundError:
            existing = None
        if member.isdir():
            if existing is not None and stat.S_ISDIR(existing.st_mode):
                os.chmod(full, mode)
            else:
                if existing is not None:
                    os.unlink(full)
                os.mkdir(full, mode)
                os.chmod(full, mode)
            self._dirs.add(rel)
            return
        if existing is not None:
            self._remove(rel)
        if member.isreg():
            fd = os.open(full, _O_NEW, 0o600)
            with os.fdopen(fd, "wb") as out:
                source = tar.extractfile(member)
                if source is not None:
                    shutil.copyfileobj(source, out, 1 << 20)
                os.fchmod(fd, mode)
                os.utime(fd, (member.mtime, member.mtime))
            self.size += member.size
        elif member.issym():
            os.symlink(member.linkname, full)
        elif member.islnk():
            target = clean_name(member.linkname)
            if not target or not self._parent(target, create=False):
                raise ImageError(f"hard link {rel!r} points outside the image: {member.linkname!r}")
            try:
                if stat.S_ISDIR(os.lstat(self._full(target)).st_mode):
                    raise ImageError(f"hard link {rel!r} points to a directory")
                os.link(self._full(target), full, follow_symlinks=False)
            except FileNotFoundError as exc:
                raise ImageError(f"hard link {rel!r} points to a missing file {target!r}") from exc
        else:  # fifo
            os.mkfifo(full, mode)

    def finish(self) -> None:
        """Create the mount points the sandbox needs if the image lacks them."""
        for name in MOUNT_POINTS:
            full = self._full(name)
            if not os.path.lexists(full):
                os.mkdir(full)
                os.chmod(full, 0o1777 if name == "tmp" else 0o755)
