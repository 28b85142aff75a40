"""The executor's attempt journal: which attempts it may have started, durably.

Before an attempt is handed to a runtime (whose process may then start at any moment, before
any report of it reaches the database), the executor appends ``S <job> <attempt>`` to one
append-only file and waits until it is on disk. Once the attempt's end is committed in the
database, or the hand-off was withdrawn before the process started, it appends
``E <job> <attempt>`` (no wait: a lost ``E`` only makes recovery more cautious). After a crash
the next start replays the file: the attempts begun and not ended are those that may have run,
and the recovery rule (``domain/recovery.py``) fails them instead of re-queueing them free.

Durability is group-committed: threads that append at once share one ``fdatasync``. The file
is rewritten with only the open attempts every ``COMPACT_AFTER`` ends, so it stays small.

A *lazy* journal (the embedded executor's) waits for no sync at all: a write that returned is in
the kernel's page cache, which every process of this boot reads, so a ``kill -9`` of the server
loses nothing of it. Only a crash of the machine can lose its tail, and the machine's boot id
tells that one apart: the file starts with ``B <boot id> <lazy>`` and a clean stop ends it with a
synced ``C``. A lazy journal written in another boot and not closed cleanly is not *trusted*:
it may have lost ``S`` records of attempts whose processes started, so recovery must count every
attempt the executor held as one that may have started (``domain/recovery.py: EveryAttempt``).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from pathlib import Path

Key = tuple[int, int]  # (job id, attempt)
COMPACT_AFTER = 4096
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")  # a new random id at every boot of the kernel


def boot_id() -> str:
    """This boot's id ("" where the kernel has none: every journal is then another boot's)."""
    try:
        return BOOT_ID.read_text().strip()
    except OSError:
        return ""


class AttemptJournal:
    def __init__(self, path: Path, sync: bool = True, lazy: bool = False) -> None:
        """``sync``: ``begin`` returns once its records are on disk (and the file is synced when
        it is rewritten or closed). ``lazy`` instead: ``begin`` never waits, and a machine crash
        is told apart by the boot id (see above); the rewrites and the clean close still sync."""
        self.path = path
        self.sync = sync and not lazy  # whether begin() waits for the disk
        self.lazy = lazy
        self._durable = sync or lazy  # rewrites and the clean close are synced
        self.trusted = True  # what replay() found can be relied on (see above)
        self._cond = threading.Condition()
        self._open: set[Key] = set()
        self._ended = 0  # E records since the last compaction
        self._written = 0  # records appended so far
        self._synced = 0  # records known to be on disk
        self._syncing = False  # one thread syncs (or compacts) at a time
        self._fd = -1

    def synced(self) -> None:
        """From now on, as a synced journal: ``begin`` waits for the disk (call before ``open``,
        or the header still says lazy: a journal then distrusted after a reboot, as before)."""
        with self._cond:
            self.lazy, self.sync, self._durable = False, True, True

    def replay(self) -> set[Key]:
        """The attempts a previous run began and never ended (read before ``open``)."""
        found: set[Key] = set()
        self.trusted = True
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return found
        lines = data.split(b"\n")
        header = lines[0].split()
        if len(header) == 3 and header[0] == b"B":
            # lazy, from another boot, and not closed cleanly: its unsynced tail may be lost
            closed = any(line == b"C" for line in lines[-2:])
            self.trusted = header[2] != b"lazy" or header[1].decode(errors="replace") == boot_id() or closed
        for line in lines:
            parts = line.split()
            # a torn last line was never acknowledged: its hand-off did not happen
            if len(parts) != 3 or parts[0] not in (b"S", b"E") or not (parts[1] + parts[2]).isdigit():
                continue
            key = (int(parts[1]), int(parts[2]))
            if parts[0] == b"S":
                found.add(key)
            else:
                found.discard(key)
        return found

    def open(self) -> None:
        """Start a fresh journal (what a previous run left is dropped: call after recovery)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._cond:
            self._rewrite()

    def close(self) -> None:
        """A clean stop: what the file says is all there is, even after a reboot (``C``)."""
        with self._cond:
            while self._syncing:
                self._cond.wait()
            if self._fd >= 0:
                if self._durable:
                    os.fdatasync(self._fd)  # every record before the C that vouches for them
                    os.write(self._fd, b"C\n")
                    os.fdatasync(self._fd)
                os.close(self._fd)
                self._fd = -1

    def begin(self, job_id: int, attempt: int) -> None:
        """Record that the attempt may start from now on; returns once that is durable."""
        self.begin_many([(job_id, attempt)])

    def begin_many(self, keys: Iterable[Key]) -> None:
        keys = list(keys)
        if not keys:
            return
        with self._cond:
            self._open.update(keys)
            mine = self._append(b"".join(b"S %d %d\n" % key for key in keys), len(keys))
        if self.sync:
            self._wait_durable(mine)

    def end(self, keys: Iterable[Key]) -> None:
        """Record that these attempts ended (their end is committed) or were taken back."""
        with self._cond:
            ended = [key for key in keys if key in self._open]
            if not ended:
                return
            self._open.difference_update(ended)
            self._append(b"".join(b"E %d %d\n" % key for key in ended), len(ended))
            self._ended += len(ended)
            if self._ended < COMPACT_AFTER:
                return
            while self._syncing:  # no fdatasync may run on the descriptor being replaced
                self._cond.wait()
            self._rewrite()  # a few hundred bytes at most: cheap enough under the lock

    def open_attempts(self) -> set[Key]:
        with self._cond:
            return set(self._open)

    # -- internals ------------------------------------------------------------------------------

    def _append(self, data: bytes, records: int) -> int:
        """Append under ``_cond``; returns the count of records to wait for."""
        os.write(self._fd, data)  # O_APPEND: one write is one atomic record group
        self._written += records
        return self._written

    def _wait_durable(self, mine: int) -> None:
        with self._cond:
            while self._synced < mine:
                if not self._syncing:
                    break
                self._cond.wait()
            else:
                return
            self._syncing = True
            target, fd = self._written, self._fd
        try:
            os.fdatasync(fd)  # covers every record written before it began
        finally:
            with self._cond:
                self._syncing = False
                self._synced = max(self._synced, target)
                self._cond.notify_all()

    def _rewrite(self) -> None:
        """Replace the file with the open attempts only (hold ``_cond``, no sync running)."""
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)
        try:
            head = b"B %s %s\n" % ((boot_id() or "-").encode(), b"lazy" if self.lazy else b"synced")
            os.write(fd, head + b"".join(b"S %d %d\n" % key for key in sorted(self._open)))
            if self._durable:
                os.fsync(fd)
            os.replace(tmp, self.path)
            if self._durable:
                _fsync_dir(self.path.parent)
        except BaseException:
            os.close(fd)
            raise
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = fd
        self._ended = 0
        self._synced = self._written


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
