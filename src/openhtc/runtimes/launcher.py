"""The server's side of the job launchers (``launcher_loop.py``, processes of their own).

``Launcher.start`` hands a job to a launcher process and returns at once; a reader thread per
process receives what happened to it. A worker thread that runs a job waits on one event
instead of making every system call of a spawn under the server's GIL (see ``launcher_loop``
for why).

There are several launcher processes (``processes``, by default one per CPU): a spawn keeps
its launcher blocked until the child has exec'd (vfork semantics), so one launcher starts
jobs no faster than a sequential spawn loop; several start them side by side. A job held
``after`` another goes to that one's launcher; any other job to the launcher with the fewest
jobs in hand.

A launcher process is started on first use and again after it died. If it dies while jobs
run, their process groups are killed from here and their attempts end as infrastructure
faults, so no job keeps running unseen.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from openhtc.runtimes.launcher_loop import Decoder, encode

log = logging.getLogger("openhtc.runtimes.launcher")
LOOP_SCRIPT = Path(__file__).with_name("launcher_loop.py")


class LauncherGone(RuntimeError):
    """The launchers were closed."""


class SharedEnv:
    """Environment variables many jobs share (a batch's), sent to each launcher process once."""

    __slots__ = ("id", "variables")

    def __init__(self, env_id: int, variables: dict[str, str]) -> None:
        self.id = env_id
        self.variables = variables


class LaunchedJob:
    """One job in a launcher's hands: wait for its end, or kill it."""

    __slots__ = (
        "_answered", "_done", "error", "key", "lost", "on_started", "pid", "process", "returncode",
        "withdrawn",
    )  # fmt: skip

    def __init__(self, key: int, process: _Process, on_started: Callable[[], None]) -> None:
        self.key = key
        self.process = process
        self.pid: int | None = None
        self.on_started = on_started
        self.returncode: int | None = None
        self.error: str | None = None  # could not be spawned: why
        self.lost = False  # its launcher died under it
        self.withdrawn = False  # taken back before it started
        self._done = threading.Event()
        self._answered: threading.Event | None = None  # the answer to a withdraw(), made by it

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the job's end; False if ``timeout`` passed first."""
        return self._done.wait(timeout)

    def kill(self) -> None:
        """SIGKILL the job's process group (no effect once it has ended)."""
        if not self._done.is_set():
            self.process.send("kill", self.key)

    def withdraw(self) -> bool:
        """Take back a job held ``after`` another one: True if it had not started (it never
        will), False if it has (or has ended). Two threads may ask at once (a worker, and the
        executor's stop): both get the one answer."""
        answered = self.process.answer_event(self)  # before the send: the answer sets it
        if self._done.is_set() or not self.process.send("withdraw", self.key):
            return self.withdrawn
        answered.wait()  # the answer, or the launcher's death
        return self.withdrawn


class Launcher:
    """A pool of launcher processes."""

    def __init__(self, processes: int | None = None, max_log_bytes: int | None = None) -> None:
        count = processes or min(os.cpu_count() or 1, 8)
        self._keys = itertools.count(1)
        self._env_ids = itertools.count(1)
        self._processes = [_Process(i, max_log_bytes or 0) for i in range(count)]
        self._closed = False

    def shared_env(self, variables: dict[str, str]) -> SharedEnv:
        return SharedEnv(next(self._env_ids), variables)

    def forget_shared_envs(self) -> None:
        """Let the launcher processes drop every SharedEnv made so far (they are sent again
        when used again)."""
        for process in self._processes:
            process.forget()

    def start(
        self,
        argv: Sequence[str],
        shared: SharedEnv,
        env: dict[str, str],
        cwd: str,
        log_path: str,
        on_started: Callable[[], None],
        after: LaunchedJob | None = None,
    ) -> LaunchedJob:
        """Spawn ``argv`` in its own session in ``cwd`` (an empty directory, emptied again once
        the job ends), at once or, given ``after``, the moment that job ends. Its environment
        is ``env`` updated with ``shared``. ``on_started`` runs on a reader thread once the
        process exists. Output goes to ``log_path`` (created at the first line)."""
        if self._closed:
            raise LauncherGone("the job launcher is closed")
        process = after.process if after is not None else min(self._processes, key=_Process.load)
        return process.start(next(self._keys), argv, shared, env, cwd, log_path, on_started, after)

    def close(self) -> None:
        """Stop the launcher processes; each kills what still runs."""
        self._closed = True
        for process in self._processes:
            process.close()


class _Process:
    """One launcher process, its socket and the jobs in its hands."""

    def __init__(self, index: int, max_log_bytes: int = 0) -> None:
        self.index = index
        self.max_log_bytes = max_log_bytes  # per job; 0: no cap
        self._lock = threading.Lock()  # guards the process, the socket and ``_jobs``
        self._jobs: dict[int, LaunchedJob] = {}
        self._proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._closed = False
        self._sent: set[int] = set()  # SharedEnv ids the live process has

    def load(self) -> int:
        return len(self._jobs)

    def start(
        self,
        key: int,
        argv: Sequence[str],
        shared: SharedEnv,
        env: dict[str, str],
        cwd: str,
        log_path: str,
        on_started: Callable[[], None],
        after: LaunchedJob | None,
    ) -> LaunchedJob:
        with self._lock:
            sock = self._ensure_running()
            job = LaunchedJob(key, self, on_started)
            self._jobs[key] = job
            waits_for = after.key if after is not None and after.key in self._jobs else None
            message = encode(("start", key, list(argv), shared.id, env, cwd, log_path, waits_for))
            if shared.id not in self._sent:
                self._sent.add(shared.id)
                message = encode(("env", shared.id, shared.variables)) + message
            sock.sendall(message)
        return job

    def forget(self) -> None:
        with self._lock:
            if self._sock is not None and self._sent:
                with contextlib.suppress(OSError):
                    self._sock.sendall(encode(("forget",)))
            self._sent.clear()

    def answer_event(self, job: LaunchedJob) -> threading.Event:
        """The event the answer to a withdraw of ``job`` sets (one per job, made on first use)."""
        with self._lock:
            if job._answered is None:
                job._answered = threading.Event()
            return job._answered

    def send(self, kind: str, key: int) -> bool:
        """A "kill" or "withdraw" for one of this process's jobs; False if it has none such."""
        with self._lock:
            if self._sock is None or key not in self._jobs:
                return False
            try:
                self._sock.sendall(encode((kind, key)))
            except OSError:
                return False  # the process is gone; the reader thread fails its jobs
            return True

    def close(self) -> None:
        with self._lock:
            self._closed = True
            proc, sock = self._proc, self._sock
            self._proc = self._sock = None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        if proc is not None:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def _ensure_running(self) -> socket.socket:
        """The socket to the live process, started if needed (hold ``_lock``)."""
        if self._closed:
            raise LauncherGone("the job launcher is closed")
        if self._sock is not None:
            return self._sock
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # A session of its own: a Ctrl-C in the server's terminal must not reach it, the
            # server stops it. -I -S: no site-packages, no environment; it needs the stdlib only.
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", str(LOOP_SCRIPT), str(theirs.fileno()), str(self.max_log_bytes)],
                stdin=subprocess.DEVNULL,
                pass_fds=(theirs.fileno(),),
                start_new_session=True,
            )
        finally:
            theirs.close()
        self._proc, self._sock = proc, mine
        self._sent.clear()  # a new process has none
        name = f"job-launcher-{self.index}"
        threading.Thread(target=self._read, args=(mine, proc), name=name, daemon=True).start()
        return mine

    def _read(self, sock: socket.socket, proc: subprocess.Popen[bytes]) -> None:
        decoder = Decoder()
        try:
            while data := sock.recv(1 << 16):
                for message in decoder.feed(data):
                    self._dispatch(message)
        except OSError:
            pass
        finally:
            self._gone(sock, proc)

    def _dispatch(self, message: tuple[Any, ...]) -> None:
        kind, key = message[0], message[1]
        ends = kind in ("failed", "exited") or (kind == "withdrawn" and message[2])
        with self._lock:
            job = self._jobs.pop(key, None) if ends else self._jobs.get(key)
        if job is None:
            return
        if kind == "started":
            job.pid = message[2]
            job.on_started()
            return
        if kind == "failed":
            job.error = str(message[2])
        elif kind == "exited":
            job.returncode = message[2]
        elif ends:
            job.withdrawn = True
        if ends:
            job._done.set()
        if job._answered is not None:
            job._answered.set()

    def _gone(self, sock: socket.socket, proc: subprocess.Popen[bytes]) -> None:
        """The process ended: kill what it had started, fail what it held."""
        with self._lock:
            if self._sock is sock:
                self._proc = self._sock = None
            orphans, self._jobs = self._jobs, {}
        sock.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
        if orphans and not self._closed:
            log.error("a job launcher exited (%s) with %d job(s) in hand", proc.returncode, len(orphans))
        for job in orphans.values():
            if job.pid is not None:
                with contextlib.suppress(OSError):
                    os.killpg(job.pid, signal.SIGKILL)
            job.lost = True
            job._done.set()
            if job._answered is not None:
                job._answered.set()
