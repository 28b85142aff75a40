"""Slurm through its commands: ``sbatch`` (a pilot, or a ``--test-only`` dry run), ``squeue``
(the states of a queue's pilots, found by their job name) and ``scancel``.

The commands reach the cluster the server's environment names (``SLURM_CONF``, or the
system's configuration). A command that fails raises :class:`SlurmError` with Slurm's own words.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

TIMEOUT = 30.0
# squeue's states of a job still in the queue; any other (COMPLETED, FAILED, CANCELLED,
# TIMEOUT, NODE_FAIL, ...) means it ended.
_WAITING = {"PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD"}
_RUNNING = {"RUNNING", "COMPLETING", "SUSPENDED", "STOPPED", "RESIZING", "SIGNALING", "STAGE_OUT"}


class SlurmError(Exception):
    """A Slurm command failed; the message is Slurm's (its stderr) or why it could not run."""


@dataclass(frozen=True, slots=True)
class SlurmJob:
    job_id: str
    state: str  # squeue's %T: PENDING, RUNNING, COMPLETED, ...
    ends_at: float | None  # its walltime's end (%e), when Slurm knows it
    reason: str  # %r: why it waits or how it ended

    @property
    def waiting(self) -> bool:
        return self.state in _WAITING

    @property
    def running(self) -> bool:
        return self.state in _RUNNING


class Slurm:
    def __init__(self, timeout: float = TIMEOUT) -> None:
        self.timeout = timeout

    def _run(self, argv: Sequence[str], stdin: str | None = None) -> str:
        try:
            done = subprocess.run(
                list(argv), input=stdin, capture_output=True, text=True, timeout=self.timeout, check=False
            )
        except FileNotFoundError:
            raise SlurmError(f"{argv[0]} not found: is Slurm installed on the server?") from None
        except subprocess.TimeoutExpired:
            raise SlurmError(f"{argv[0]} did not answer within {self.timeout:.0f} s") from None
        if done.returncode != 0:
            message = " ".join(done.stderr.split()) or f"{argv[0]} exited with {done.returncode}"
            raise SlurmError(message)
        return done.stdout

    def submit(self, script: str, args: Sequence[str], test_only: bool = False) -> str:
        """Submit ``script`` (read by sbatch from stdin) with ``args``; the job id (``""`` for a
        dry run, which only checks that Slurm would accept it)."""
        argv = ["sbatch", "--parsable", *args]
        if test_only:
            argv.insert(1, "--test-only")
        out = self._run(argv, script)
        if test_only:
            return ""
        job_id = out.strip().split(";")[0]
        if not job_id.isdigit():
            raise SlurmError(f"sbatch answered no job id: {out.strip()!r}")
        return job_id

    def jobs(self, name: str) -> dict[str, SlurmJob]:
        """The jobs named ``name`` that Slurm still shows (ended ones for a while: MinJobAge)."""
        out = self._run(["squeue", "-h", "-t", "all", f"--name={name}", "-o", "%i|%T|%e|%r"])
        return {job.job_id: job for job in parse_squeue(out)}

    def cancel(self, job_id: str, signal: str | None = None) -> None:
        """Cancel a job; with ``signal``, send it to the batch script only (it stays queued)."""
        argv = ["scancel", job_id] if signal is None else ["scancel", "-b", "-s", signal, job_id]
        self._run(argv)


def parse_squeue(out: str) -> list[SlurmJob]:
    """Lines of ``%i|%T|%e|%r`` -> jobs (an unknown end time: None)."""
    found = []
    for line in out.splitlines():
        parts = line.strip().split("|")
        if len(parts) < 4 or not parts[0]:
            continue
        found.append(SlurmJob(parts[0], parts[1], parse_time(parts[2]), parts[3]))
    return found


def parse_time(text: str) -> float | None:
    """Slurm's ``2026-12-05T03:10:00`` (the controller's local time) -> epoch seconds."""
    try:
        return datetime.strptime(text.strip(), "%Y-%m-%dT%H:%M:%S").timestamp()
    except ValueError:  # N/A, Unknown, NONE
        return None
