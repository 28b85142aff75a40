"""In-process wake-ups, so loops react at once instead of polling."""

from __future__ import annotations

import threading
from collections.abc import Callable


class Signal:
    """A level-triggered wake-up: set() wakes the waiter; wait() consumes it."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def set(self) -> None:
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

    def on_executor_work(self, kick: Callable[[], None]) -> None:
        self._executor_kicks.append(kick)

    def on_cancel(self, hook: Callable[[], None]) -> None:
        self._cancel_hooks.append(hook)

    def queued(self) -> None:
        """Jobs became claimable."""
        for kick in self._executor_kicks:
            kick()

    def cancel(self) -> None:
        self.cancelled.set()
        self.queued()
        for hook in self._cancel_hooks:
            hook()
