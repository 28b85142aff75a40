"""Size-capped writable root filesystems for jobs: an overlay on a loop-mounted ext4 disk.

Each job sees its image's rootfs as a writable ``/``: an overlay whose lower layer is the
cached, shared rootfs and whose upper layer lives on a small ext4 filesystem in a sparse file,
loop-mounted on the host, of exactly ``maxDiskGiB``. Writing past it fails with ENOSPC, on disk
rather than in memory (a size-capped tmpfs would also cap it, but in RAM, charged to the job's
memory limit). The kernel here has no quota support (CONFIG_QUOTA), which rules out project
quotas on a shared filesystem.

Making a disk costs ~15 ms (truncate, mkfs, mount), so disks are pooled by size and reused.
A job that leaves its upper layer empty (it wrote nothing that outlives it) leaves the overlay
mounted for the next job of the same image: such a job costs no mount at all. Otherwise the
overlay is unmounted (~1 ms with the next mount) and what the job wrote is removed. The disks
are mounted with ``discard``, so deleted files give their space back to the host.

Removing what a job wrote does not always free it: a mount namespace made on the host while
the overlay was mounted (by any process: a service, a container, ``unshare``) holds a copy of
it, which keeps the overlay, and the files it has seen, alive after our unmount (a deleted file
still open anywhere, too). So the files are truncated before they are removed, and a disk is
handed out only if (nearly) all of it is free (one ``statvfs``); a short one is replaced.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import stat
import subprocess
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

log = logging.getLogger("openhtc.runtimes.scratch")
MNT_DETACH = 2
GIB = 1 << 30
# What a clean disk may have in use besides ext4's own overhead: its few directories (upper,
# work, root, the sandbox's mount points), a few KiB. A job's leftovers are far more.
SLACK_BYTES = 1 << 20
UPPER_MODE = 0o40755  # a directory, rwxr-xr-x: the job's / as the overlay shows it
ROOT_XATTRS = {"trusted.overlay.uuid"}  # what overlayfs itself puts on the upper dir
SANDBOX_DIR_MODES = (0o40755, 0o40700)  # the modes of the mount points bwrap creates


class ScratchError(Exception):
    pass


@dataclass(slots=True)
class _Disk:
    size: int
    image: str
    mountpoint: str
    # The lower layer of the overlay left mounted on it: (path, dev, inode, ctime). The
    # identity, not just the path, tells a rootfs evicted and pulled again from the one mounted.
    lower: tuple[str, int, int, int] | None = None

    def path(self, name: str) -> str:
        return os.path.join(self.mountpoint, name)


class ScratchPool:
    def __init__(self, root: str, keep_free: int = 16) -> None:
        self.root = os.path.abspath(root)
        if "," in self.root or ":" in self.root:
            raise ScratchError(f"the work directory {self.root!r} must not contain ',' or ':' (overlay)")
        for tool in ("mkfs.ext4", "mount"):
            if shutil.which(tool) is None:
                raise ScratchError(f"{tool} is missing (Debian: e2fsprogs, mount)")
        os.makedirs(self.root, exist_ok=True)
        self.keep_free = keep_free
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._lock = threading.Lock()
        self._free: dict[int, list[_Disk]] = {}
        self._count = 0
        self._prefix = "d"

    # -- lifecycle ----------------------------------------------------------------------------

    def adopt(self, incarnation: str) -> None:
        """Unmount and delete the disks a previous incarnation left (this root is ours alone)."""
        self._prefix = incarnation[:12]
        for mountpoint in sorted(self._mounts_below(), key=len, reverse=True):
            self._umount(mountpoint, MNT_DETACH)
        for name in os.listdir(self.root):
            path = os.path.join(self.root, name)
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.unlink(path)

    def close(self) -> None:
        with self._lock:
            disks = [d for free in self._free.values() for d in free]
            self._free.clear()
        for disk in disks:
            self._destroy(disk)

    def forget(self, lower: str) -> None:
        """Unmount the idle overlays over ``lower`` (its image is leaving the cache)."""
        with self._lock:
            idle = [d for free in self._free.values() for d in free if d.lower and d.lower[0] == lower]
            for disk in idle:
                self._unmount_overlay(disk)

    def _mounts_below(self) -> list[str]:
        found = []
        with open("/proc/self/mountinfo") as fh:
            for line in fh:
                mountpoint = line.split()[4].replace("\\040", " ")
                if mountpoint.startswith(self.root + "/"):
                    found.append(mountpoint)
        return found

    # -- per job ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def layer(self, lower: str, size_bytes: int, mount_points: Iterable[str] = ()) -> Iterator[str]:
        """A writable root over ``lower`` whose writes are capped at ``size_bytes``; yields its path.

        ``mount_points``: directories the sandbox itself creates in the root (bind targets, the
        working directory); left empty, they do not count as the job's writes. Call it only
        once the previous user of the layer has no process left (the runtime kills the job's
        cgroup first).
        """
        allowed: set[str] = set()  # those directories and their parents, relative to /
        for point in mount_points:
            parts = [p for p in point.split("/") if p]
            allowed.update("/".join(parts[:i]) for i in range(1, len(parts) + 1))
        st = os.stat(lower)
        ident = (lower, st.st_dev, st.st_ino, st.st_ctime_ns)
        disk = self._acquire(self._clamp(size_bytes), ident)
        reusable = False
        try:
            if disk.lower != ident:
                self._unmount_overlay(disk)
                for name in ("upper", "work", "root"):
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(disk.path(name))
                os.chmod(disk.path("upper"), 0o755)  # the upper dir's mode becomes that of the job's /
                upper, work = disk.path("upper"), disk.path("work")
                options = f"lowerdir={lower},upperdir={upper},workdir={work}"
                self._mount("overlay", disk.path("root"), "overlay", options)
                disk.lower = ident
            yield disk.path("root")
            reusable = self._untouched(disk, allowed) or self._unmount_overlay(disk)
        finally:
            if not reusable:
                with contextlib.suppress(ScratchError):
                    self._unmount_overlay(disk)
            self._release(disk, reusable)

    def _clamp(self, size_bytes: int) -> int:
        """At most the size of the host filesystem (a bigger sparse file could not be filled)."""
        st = os.statvfs(self.root)
        return max(64 << 20, min(size_bytes, st.f_blocks * st.f_frsize))

    @staticmethod
    def _untouched(disk: _Disk, allowed: set[str]) -> bool:
        """Whether the job left nothing in the upper layer: no file, no whiteout, / unchanged,
        and no directory but the empty mount points the sandbox made (as it will again)."""
        upper = disk.path("upper")
        try:
            st = os.stat(upper)
            if st.st_mode != UPPER_MODE or st.st_uid != 0 or not set(os.listxattr(upper)) <= ROOT_XATTRS:
                return False
            for top, dirs, files in os.walk(upper):
                if files:
                    return False
                for name in dirs:
                    path = os.path.join(top, name)
                    st = os.lstat(path)
                    if (
                        os.path.relpath(path, upper) not in allowed
                        or st.st_mode not in SANDBOX_DIR_MODES
                        or os.listxattr(path)
                    ):
                        return False
            return True
        except OSError:
            return False

    def _unmount_overlay(self, disk: _Disk) -> bool:
        """Unmount the disk's overlay (if any) and remove what the job wrote. True if clean."""
        if disk.lower is not None:
            disk.lower = None
            self._umount(disk.path("root"))
        upper = disk.path("upper")
        try:
            if os.path.lexists(upper) and (os.listdir(upper) or os.stat(upper).st_mode != UPPER_MODE):
                _empty_files(upper)
                shutil.rmtree(upper)
                os.mkdir(upper)
                os.chmod(upper, 0o755)
            return True
        except OSError:
            return False

    # -- the pool -----------------------------------------------------------------------------

    def _acquire(self, size: int, ident: tuple[str, int, int, int]) -> _Disk:
        """A free disk of ``size`` with all its space free: best one whose overlay is over
        ``ident`` already."""
        with self._lock:
            disk = self._pick(size, ident)
        if disk is not None:
            if self._whole(disk):
                return disk
            self._destroy(disk)
        with self._lock:
            self._count += 1
            name = f"{self._prefix}-{self._count}"
        return self._create(size, name)

    def _pick(self, size: int, ident: tuple[str, int, int, int]) -> _Disk | None:
        free = self._free.get(size)
        if not free:
            return None
        for i, disk in enumerate(free):
            if disk.lower == ident:
                return free.pop(i)
        idle = [i for i, d in enumerate(free) if d.lower is None]
        return free.pop(idle[-1] if idle else -1)

    def _whole(self, disk: _Disk) -> bool:
        """Whether all of the disk is free but ``SLACK_BYTES``; if not at first, after a sync."""
        try:
            fd = os.open(disk.mountpoint, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            return False
        try:
            for attempt in range(2):
                st = os.fstatvfs(fd)  # f_bfree counts what delayed allocation has reserved
                short = (st.f_blocks - st.f_bfree) * st.f_frsize - SLACK_BYTES
                if short <= 0:
                    return True
                if attempt == 0:
                    self._libc.syncfs(fd)  # writeback and freeing the kernel may still owe it
        finally:
            os.close(fd)
        log.warning(
            "scratch disk %s has %d MiB in use after its job's files were removed (another mount "
            "namespace holds them?): replacing it",
            disk.mountpoint, (short + SLACK_BYTES) >> 20,
        )  # fmt: skip
        return False

    def _release(self, disk: _Disk, reusable: bool) -> None:
        evict: list[_Disk] = []
        with self._lock:
            if reusable:
                self._free.setdefault(disk.size, []).append(disk)
                total = sum(len(v) for v in self._free.values())
                for size in sorted(self._free, key=lambda s: len(self._free[s])):
                    while total > self.keep_free and self._free[size]:
                        evict.append(self._free[size].pop(0))
                        total -= 1
            else:
                evict.append(disk)
        for old in evict:
            self._destroy(old)

    def _create(self, size: int, name: str) -> _Disk:
        disk = _Disk(size, os.path.join(self.root, f"{name}.img"), os.path.join(self.root, name))
        try:
            with open(disk.image, "wb") as fh:
                fh.truncate(size)
            os.mkdir(disk.mountpoint, 0o700)
            # No journal (the disk is thrown away after a crash); no reserved blocks; inode
            # tables read as zeros from the sparse file, so nothing needs initialising.
            self._run("mkfs.ext4", "-q", "-F", "-m", "0", "-O", "^has_journal",
                      "-E", "lazy_itable_init=1,nodiscard", disk.image)  # fmt: skip
            self._run("mount", "-o", "loop,noinit_itable,discard", disk.image, disk.mountpoint)
        except BaseException:
            self._destroy(disk)
            raise
        return disk

    def _destroy(self, disk: _Disk) -> None:
        if disk.lower is not None:
            disk.lower = None
            self._umount(disk.path("root"), MNT_DETACH)
        if os.path.ismount(disk.mountpoint):
            self._umount(disk.mountpoint, MNT_DETACH)
        with contextlib.suppress(OSError):
            os.rmdir(disk.mountpoint)
        with contextlib.suppress(OSError):
            os.unlink(disk.image)

    @staticmethod
    def _run(*cmd: str) -> None:
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise ScratchError(f"{' '.join(cmd[:2])} failed: {(done.stderr or done.stdout).strip()}")

    def _mount(self, source: str, target: str, fstype: str, data: str) -> None:
        if self._libc.mount(source.encode(), target.encode(), fstype.encode(), 0, data.encode()) != 0:
            err = ctypes.get_errno()
            raise ScratchError(f"cannot mount the job's {fstype} on {target}: {os.strerror(err)}")

    def _umount(self, target: str, flags: int = 0) -> None:
        if self._libc.umount2(target.encode(), flags) != 0:
            err = ctypes.get_errno()
            if flags == 0:  # busy: detach it instead, it goes once its last user does
                self._umount(target, MNT_DETACH)
            elif err != 22:  # EINVAL: not mounted
                raise ScratchError(f"cannot unmount {target}: {os.strerror(err)}")


def _empty_files(top: str) -> None:
    """Truncate the regular files below ``top``, which is about to be removed: a file that a
    copy of the overlay elsewhere keeps alive then holds no blocks, of the disk nor the host."""
    with contextlib.suppress(OSError):
        for _, _, files, dir_fd in os.fwalk(top):
            for name in files:
                with contextlib.suppress(OSError):
                    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                    if stat.S_ISREG(st.st_mode) and st.st_blocks:
                        flags = os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
                        fd = os.open(name, flags, dir_fd=dir_fd)
                        try:
                            os.ftruncate(fd, 0)
                        finally:
                            os.close(fd)
