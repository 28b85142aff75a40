"""Ray (a local node, installed on demand: ~285 MB) as a benchmark system; measured by
``bench/drivers/ray_driver.py``."""

from __future__ import annotations

from bench.systems.peer import PipPeer


class Ray(PipPeer):
    name, driver, module, requirement = "ray", "ray_driver", "ray", "ray"
    no_equivalent = {"submit": "submitted tasks live in the driver's and raylet's memory"}
