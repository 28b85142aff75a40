"""Change notification: the server tells clients that wait (long polls, event streams) that a job
or a task changed, the moment the store has committed it.

A port with one in-process implementation. Writers (the executor protocol's reports and claims,
submits, cancels, recoveries) call ``publish`` after their transaction commits, from any thread;
waiters are coroutines on the server's event loop that ``subscribe`` to keys, then re-read what
they wait for. A notification says only "look again": a waiter always re-reads the store, so a
spurious or coalesced wake-up is harmless, and a waiter subscribes before its first read, so no
change between that read and its wait is lost.

Cluster mode (several servers on one PostgreSQL) backs the same port with ``LISTEN``/``NOTIFY``:
``publish`` becomes a ``NOTIFY openhtc_changes, '<key>'`` sent after the commit, and one listening
connection per server feeds the keys it receives into the local waiters.

When nobody waits, ``publish`` is one dictionary test: writers pay nothing for the feature.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Protocol

Key = tuple[str, object]  # ("job", job row id) | ("task", task id)
EVERYTHING: Key = ("*", None)  # every waiter is woken: recoveries, cancels


def job_key(job_id: int) -> Key:
    return ("job", job_id)


def task_key(task_id: str) -> Key:
    return ("task", task_id)


class Subscription:
    """A waiter's wake-up: level-triggered, consumed by ``wait``."""

    __slots__ = ("_event", "keys")

    def __init__(self, keys: frozenset[Key]) -> None:
        self.keys = keys
        self._event = asyncio.Event()

    def fire(self) -> None:
        self._event.set()

    async def wait(self, timeout: float) -> bool:
        """True if a change was published since the last wait, waiting up to ``timeout`` s."""
        if self._event.is_set():
            self._event.clear()
            return True
        if timeout <= 0:
            return False
        try:
            await asyncio.wait_for(self._event.wait(), timeout)
        except TimeoutError:
            return False
        self._event.clear()
        return True


class Notifier(Protocol):
    @property
    def idle(self) -> bool:
        """True when nobody waits: writers may skip building their keys."""
        ...

    def publish(self, keys: Iterable[Key]) -> None:
        """Called after a commit, from any thread."""
        ...

    def subscribe(self, keys: Iterable[Key]) -> AbstractAsyncContextManager[Subscription]:
        """Called on the event loop; wakes the subscription on every publish of one of ``keys``
        (and of ``EVERYTHING``) until the context exits."""
        ...

    def waiters(self) -> int:
        """How many subscriptions are open."""
        ...

    @property
    def closing(self) -> bool:
        """True once the server stops: every waiter answers now and every stream ends."""
        ...

    def close(self) -> None:
        """The server stops: wake every waiter (on the event loop), now and on subscribe."""
        ...


class LocalNotifier:
    """Waiters of this process; ``publish`` hands the keys to the event loop thread."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._subs: dict[Key, set[Subscription]] = {}
        self._closing = False

    @property
    def closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        self._closing = True
        self._fire(frozenset((EVERYTHING,)))

    @property
    def idle(self) -> bool:
        return not self._subs

    def publish(self, keys: Iterable[Key]) -> None:
        loop = self._loop
        if not self._subs or loop is None:  # nobody waits: the common case costs this test
            return
        wanted = frozenset(keys)
        if not wanted:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._fire(wanted)
        else:
            with contextlib.suppress(RuntimeError):  # a closed loop: the server is stopping
                loop.call_soon_threadsafe(self._fire, wanted)

    def _fire(self, keys: frozenset[Key]) -> None:
        for key in keys:  # every subscription is also under EVERYTHING
            for sub in self._subs.get(key, ()):
                sub.fire()

    @asynccontextmanager
    async def subscribe(self, keys: Iterable[Key]) -> AsyncIterator[Subscription]:
        self._loop = asyncio.get_running_loop()
        sub = Subscription(frozenset(keys) | {EVERYTHING})
        for key in sub.keys:
            self._subs.setdefault(key, set()).add(sub)
        if self._closing:  # subscribed while the server stops: answer at once
            sub.fire()
        try:
            yield sub
        finally:
            for key in sub.keys:
                subs = self._subs.get(key)
                if subs is not None:
                    subs.discard(sub)
                    if not subs:
                        del self._subs[key]

    def waiters(self) -> int:
        """How many subscriptions are open (every one is under EVERYTHING)."""
        return len(self._subs.get(EVERYTHING, ()))
