"""The systems a workload can run on. Each one says which workloads it supports.

To add a system for the side-by-side harness (HyperQueue, Dask, Ray, Slurm, ...), write a module
here with a class like :class:`bench.systems.openhtc.Openhtc` and register it in ``SYSTEMS``.
"""

from __future__ import annotations

from typing import Protocol

from bench.common import Result
from bench.context import Context
from bench.systems.openhtc import Openhtc
from bench.systems.spawn_floor import SpawnFloor


class System(Protocol):
    name: str
    uses_db: bool  # runs once per --db choice; otherwise once per workload with db "-"

    def supports(self, workload: str) -> bool: ...

    def run(self, workload: str, ctx: Context, db: str, n: int) -> Result: ...


SYSTEMS: dict[str, System] = {s.name: s for s in (Openhtc(), SpawnFloor())}
