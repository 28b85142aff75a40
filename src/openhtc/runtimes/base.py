"""The runtime contract."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TextIO, runtime_checkable

from openhtc.domain.models import JobLaunch
from openhtc.runtimes.joblog import append_to


@dataclass(frozen=True, slots=True)
class Outcome:
    """How an attempt ended. ``failure_code`` None and exit code 0 means success."""

    exit_code: int | None
    failure_code: str | None
    reason: str

    @property
    def succeeded(self) -> bool:
        return self.failure_code is None and self.exit_code == 0


class RunHandle:
    """Lets the executor stop a running attempt (cancel, lost lease) from another thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._kill_fn: Callable[[], object] | None = None
        self.stopped = False
        self.timed_out = False

    def attach(self, proc: subprocess.Popen[bytes], also_kill: Callable[[], object] | None = None) -> None:
        """Stop means kill ``proc``'s process group, and call ``also_kill`` (a container runtime
        kills what escaped the group that way: a cgroup's processes, a podman container)."""

        def kill() -> None:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)  # the job's whole process group
            if also_kill is not None:
                also_kill()

        self.attach_kill(kill)

    def attach_kill(self, kill: Callable[[], object]) -> None:
        """Stop means call ``kill``; called at once if the attempt was stopped already."""
        with self._lock:
            self._kill_fn = kill
            stop = self.stopped
        if stop:
            kill()

    @property
    def attached(self) -> bool:
        """Whether the runtime has handed the attempt on (a process exists, or the job launcher
        has it): stopped before that, it never started."""
        return self._kill_fn is not None

    def stop(self, timed_out: bool = False) -> None:
        with self._lock:
            self.stopped = True
            self.timed_out = self.timed_out or timed_out
            kill = self._kill_fn
        if kill is not None:
            kill()


LogOpener = Callable[[], TextIO]


@dataclass(frozen=True, slots=True)
class JobLog:
    """An attempt's log file: calling it opens the file for appending (a LogOpener); runtimes
    that write it from elsewhere (the job launcher) use ``path``."""

    path: str

    def __call__(self) -> TextIO:
        return append_to(self.path)


@dataclass(frozen=True, slots=True)
class ImagePull:
    """Where and how an executor fetches one job image from the registry."""

    registry_url: str  # scheme://host:port of the registry's HTTP API
    reference: str  # host:port/{projectId}/repo:tag, as podman names it
    repository: str  # {projectId}/repo
    tag: str
    username: str
    password: str  # a registry token allowed to pull `repository`
    insecure: bool  # plain HTTP (the embedded registry on loopback)


class ImageSource(Protocol):
    """Resolves a job's ``imageName`` within its project to a pull it may make."""

    def pull_access(self, project_id: str, image_name: str) -> ImagePull: ...


class Runtime(Protocol):
    name: str
    # False for runtimes whose run() returns at once (noop): the executor runs those inline
    # on its control thread instead of handing each job to a worker thread.
    blocking: bool

    def run(
        self, launch: JobLaunch, handle: RunHandle, open_log: JobLog, on_running: Callable[[], None]
    ) -> Outcome:
        """Run one attempt to completion, calling ``on_running`` once the process is up."""
        ...

    def adopt(self, owner: str, incarnation: str) -> int:
        """Tag future jobs with (owner, incarnation) and kill jobs an earlier incarnation of the
        same owner left behind (its process died without stopping them). Returns how many."""
        ...

    def close(self) -> None:
        """Release what the runtime holds on the host (mounts) once no job runs any more."""
        ...


@runtime_checkable
class Pipelined(Protocol):
    """A runtime that can hold a job behind a running one and start it the moment that one
    ends, with no round trip to the executor in between (the process runtime's launcher)."""

    def start(
        self,
        launch: JobLaunch,
        handle: RunHandle,
        open_log: JobLog,
        on_running: Callable[[], None],
        after: Any,
    ) -> Any:
        """Start the attempt (after the one ``after`` started, if given); returns what
        ``finish`` takes, or an Outcome if it could not be started at all."""
        ...

    def wait(self, started: Any, timeout: float) -> bool:
        """Whether the attempt ended within ``timeout`` seconds."""
        ...

    def withdraw(self, started: Any) -> bool:
        """Take back an attempt held ``after`` another one if it has not started: True if so
        (it never will), False if it has."""
        ...

    def finish(self, started: Any) -> Outcome:
        """Wait for a started attempt to end."""
        ...


@runtime_checkable
class Surviving(Protocol):
    """A runtime whose jobs can outlive a crashed server (the process runtime's launchers)."""

    def survivors(self, new_handle: Callable[[], RunHandle]) -> Any:
        """Take back what a crashed predecessor left running (before ``adopt``): a ``Survived``
        (``process.py``)."""
        ...
