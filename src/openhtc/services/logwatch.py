"""Wake-ups when log files grow, for the streams that follow a running job's log.

Job logs are written by whichever process runs the job (a job launcher process, a runtime's
output thread), so the writer cannot tell the server's event loop itself. Linux's inotify can:
one inotify descriptor per server, a watch on a job's log directory (one per batch) only while
somebody follows a job in it, each follower woken only by its own job's files (their name
prefix), and the kernel coalesces repeated writes into one pending event. Writers pay
nothing, and nothing is watched when nobody follows a log. Where inotify is missing, ``watch``
reports no support and the stream looks again every ``FALLBACK_SECONDS``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging
import os
import struct
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

log = logging.getLogger("openhtc.logwatch")

IN_MODIFY = 0x002
IN_CLOSE_WRITE = 0x008
IN_MOVED_TO = 0x080
IN_CREATE = 0x100
IN_Q_OVERFLOW = 0x4000  # the kernel's queue overflowed (wd -1): events were lost
IN_IGNORED = 0x8000
_MASK = IN_MODIFY | IN_CLOSE_WRITE | IN_MOVED_TO | IN_CREATE
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, name length
FALLBACK_SECONDS = 0.5  # how often a stream looks again without inotify
_Hook = tuple[bytes, Callable[[], None]]


class LogWatch:
    """Calls the hooks of a directory when a file of theirs in it is written (on the event loop)."""

    def __init__(self) -> None:
        self._fd: int | None = None
        self._libc: ctypes.CDLL | None = None
        self._unsupported = False
        self._wds: dict[str, int] = {}  # directory -> watch descriptor
        self._hooks: dict[int, list[_Hook]] = {}  # watch descriptor -> (name prefix, hook)

    @asynccontextmanager
    async def watch(self, directory: str, hook: Callable[[], None], prefix: str = "") -> AsyncIterator[bool]:
        """Call ``hook`` whenever a file of ``directory`` (made if missing) whose name starts
        with ``prefix`` changes, until the context exits. Yields False when this system cannot
        watch (then nothing is called)."""
        wd = self._add(directory)
        if wd is None:
            yield False
            return
        hooks = self._hooks.setdefault(wd, [])
        entry = (os.fsencode(prefix), hook)
        hooks.append(entry)
        try:
            yield True
        finally:
            hooks.remove(entry)
            if not hooks:
                self._remove(directory, wd)

    def watched(self) -> int:
        """How many directories are watched (tests check that streams release theirs)."""
        return len(self._wds)

    def _add(self, directory: str) -> int | None:
        if directory in self._wds:
            return self._wds[directory]
        if not self._open():
            return None
        assert self._libc is not None and self._fd is not None
        try:
            os.makedirs(directory, exist_ok=True)  # the writer makes it too, at the first line
        except OSError:
            return None
        wd = int(self._libc.inotify_add_watch(self._fd, os.fsencode(directory), _MASK))
        if wd < 0:
            log.warning("cannot watch %s: %s", directory, os.strerror(ctypes.get_errno()))
            return None
        self._wds[directory] = wd
        return wd

    def _remove(self, directory: str, wd: int) -> None:
        self._hooks.pop(wd, None)
        self._wds.pop(directory, None)
        if self._libc is not None and self._fd is not None:
            self._libc.inotify_rm_watch(self._fd, wd)  # fails harmlessly if already gone

    def _open(self) -> bool:
        if self._fd is not None:
            return True
        if self._unsupported:
            return False
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
            fd = int(libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC))
        except (OSError, AttributeError):
            fd = -1
        if fd < 0:
            self._unsupported = True
            log.info("no inotify: log streams look for new lines every %s s", FALLBACK_SECONDS)
            return False
        self._libc, self._fd = libc, fd
        asyncio.get_running_loop().add_reader(fd, self._readable)
        return True

    def _readable(self) -> None:
        assert self._fd is not None
        try:
            data = os.read(self._fd, 64 * 1024)
        except BlockingIOError:
            return
        fired: set[tuple[int, bytes]] = set()  # (wd, file name): the kernel coalesces only repeats
        offset = 0
        while offset + _EVENT.size <= len(data):
            wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
            start = offset + _EVENT.size
            offset = start + length
            if mask & IN_Q_OVERFLOW:  # events were lost: everybody looks again
                for hooks in list(self._hooks.values()):
                    for _, hook in list(hooks):
                        hook()
                continue
            if mask & IN_IGNORED:  # the directory went away (a task deleted)
                for directory, known in list(self._wds.items()):
                    if known == wd:
                        del self._wds[directory]
                continue
            fired.add((wd, data[start:offset].rstrip(b"\0")))
        for wd, name in fired:
            for prefix, hook in list(self._hooks.get(wd, ())):
                if name.startswith(prefix):
                    hook()

    def close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(RuntimeError):
                asyncio.get_running_loop().remove_reader(self._fd)
            os.close(self._fd)
            self._fd = None
