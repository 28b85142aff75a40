"""Slurm (Debian ``slurm-wlm`` + ``munge``, a private single node) as a benchmark system;
measured by ``bench/drivers/slurm_driver.py``."""

from __future__ import annotations

import sys

from bench.peers import ensure_apt
from bench.systems.peer import PeerSystem


class Slurm(PeerSystem):
    name, driver = "slurm", "slurm_driver"
    netns_address = True
    notes = {
        w: ["one job array (sbatch --array --wrap); partition OverSubscribe=FORCE:32 (tuned, notes §3)"]
        for w in ("e2e", "containers")
    }
    notes["sleep"] = ["one job array, --cpus-per-task=1 on a partition without oversubscription"]
    notes["latency"] = ["one sbatch --wrap per sample; squeue polled every ~2 ms (plus its own run time)"]
    notes["submit"] = ["one held array (sbatch --hold); summary: squeue of the array; page: first 100 tasks"]
    no_equivalent = {"functions": "Slurm runs commands, not Python functions with results"}

    def install(self) -> str:
        ensure_apt(["slurm-wlm", "munge"], ["slurmctld", "slurmd", "sbatch", "munged"])
        return "slurm-wlm (Debian)"

    def python(self) -> str | None:
        return sys.executable  # the driver needs only the standard library
