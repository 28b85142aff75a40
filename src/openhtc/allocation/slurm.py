"""Slurm through its commands: ``sbatch`` (a pilot, or a ``--test-only`` dry run), ``squeue``
(the states of a queue's pilots, found by their job name) and ``scancel``.

The commands reach the cluster the server's environment names (``SLURM_CONF``, or the
system's configuration). A command that fails raises :class:`SlurmError` with Slurm's own words.
A command that hangs (a slurmctld that does not answer) is killed, with whatever it started,
after ``timeout`` seconds, or at once when the server stops (:meth:`Slurm.interrupt`): a stop
never waits for Slurm, and leaves no ``sbatch`` behind.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
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


class SlurmInterrupted(SlurmError):
    """The server is stopping: the command was killed, or not run. Not Slurm's failure."""


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
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._running: set[subprocess.Popen[str]] = set()

    def interrupt(self) -> None:
        """The server stops: kill the commands running now and run no more (each raises
        SlurmInterrupted)."""
        self._stopping.set()
        with self._lock:
            running = list(self._running)
        for proc in running:
            _kill(proc)

    def _run(self, argv: Sequence[str], stdin: str | None = None) -> str:
        if self._stopping.is_set():
            raise SlurmInterrupted(f"{argv[0]} not run: the server is stopping")
        try:
            # a session of its own: a timeout or a stop kills it with whatever it started (a
            # child left holding its pipes would keep the read waiting past the kill)
            proc = subprocess.Popen(
                list(argv), stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
            )  # fmt: skip
        except FileNotFoundError:
            raise SlurmError(f"{argv[0]} not found: is Slurm installed on the server?") from None
        with self._lock:
            self._running.add(proc)
        if self._stopping.is_set():  # interrupted before it was listed
            _kill(proc)
        try:
            try:
                out, err = proc.communicate(stdin, timeout=self.timeout)
            except subprocess.TimeoutExpired:
                _kill(proc)
                _reap(proc)
                raise SlurmError(f"{argv[0]} did not answer within {self.timeout:.0f} s: killed") from None
        finally:
            with self._lock:
                self._running.discard(proc)
        if self._stopping.is_set() and proc.returncode < 0:
            raise SlurmInterrupted(f"{argv[0]} killed: the server is stopping")
        if proc.returncode != 0:
            message = " ".join(err.split()) or f"{argv[0]} exited with {proc.returncode}"
            raise SlurmError(message)
        return out

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


def _kill(proc: subprocess.Popen[str]) -> None:
    """SIGKILL a command and its session (its process group: the pid, as it leads it)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def _reap(proc: subprocess.Popen[str]) -> None:
    """Finish a killed command: read its pipes to their end (closing them) and wait for it."""
    try:
        proc.communicate(timeout=5)
    except subprocess.TimeoutExpired:  # something it started left its session with the pipes
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
        proc.wait(timeout=5)  # it was SIGKILLed: it ends (unless stuck in the kernel)


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
