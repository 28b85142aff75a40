"""Leadership: which server of several on one database runs the singletons.

The singletons (scheduler rounds with background materialization, lease expiry, retention, and
any periodic job registered with :meth:`Leadership.on_change` or gated on :attr:`is_leader`) must
run on one server at a time. A :class:`LeaderLock` decides who that is: on PostgreSQL a session
advisory lock held on a connection of its own (store/leader_lock.py), which the database frees
the moment the holder's session ends (a crash or ``kill -9`` included); on SQLite only one
server may run at all, so :class:`AlwaysLeader` always holds it.

:class:`Leadership` polls the lock every ``retry_seconds`` on its own thread: a follower tries
to take it; the leader checks that its connection is still alive and steps down at once when it
is not (the lock is then presumably free for another server, so it must stop acting as leader).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Protocol

log = logging.getLogger("openhtc.leadership")


class LeaderLock(Protocol):
    def hold(self) -> bool:
        """Take the lock if free, or confirm it is still held; False when not held (now)."""
        ...

    def release(self) -> None:
        """Give the lock up (and close whatever holds it)."""
        ...


class AlwaysLeader:
    """One server per database (SQLite): it leads from the start."""

    def hold(self) -> bool:
        return True

    def release(self) -> None:
        pass


class Leadership:
    """Whether this server leads now, kept up to date by a thread polling its lock."""

    def __init__(self, lock: LeaderLock, retry_seconds: float = 1.0) -> None:
        self.lock = lock
        self.retry_seconds = retry_seconds
        self._leader = threading.Event()
        self._stopping = threading.Event()
        self._listeners: list[Callable[[bool], None]] = []
        self._thread: threading.Thread | None = None

    @classmethod
    def always(cls) -> Leadership:
        """Leading from the start, with no thread: one server on its database (and tests)."""
        leadership = cls(AlwaysLeader())
        leadership._leader.set()
        return leadership

    @property
    def is_leader(self) -> bool:
        return self._leader.is_set()

    def on_change(self, listener: Callable[[bool], None]) -> None:
        """``listener(leading)`` on each change, on the leadership thread (keep it short)."""
        self._listeners.append(listener)

    def wait_leader(self, timeout: float) -> bool:
        return self._leader.wait(timeout)

    def check(self) -> bool:
        """One poll of the lock; applies the change (if any) and returns whether this server leads."""
        try:
            held = self.lock.hold()
        except Exception:  # an adapter bug must not leave a stale leader: step down
            log.exception("leadership check failed")
            held = False
        if held != self.is_leader:
            if held:
                self._leader.set()
                log.info("became leader: this server runs the scheduler, lease expiry and retention")
            else:
                self._leader.clear()
                log.warning("stepped down: lost the leader lock (database connection gone)")
            for listener in self._listeners:
                try:
                    listener(held)
                except Exception:
                    log.exception("leadership listener failed")
        return held

    def start(self) -> None:
        self.check()  # lead at once when the lock is free: no first-second gap
        if isinstance(self.lock, AlwaysLeader):
            return
        self._thread = threading.Thread(target=self._run, name="leadership", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopping.wait(self.retry_seconds):
            self.check()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        was_leader = self.is_leader
        self._leader.clear()
        self.lock.release()
        if was_leader:
            log.info("stepped down: server stopping")
