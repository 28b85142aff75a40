"""What the peer systems (HyperQueue, Dask, Ray, Slurm) share: one driver run per result.

Each peer runs the same job command as openhtc (``bench.workloads.COMMANDS``; W3's from
``bench.runners``) with the same number of CPUs (``Context.slots``), and is measured the same
way: wall time from the first submit until the client sees every job done. The peer's own
start-up (and a warm-up of ``WARMUP`` jobs) happens before the clock starts; the start-up time
is reported as ``startup_s``.
"""

from __future__ import annotations

import shutil
import tempfile
from typing import Any

from bench.common import Result
from bench.context import Context
from bench.peers import PeerUnavailable, ensure_pip, run_driver
from bench.runners import RunnerUnavailable
from bench.workloads import COMMANDS, SLEEP_S

WARMUP = 20
# The driver mode of each workload: N jobs at once, N single jobs one by one, or N jobs only accepted.
MODES = {
    "e2e": "throughput",
    "sleep": "throughput",
    "containers": "throughput",
    "submit": "accept",
    "latency": "latency",
    "functions": "functions",  # N calls of a Python function with their results, then single calls
}
FIGURES = {
    "throughput": ("jobs_per_s", "jobs/s"),
    "latency": ("p50_ms", "ms"),
    "accept": ("seconds", "s"),
    "functions": ("calls_per_s", "calls/s"),
}


class PeerSystem:
    name = ""
    uses_db = False
    driver = ""
    netns = True  # every peer runs in a private network namespace (Ray and HyperQueue bind 0.0.0.0)
    netns_address = False
    no_equivalent: dict[str, str] = {}  # workload -> why this peer has no such measurement
    notes: dict[str, list[str]] = {}  # workload -> notes every result of it carries
    max_calls: int | None = None  # the functions workload's N, for a peer that would take hours
    notes_cap = ""  # why max_calls

    def __init__(self) -> None:
        self._installed: str | None = None
        self._install_error: str | None = None

    def supports(self, workload: str) -> bool:
        return workload in MODES

    def install(self) -> str:
        """Install the peer if missing; returns a description of what is installed."""
        raise NotImplementedError

    def python(self) -> str | None:
        return None  # the side venv's

    def _ensure(self) -> str:
        if self._install_error:
            raise PeerUnavailable(self._install_error)
        if self._installed is None:
            try:
                self._installed = self.install()
            except PeerUnavailable as exc:
                self._install_error = str(exc)
                raise
        return self._installed

    def run(self, workload: str, ctx: Context, db: str, n: int) -> Result:
        mode = MODES[workload]
        figure, unit = FIGURES[mode]
        result = Result(workload, self.name, db, n, figure, unit, notes=list(self.notes.get(workload, [])))
        if workload in self.no_equivalent:
            result.status, result.notes = "unavailable", [f"no equivalent: {self.no_equivalent[workload]}"]
            return result
        try:
            installed = self._ensure()
            argv = ctx.runner.argv() if workload == "containers" else COMMANDS[workload]
        except (PeerUnavailable, RunnerUnavailable) as exc:
            result.status, result.notes = "unavailable", [str(exc)]
            return result
        workdir = tempfile.mkdtemp(prefix=f"openhtc-bench-{self.name}-")
        params: dict[str, Any] = {
            "mode": mode,
            "argv": argv,
            "n": n,
            "slots": ctx.slots,
            "cpus": 1,
            "exclusive_cpus": workload == "sleep",
            "warmup": WARMUP,
            "interval": 0.02,
            "workdir": workdir,
        }
        if mode == "functions":
            from bench.functions import latency_samples

            params["samples"] = latency_samples(n)
            if self.max_calls is not None and n > self.max_calls:
                params["n"] = self.max_calls
                result.notes.append(f"measured on {self.max_calls:,} calls, not {n:,}: {self.notes_cap}")
        timeout = {
            "throughput": 300 + n / 2,
            "latency": 120 + 3 * n,
            "accept": 600 + n / 1000,
            "functions": 300 + n / 100,
        }[mode]
        try:
            out = run_driver(
                self.driver,
                params,
                python=self.python(),
                netns=self.netns,
                netns_address=self.netns_address,
                timeout=timeout,
            )
        except PeerUnavailable as exc:
            result.status, result.notes = "unavailable", [str(exc)]
            return result
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        version = out.pop("version", None)
        out.pop("event", None)
        if workload == "sleep" and out.get("jobs_per_s"):
            out["ideal_jobs_per_s"] = ctx.slots / SLEEP_S
            out["efficiency"] = out["jobs_per_s"] / out["ideal_jobs_per_s"]
        result.metrics = out
        result.params = {
            "version": version or installed,
            "slots": ctx.slots,
            "command": " ".join(argv) if argv else "double(event): return event['x'] * 2",
            "warmup_jobs": WARMUP if mode != "accept" else 0,
            "network": "private namespace (unshare --net), loopback only" if self.netns else "host",
        }
        if out.get("failed"):
            result.notes.append(f"{out['failed']} job(s) failed")
        if out.get("wrong"):
            result.notes.append(f"{out['wrong']} call(s) failed or returned a wrong result")
        return result


class PipPeer(PeerSystem):
    module = ""
    requirement = ""

    def install(self) -> str:
        return f"{self.requirement} {ensure_pip(self.module, self.requirement)}"
