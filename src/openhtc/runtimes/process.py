"""The process runtime: a job's commands run on the host in an empty working directory.

No isolation at all: for development and tests only. The image name is recorded but not used.
The job launcher (``launcher.py``, a process of its own) spawns each job in its own session
and copies its output to the job log. A job ends when its main process exits; the launcher then
kills what the job left behind, its process group and any process that left it (``setsid``,
``nohup``: the launcher is their subreaper). A timeout or cancel kills the main process, so the
same happens.
Jobs carry an owner tag in their environment; after a crash, the restarted executor kills every
process its predecessor left before their jobs are re-queued (see ``adopt``), so a job never
runs twice at once. (The launcher also kills its jobs when the server's end of its socket
closes; the sweep is for what escaped: grandchildren that left the job's process group.)
"""

from __future__ import annotations

import contextlib
import heapq
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from openhtc.domain.enums import FailureCode
from openhtc.domain.models import JobLaunch
from openhtc.runtimes.base import JobLog, Outcome, RunHandle
from openhtc.runtimes.launcher import LaunchedJob, Launcher, SharedEnv

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
    pipelined = True  # start(..., after=) queues a job behind another one (see LocalExecutor)

    def __init__(self, work_root: str, max_log_bytes: int | None = None) -> None:
        self.work_root = work_root
        os.makedirs(work_root, exist_ok=True)
        self._tag: tuple[tuple[str, str], ...] = ()
        self._deadlines = Deadlines()
        self._local = threading.local()
        self.launcher = Launcher(max_log_bytes=max_log_bytes)
        self._shared: dict[tuple[object, ...], SharedEnv] = {}

    def _workdir(self) -> str:
        """An empty working directory owned by this worker thread.

        Each worker keeps one for all its jobs, which saves a mkdir and an rmdir per job; the
        launcher empties it after a job that left files behind.
        """
        path: str | None = getattr(self._local, "workdir", None)
        if path is None:
            path = tempfile.mkdtemp(prefix="worker-", dir=self.work_root)
            self._local.workdir = path
        return path

    def _drop_workdir(self, path: str) -> None:
        """After a launcher failure: the next job of this thread gets a new directory."""
        shutil.rmtree(path, ignore_errors=True)
        if getattr(self._local, "workdir", None) == path:
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
        self.launcher.close()

    def run(
        self, launch: JobLaunch, handle: RunHandle, open_log: JobLog, on_running: Callable[[], None]
    ) -> Outcome:
        started = self.start(launch, handle, open_log, on_running)
        return started if isinstance(started, Outcome) else self.finish(started)

    def start(
        self,
        launch: JobLaunch,
        handle: RunHandle,
        open_log: JobLog,
        on_running: Callable[[], None],
        after: Started | None = None,
    ) -> Started | Outcome:
        """Hand the job to the launcher and return at once; with ``after``, it starts the moment
        that job (started from this same worker thread) ends. ``finish`` waits for it."""
        if not launch.commands:
            return Outcome(
                None,
                FailureCode.ErrorStartingContainer.value,
                "The process runtime needs 'commands': it does not read an image's entrypoint",
            )
        workdir = self._workdir()
        own = {"HOME": workdir, "TMPDIR": workdir, **dict(launch.envs)}
        started = Started(launch, handle, workdir)

        def running() -> None:  # on the launcher's reader thread, once the process exists
            if launch.timeout_s:
                started.cancel_timeout = self._deadlines.add(
                    launch.timeout_s, lambda: handle.stop(timed_out=True)
                )
            on_running()

        previous = after.job if after is not None else None
        shared = self._shared_env(launch)
        log_path = open_log.path
        started.job = self.launcher.start(launch.commands, shared, own, workdir, log_path, running, previous)
        handle.attach_kill(started.job.kill)
        return started

    def _shared_env(self, launch: JobLaunch) -> SharedEnv:
        """What the jobs of a batch (in one task: its storage folders) share, built once.

        A job's environment is its own variables (HOME, TMPDIR, its index and ids) updated
        with this: PATH and LANG, the batch's variables with the user's ``envs`` last, the
        storage folders and the owner tag.
        """
        key = (launch.batch_envs, launch.mounts)
        shared = self._shared.get(key)
        if shared is None:
            if len(self._shared) >= 1024:
                self._shared.clear()
                self.launcher.forget_shared_envs()
            variables = {
                "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
                "LANG": "C.UTF-8",
                **dict(launch.batch_envs),
                # No mount namespace: the storage folders are the host directories themselves.
                **{m.env_name: m.host_path for m in launch.mounts},
                **dict(self._tag),
            }
            shared = self._shared[key] = self.launcher.shared_env(variables)
        return shared

    def wait(self, started: Started, timeout: float) -> bool:
        """Whether the job ended within ``timeout`` seconds."""
        return started.job is None or started.job.wait(timeout)

    def withdraw(self, started: Started) -> bool:
        """Take back a job held ``after`` another one, if it has not started: True if so."""
        return started.job is not None and started.job.withdraw()

    def finish(self, started: Started) -> Outcome:
        """Wait for a started job to end; its outcome."""
        job, launch = started.job, started.launch
        assert job is not None
        try:
            job.wait()
        finally:
            if started.cancel_timeout is not None:
                started.cancel_timeout()
        if job.error is not None or job.lost:
            self._drop_workdir(started.workdir)
        if job.error is not None:
            reason = f"Cannot start {launch.commands[0]}: {job.error}"
            return Outcome(None, FailureCode.ErrorStartingContainer.value, reason)
        if job.lost or job.returncode is None:
            return Outcome(
                None, FailureCode.ErrorInfrastructureFault.value, "The job launcher stopped while the job ran"
            )
        return exit_outcome(job.returncode, started.handle, launch.timeout_s)


@dataclass(slots=True)
class Started:
    """A job the launcher has (running, or held behind another)."""

    launch: JobLaunch
    handle: RunHandle
    workdir: str
    job: LaunchedJob | None = None
    cancel_timeout: Callable[[], None] | None = None
