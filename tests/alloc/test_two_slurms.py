"""Two private Slurms on one host at once (two test runs, a test and a benchmark) keep their jobs
apart: each numbers its jobs from 1, and slurmd keeps a job's processes in a host-wide cgroup
named after its node and the job id (openhtc.testing.slurm gives each node a name of its own)."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import pytest

from openhtc.testing.slurm import PrivateSlurm

pytestmark = pytest.mark.timeout(120)


def _state(cluster: PrivateSlurm, job_id: str) -> str:
    return cluster.cmd("squeue", "-h", "-t", "all", "-j", job_id, "-o", "%T", check=False).strip()


def _sbatch(cluster: PrivateSlurm, script: str) -> str:
    return cluster.cmd("sbatch", "--parsable", "-o", "/dev/null", "--wrap", script).strip().split(";")[0]


def _wait(cluster: PrivateSlurm, job_id: str, done: set[str], timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while (state := _state(cluster, job_id)) not in done:
        assert time.monotonic() < deadline, f"job {job_id}: {state!r}, not {done}"
        time.sleep(0.2)
    return state


def test_a_job_cancelled_on_one_private_slurm_leaves_the_same_id_on_another_running(
    slurm: PrivateSlurm,
) -> None:
    root = Path(tempfile.mkdtemp(prefix="openhtc-slurm-"))
    other = PrivateSlurm(root, cpus=1, memory=1000, cluster="openhtcother")
    beat = root / "beat"  # our job writes the time ten times a second while it lives
    try:
        other.start()
        assert other.node != slurm.node
        ours = f"while :; do date +%s.%N > {beat}.tmp; mv {beat}.tmp {beat}; sleep 0.1; done"
        job_id = _sbatch(slurm, ours)
        _wait(slurm, job_id, {"RUNNING"})
        # the other numbers its jobs from 1: its jobs up to ours' id (one cgroup if one node name)
        while (theirs := _sbatch(other, "sleep 120")) != job_id:
            assert int(theirs) < int(job_id), (theirs, job_id)
            other.cmd("scancel", theirs)
        _wait(other, job_id, {"RUNNING"})
        other.cmd("scancel", job_id)
        _wait(other, job_id, {"CANCELLED"})  # its slurmd has killed what its job's cgroup held
        deadline = time.monotonic() + 10
        while not beat.exists():
            assert time.monotonic() < deadline, "our job never wrote"
            time.sleep(0.05)
        first = beat.read_text()
        while beat.read_text() == first:  # ours still runs: it writes again
            assert time.monotonic() < deadline, slurm.cmd("squeue", "-t", "all", "-o", "%i %T %r")
            time.sleep(0.05)
        assert _state(slurm, job_id) == "RUNNING"
    finally:
        other.stop()
        shutil.rmtree(root, ignore_errors=True)
        slurm.cmd("scancel", "--name=wrap", check=False)
