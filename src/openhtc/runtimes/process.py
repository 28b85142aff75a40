"""The process runtime: a job's commands run on the host in a fresh working directory.

No isolation at all: for development and tests only. The image name is recorded but not used.
Each job gets its own session, so a timeout or cancel kills its whole process group. Jobs
carry an owner tag in their environment; after a crash, the restarted executor kills every
process its predecessor left before their jobs are re-queued (see ``adopt``), so a job never
runs twice at once. (A parent-death signal would need ``preexec_fn``, which forces a full
fork and costs about 6 ms per job; the sweep also reaches grandchildren, which it would not.)
"""

from __future__ import annotations

import contextlib
import heapq
import os
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from typing import IO, TextIO

from openhtc.domain.enums import FailureCode
from openhtc.domain.models import JobLaunch
from openhtc.runtimes.base import LogOpener, Outcome, RunHandle

OWNER_ENV = "OPENHTC_EXECUTOR_TAG"


def exit_outcome(code: int, handle: RunHandle, timeout_s: int | None) -> Outcome:
    """Map a process exit status to the job's outcome."""
    exit_code = 128 - code if code < 0 else code  # killed by signal N -> 128+N, as shells report
    if handle.timed_out:
        return Outcome(
            exit_code, FailureCode.ErrorTimeout.value, f"Job exceeded execTimeoutSeconds={timeout_s}"
        )
    if handle.stopped:
        return Outcome(exit_code, FailureCode.ErrorUnknownFailure.value, "Job stopped by the executor")
    if exit_code == 0:
        return Outcome(0, None, "Completed")
    return Outcome(
        exit_code, FailureCode.ErrorNonZeroContainerExitCode.value, f"Container exited with code {exit_code}"
    )


def pump_lines(stream: IO[bytes] | None, open_log: LogOpener) -> None:
    """Copy a process's output to the job log, one timestamped line at a time."""
    if stream is None:
        return
    log: TextIO | None = None
    try:
        for line in stream:
            if log is None:
                log = open_log()
            text = line.decode("utf-8", "replace").rstrip("\n")
            log.write(f"{time.time():.6f}\t{text}\n")
    finally:
        if log is not None:
            log.close()


class Deadlines:
    """One thread that fires every job's timeout, instead of a timer thread per job."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._cond = threading.Condition()
        self._seq = 0
        self._thread: threading.Thread | None = None

    def add(self, seconds: float, fire: Callable[[], None]) -> Callable[[], None]:
        """Call ``fire`` after ``seconds`` unless the returned cancel function runs first."""
        cancelled = threading.Event()

        def guarded() -> None:
            if not cancelled.is_set():
                fire()

        with self._cond:
            self._seq += 1
            heapq.heappush(self._heap, (time.monotonic() + seconds, self._seq, guarded))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="job-deadlines", daemon=True)
                self._thread.start()
            self._cond.notify()
        return cancelled.set

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._heap or self._heap[0][0] > time.monotonic():
                    self._cond.wait(None if not self._heap else self._heap[0][0] - time.monotonic())
                _, _, fire = heapq.heappop(self._heap)
            fire()


class ProcessRuntime:
    name = "process"
    blocking = True

    def __init__(self, work_root: str) -> None:
        self.work_root = work_root
        os.makedirs(work_root, exist_ok=True)
        self._tag: tuple[tuple[str, str], ...] = ()
        self._deadlines = Deadlines()
        self._local = threading.local()

    def _workdir(self) -> str:
        """An empty working directory owned by this worker thread.

        Each worker keeps one and reuses it while jobs leave it empty, which saves a mkdir and
        an rmdir per job; a job that leaves files behind gets its directory replaced.
        """
        path: str | None = getattr(self._local, "workdir", None)
        if path is None:
            path = tempfile.mkdtemp(prefix="worker-", dir=self.work_root)
            self._local.workdir = path
        return path

    def _release_workdir(self, path: str) -> None:
        try:
            if not os.listdir(path) and stat.S_IMODE(os.stat(path).st_mode) == 0o700:
                return
        except OSError:
            pass
        shutil.rmtree(path, ignore_errors=True)
        self._local.workdir = None

    def adopt(self, owner: str, incarnation: str) -> int:
        """Find and kill what a dead predecessor left running: every job carries an owner tag in
        its environment, and its children inherit it."""
        self._tag = ((OWNER_ENV, f"{owner}/{incarnation}"),)
        mine = f"{OWNER_ENV}={owner}/".encode()
        current = f"{OWNER_ENV}={owner}/{incarnation}".encode()
        killed = 0
        for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
            try:
                with open(f"/proc/{pid}/environ", "rb") as fh:
                    env = fh.read().split(b"\0")
            except OSError:
                continue
            if any(item.startswith(mine) and item != current for item in env):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
                    killed += 1
        for leftover in os.listdir(self.work_root):  # work directories of the dead incarnation
            shutil.rmtree(os.path.join(self.work_root, leftover), ignore_errors=True)
        return killed

    def close(self) -> None:
        pass

    def run(
        self, launch: JobLaunch, handle: RunHandle, open_log: LogOpener, on_running: Callable[[], None]
    ) -> Outcome:
        if not launch.commands:
            return Outcome(
                None,
                FailureCode.ErrorStartingContainer.value,
                "The process runtime needs 'commands': it does not read an image's entrypoint",
            )
        workdir = self._workdir()
        env = {
            "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
            "HOME": workdir,
            "LANG": "C.UTF-8",
            "TMPDIR": workdir,
            **dict(launch.envs),
            # No mount namespace: the storage folders are the host directories themselves.
            **{m.env_name: m.host_path for m in launch.mounts},
            **dict(self._tag),
        }
        try:
            try:
                proc = subprocess.Popen(
                    list(launch.commands),
                    cwd=workdir,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            except OSError as exc:
                return Outcome(
                    None,
                    FailureCode.ErrorStartingContainer.value,
                    f"Cannot start {launch.commands[0]}: {exc}",
                )
            handle.attach(proc)
            on_running()
            cancel_timeout = None
            if launch.timeout_s:
                cancel_timeout = self._deadlines.add(launch.timeout_s, lambda: handle.stop(timed_out=True))
            try:
                pump_lines(proc.stdout, open_log)
                code = proc.wait()
            finally:
                if cancel_timeout is not None:
                    cancel_timeout()
            return exit_outcome(code, handle, launch.timeout_s)
        finally:
            self._release_workdir(workdir)
