"""A runtime that finishes every job at once: measures the control plane alone."""

from __future__ import annotations

from collections.abc import Callable

from openhtc.domain.models import JobLaunch
from openhtc.runtimes.base import LogOpener, Outcome, RunHandle


class NoopRuntime:
    name = "noop"
    blocking = False

    def run(
        self, launch: JobLaunch, handle: RunHandle, open_log: LogOpener, on_running: Callable[[], None]
    ) -> Outcome:
        on_running()
        return Outcome(0, None, "Completed")

    def adopt(self, owner: str, incarnation: str) -> int:
        return 0

    def close(self) -> None:
        pass
