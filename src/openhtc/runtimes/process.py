"""The process runtime: a job's commands run on the host in an empty working directory.

No isolation at all: for development and tests only. The image name is recorded but not used.
The job launcher (``launcher.py``, a process of its own) spawns each job in its own session
and copies its output to the job log. A job ends when its main process exits; the launcher then
kills what the job left behind, its process group and any process that left it (``setsid``,
``nohup``: the launcher is their subreaper). A timeout or cancel kills the main process, so the
same happens.
Jobs carry an owner tag in their environment. The launchers outlive a crashed server (given
``sock_dir`` and ``adopt_seconds``, see ``launcher.py``): the restarted executor first takes
them back with their jobs (``survivors``), then kills every other process its predecessor left
(``adopt``) before those jobs are recovered, so a job never runs twice at once.
"""

from __future__ import annotations

import contextlib
import functools
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
from openhtc.domain.models import JobLaunch, Mount
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

    def __init__(
        self,
        work_root: str,
        max_log_bytes: int | None = None,
        sock_dir: str | None = None,
        adopt_seconds: float = 0.0,
    ) -> None:
        self.work_root = work_root
        os.makedirs(work_root, exist_ok=True)
        self._tag: tuple[tuple[str, str], ...] = ()
        self._deadlines = Deadlines()
        self._local = threading.local()
        self.launcher = Launcher(max_log_bytes=max_log_bytes, sock_dir=sock_dir, adopt_seconds=adopt_seconds)
        self._shared: dict[tuple[object, ...], SharedEnv] = {}
        self._kept: tuple[set[int], set[str]] = (set(), set())  # launchers and work dirs taken over

    def survivors(self, new_handle: Callable[[], RunHandle]) -> Survived:
        """Take back the jobs a crashed predecessor's launchers kept (call before ``adopt``):
        each as its launch and what ``finish`` takes (a job that ended meanwhile finishes at
        once with its exit code), plus the (job, attempt) pairs dropped before they started."""
        found = self.launcher.reconnect()
        survived = Survived([], [(ident[0], ident[1]) for ident in found.dropped if ident])
        self._kept = (set(found.launchers), {s.cwd for s in found.jobs if s.cwd})
        for survivor in found.jobs:
            if not survivor.ident:
                continue  # started without an identity: nothing to report it to
            launch = _launch_of(survivor.ident)
            handle = new_handle()
            started = Started(launch, handle, survivor.cwd or "", survivor.job, adopted=True)
            handle.attach_kill(survivor.job.kill)
            if launch.timeout_s and survivor.cwd is not None:
                left = max(0.0, launch.timeout_s - survivor.seconds_run)
                started.cancel_timeout = self._deadlines.add(left, functools.partial(handle.stop, True))
            survived.jobs.append((launch, started, survivor.cwd is not None))
        return survived

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
        launchers, workdirs = self._kept
        for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
            try:
                with open(f"/proc/{pid}/environ", "rb") as fh:
                    env = fh.read().split(b"\0")
            except OSError:
                continue
            if any(item.startswith(mine) and item != current for item in env):
                if launchers and _descends_from(pid, launchers):
                    continue  # a job of a launcher taken over: it runs on, ours now
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
                    killed += 1
        for leftover in os.listdir(self.work_root):  # work directories of the dead incarnation
            path = os.path.join(self.work_root, leftover)
            if path not in workdirs:
                shutil.rmtree(path, ignore_errors=True)
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
        started.job = self.launcher.start(
            launch.commands, shared, own, workdir, log_path, running, previous, _ident(launch)
        )
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
        if job.error is not None or job.lost or (started.adopted and started.workdir):
            self._drop_workdir(started.workdir)  # (an adopted job's directory is no thread's)
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
    adopted: bool = False  # taken over from a crashed server's launcher


@dataclass(slots=True)
class Survived:
    """What a crashed server's launchers kept: (launch, started, whether it was still running)
    for each job, and the attempts held behind another that were dropped unstarted."""

    jobs: list[tuple[JobLaunch, Started, bool]]
    dropped: list[tuple[int, int]]


def _ident(launch: JobLaunch) -> tuple[object, ...]:
    """The launch as plain values, kept by the launcher for a next server (no environment:
    it holds tokens, and a report needs none of it)."""
    mounts = tuple(tuple(m) for m in launch.mounts)
    return tuple(launch._replace(envs=(), batch_envs=(), mounts=mounts))  # type: ignore[arg-type]


def _launch_of(ident: tuple[object, ...]) -> JobLaunch:
    launch = JobLaunch._make(ident)
    return launch._replace(mounts=tuple(Mount._make(m) for m in launch.mounts))


def _descends_from(pid: int, ancestors: set[int]) -> bool:
    """Whether ``pid`` is in the process tree of one of ``ancestors``."""
    for _ in range(64):
        try:
            with open(f"/proc/{pid}/stat") as fh:
                pid = int(fh.read().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            return False
        if pid in ancestors:
            return True
        if pid <= 1:
            return False
    return False
