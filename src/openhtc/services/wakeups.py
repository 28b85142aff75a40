"""In-process wake-ups, so loops react at once instead of polling.

With several servers on one PostgreSQL a wake-up may be needed on another server (a submit on a
follower must wake the leader's scheduler; an admission on the leader, the executors of every
server): :meth:`Wakeups.relay_to` sends each one on as well (services/notify.py's
ClusterNotifier), and the ``*_local`` methods apply one received from another server.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

# what a wake-up relayed to the other servers means
ROUND, QUEUED, CANCEL = "round", "queued", "cancel"


class Signal:
    """A level-triggered wake-up: set() wakes the waiter; wait() consumes it."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.on_set: Callable[[], None] | None = None  # the relay to other servers, if any

    def set(self) -> None:
        self._event.set()
        if self.on_set is not None:
            self.on_set()

    def set_local(self) -> None:
        self._event.set()

    def wait(self, timeout: float) -> bool:
        fired = self._event.wait(timeout)
        self._event.clear()
        return fired


class Wakeups:
    def __init__(self) -> None:
        # The scheduler should run a round: jobs held or re-queued, rows left to write, a looser limit.
        self.schedule_round = Signal()
        self.cancelled = Signal()  # executors should check which of their jobs to stop
        self._executor_kicks: list[Callable[[], None]] = []
        self._cancel_hooks: list[Callable[[], None]] = []
        self._relay: Callable[[str], None] | None = None

    def relay_to(self, relay: Callable[[str], None], round_wanted: Callable[[], bool]) -> None:
        """Send every wake-up on to the other servers too; a round only while
        ``round_wanted()`` (a leader's own rounds concern no other server)."""
        self._relay = relay
        self.schedule_round.on_set = lambda: relay(ROUND) if round_wanted() else None

    def on_executor_work(self, kick: Callable[[], None]) -> None:
        self._executor_kicks.append(kick)

    def on_cancel(self, hook: Callable[[], None]) -> None:
        self._cancel_hooks.append(hook)

    def queued(self) -> None:
        """Jobs became claimable."""
        self.queued_local()
        if self._relay is not None:
            self._relay(QUEUED)

    def queued_local(self) -> None:
        for kick in self._executor_kicks:
            kick()

    def cancel(self) -> None:
        self.cancelled.set()
        self.queued()
        for hook in self._cancel_hooks:
            hook()
        if self._relay is not None:
            self._relay(CANCEL)

    def cancel_local(self) -> None:
        """A cancel on another server (its notification wakes this server's waiters itself)."""
        self.cancelled.set_local()
        self.queued_local()

    def apply(self, kind: str) -> None:
        """A wake-up relayed from another server."""
        if kind == ROUND:
            self.schedule_round.set_local()
        elif kind == QUEUED:
            self.queued_local()
        elif kind == CANCEL:
            self.cancel_local()
