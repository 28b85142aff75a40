"""The systems a workload can run on. Each one says which workloads it supports.

openhtc and the spawn floor run in this process's environment; the peers (HyperQueue, Dask,
Ray, Slurm) run through drivers in their own environment (``bench.peers``). To add a system,
write a class like :class:`bench.systems.peer.PeerSystem` and register it in ``SYSTEMS``.
"""

from __future__ import annotations

from typing import Protocol

from bench.common import Result
from bench.context import Context
from bench.functions import BareLoop
from bench.systems.concurrent_floor import ConcurrentFloor
from bench.systems.dask import Dask
from bench.systems.hyperqueue import HyperQueue
from bench.systems.openhtc import Openhtc
from bench.systems.ray import Ray
from bench.systems.slurm import Slurm
from bench.systems.spawn_floor import SpawnFloor


class System(Protocol):
    name: str
    uses_db: bool  # runs once per --db choice; otherwise once per workload with db "-"

    def supports(self, workload: str) -> bool: ...

    def run(self, workload: str, ctx: Context, db: str, n: int) -> Result: ...


PEERS = ("hyperqueue", "dask", "ray", "slurm")


def _systems() -> dict[str, System]:
    systems = (Openhtc(), SpawnFloor(), ConcurrentFloor(), BareLoop(), HyperQueue(), Dask(), Ray(), Slurm())
    return {s.name: s for s in systems}


SYSTEMS: dict[str, System] = _systems()
