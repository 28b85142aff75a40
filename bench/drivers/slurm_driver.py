"""Slurm driver: a private single-node Slurm (src/openhtc/testing/slurm.py: munged, slurmctld,
slurmd in a fresh state directory) configured as infrastructure-notes §3 tunes it.

- ``throughput``: one job array of N tasks (``sbatch --array --wrap``); the clock stops when
  ``squeue`` shows none of them pending, running or completing (polled every 0.5 % of the
  elapsed time, 10-100 ms, like the openhtc client). Jobs go to partition ``debug``
  (``OverSubscribe=FORCE:32``, the tuned setting: up to 32 jobs share a CPU) unless
  ``exclusive_cpus`` asks for partition ``exact`` (no oversubscription: one CPU per job, as the
  sleep workload's 1-vCPU request means).
- ``latency``: one ``sbatch --wrap`` at a time; ``squeue -t all`` polled until COMPLETED.
- ``accept``: one held array of N tasks: the time ``sbatch`` takes, slurmctld's RSS, and the
  time of a ``squeue`` that summarises the array and of one listing 100 of its tasks.

Needs root, the Debian packages slurm-wlm and munge, and cgroup v1 (``CgroupPlugin=cgroup/v1``).
"""

from __future__ import annotations

import importlib.util
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _common import Unavailable, latency_figures, log, main, rss_mb, throughput_figures

STATES_ACTIVE = "PENDING,RUNNING,COMPLETING,CONFIGURING,SUSPENDED,REQUEUED,RESIZING"


def _private_slurm() -> Any:
    """src/openhtc/testing/slurm.py, loaded by its path: the driver runs in the peers' virtualenv,
    where openhtc is not installed (that module imports the standard library only)."""
    path = Path(__file__).resolve().parents[2] / "src" / "openhtc" / "testing" / "slurm.py"
    spec = importlib.util.spec_from_file_location("openhtc_private_slurm", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


_slurm = _private_slurm()


class Slurm(_slurm.PrivateSlurm):  # type: ignore[misc,name-defined]
    """The private Slurm tuned as infrastructure-notes §3 says: partition ``debug`` oversubscribed
    (``FORCE:32``: up to 32 jobs share a CPU), RAM constrained; and the few calls the workloads make."""

    def __init__(self, workdir: str, cpus: int, max_array: int) -> None:
        super().__init__(
            workdir,
            cpus,
            max_array=max_array,
            oversubscribe="FORCE:32",
            constrain_ram=True,
            cluster="openhtcbench",
        )

    def start(self) -> None:
        try:
            super().start()
        except _slurm.SlurmUnavailable as exc:
            raise Unavailable(str(exc)) from None

    def sbatch(self, *args: str) -> str:
        return (
            self.cmd("sbatch", "--parsable", "-o", "/dev/null", "-e", "/dev/null", *args, timeout=120)
            .strip()
            .split(";")[0]
        )

    def active(self, job: str) -> int:
        out = self.cmd("squeue", "-h", "-r", "-j", job, "-t", STATES_ACTIVE, "-o", "%i", timeout=120)
        return len(out.split())

    def states(self, job: str) -> list[str]:
        return self.cmd("squeue", "-h", "-r", "-j", job, "-t", "all", "-o", "%T", timeout=120).split()


def run(p: dict[str, Any]) -> dict[str, Any]:
    argv, n, slots = list(p["argv"]), int(p["n"]), int(p["slots"])
    wrap = shlex.join(argv)
    partition = ["-p", "exact", "--cpus-per-task", str(p.get("cpus", 1))] if p.get("exclusive_cpus") else []
    slurm = Slurm(p["workdir"], slots, n if p["mode"] in ("throughput", "accept") else 10)
    t0 = time.perf_counter()
    try:
        slurm.start()
        out: dict[str, Any] = {"startup_s": time.perf_counter() - t0}
        out["version"] = slurm.cmd("sinfo", "-V").split()[-1]
        if p["mode"] != "accept" and p.get("warmup"):
            job = slurm.sbatch(f"--array=0-{int(p['warmup']) - 1}", *partition, "--wrap", wrap)
            while slurm.active(job):
                time.sleep(0.05)
        if p["mode"] == "throughput":
            start = time.perf_counter()
            job = slurm.sbatch(f"--array=0-{n - 1}", *partition, "--wrap", wrap)
            submitted = time.perf_counter()
            while slurm.active(job):
                time.sleep(min(0.1, max(0.01, 0.005 * (time.perf_counter() - start))))
            done = time.perf_counter()
            states = slurm.states(job)
            failed = sum(1 for s in states if s != "COMPLETED")
            out.update(throughput_figures(n, start, submitted, done, failed))
            out["records_seen"] = len(states)
        elif p["mode"] == "latency":
            samples, failed = [], 0
            for _ in range(n):
                start = time.perf_counter()
                job = slurm.sbatch(*partition, "--wrap", wrap)
                while True:
                    state = slurm.cmd("squeue", "-h", "-j", job, "-t", "all", "-o", "%T").strip()
                    if state and state not in STATES_ACTIVE.split(","):
                        break
                    time.sleep(0.002)
                samples.append(time.perf_counter() - start)
                failed += state != "COMPLETED"
                time.sleep(float(p.get("interval", 0.02)))
            out.update(latency_figures(samples), failed=failed)
        elif p["mode"] == "accept":
            start = time.perf_counter()
            job = slurm.sbatch("--hold", f"--array=0-{n - 1}", "--wrap", wrap)
            out["seconds"] = time.perf_counter() - start
            t = time.perf_counter()
            slurm.cmd("squeue", "-h", "-j", job, "-o", "%T %i")
            out["summary_ms"] = (time.perf_counter() - t) * 1000
            t = time.perf_counter()
            page = subprocess.run(
                f"squeue -h -r -j {job} -o %i | head -n 100",
                shell=True,
                env=slurm.full_env,
                capture_output=True,
            )
            out["page_ms"] = (time.perf_counter() - t) * 1000
            out["page_rows"] = len(page.stdout.split())
            out["rss_mb"] = rss_mb(slurm.procs[1].pid)
            log(f"accepted {n} array tasks in {out['seconds']:.2f} s")
        else:
            raise ValueError(f"unknown mode {p['mode']!r}")
    finally:
        slurm.stop()
    return out


if __name__ == "__main__":
    raise SystemExit(main(run))
