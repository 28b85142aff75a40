"""Dask (``dask[distributed]`` ``LocalCluster``) as a benchmark system; measured by
``bench/drivers/dask_driver.py``."""

from __future__ import annotations

from bench.systems.peer import PipPeer


class Dask(PipPeer):
    name, driver, module, requirement = "dask", "dask_driver", "distributed", "dask[distributed]"
    no_equivalent = {"submit": "submitted tasks live in the client's and scheduler's memory"}
