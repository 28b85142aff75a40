"""The seam between an executor and the control plane: the executor protocol's four calls.

The embedded executor calls ``ExecutorService`` (services/executors.py) in-process; ``htc agent``
runs the same executor (executor/local.py) over HTTP (agent/transport.py). Both implement this.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any, Protocol

from openhtc.domain.models import AttemptReport, Capacity, JobLaunch
from openhtc.store.functions import CallResult


class ExecutorPort(Protocol):
    @property
    def concurrent_writes(self) -> bool:
        """Whether a report and a claim gain from running at once."""
        ...

    def register(
        self,
        executor_id: str,
        incarnation: str,
        region: str,
        architectures: list[str],
        capacity: Capacity,
        may_have_started: Collection[tuple[int, int]] = (),
        version: str | None = None,
        host: str | None = None,
        adopted: Collection[tuple[int, int]] = (),
    ) -> int: ...

    def claim(
        self, executor_id: str, region: str, architectures: Sequence[str], free: Capacity, max_jobs: int
    ) -> list[JobLaunch]: ...

    def report(
        self, executor_id: str, reports: Sequence[AttemptReport], results: Sequence[CallResult] = ()
    ) -> Any:
        """``results``: the function calls' results kept since the last report (FunctionPool),
        stored no later than the reports (in-process: in their transaction)."""
        ...

    def heartbeat(self, executor_id: str, held: Sequence[tuple[int, int]]) -> list[tuple[int, int]]: ...
