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

Given a directory (``sock_dir``) and ``adopt_seconds``, the launchers outlive a server that
dies without closing them (``kill -9``): each waits on ``<sock_dir>/<index>.sock`` for the next
server, which calls ``reconnect`` before it starts any job and gets back what still runs, what
ended meanwhile and what was dropped unstarted (``Survivors``). ``close`` (a clean stop) still
ends every launcher and its jobs.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

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


class Survivor(NamedTuple):
    """A job a dead server's launcher kept: still running, or ended (``job.returncode`` set)."""

    job: LaunchedJob
    ident: Any  # what the server gave ``start`` as the job's identity
    seconds_run: float
    cwd: str | None  # None for an ended job


class Survivors(NamedTuple):
    jobs: list[Survivor]
    dropped: list[Any]  # idents of held jobs that never started
    launchers: list[int]  # the pids of the launcher processes taken over


class Launcher:
    """A pool of launcher processes."""

    def __init__(
        self,
        processes: int | None = None,
        max_log_bytes: int | None = None,
        sock_dir: str | None = None,
        adopt_seconds: float = 0.0,
    ) -> None:
        count = processes or min(os.cpu_count() or 1, 8)
        self._keys = itertools.count(1)
        self._env_ids = itertools.count(1)
        survive = (sock_dir, adopt_seconds) if sock_dir and adopt_seconds > 0 else None
        self.sock_dir = sock_dir  # taken back from even when new launchers are not to survive
        if survive is not None:
            os.makedirs(survive[0], mode=0o700, exist_ok=True)
        self._processes = [_Process(i, max_log_bytes or 0, survive) for i in range(count)]
        self._closed = False

    def reconnect(self) -> Survivors:
        """Take over the launchers a dead server left (call before any ``start``): each live
        ``<index>.sock`` becomes one of this pool's processes; a stale one is removed."""
        found = Survivors([], [], [])
        if self.sock_dir is None:
            return found
        top = 0
        for index, sock, (_, running, ended, dropped) in waiting_launchers(self.sock_dir):
            while len(self._processes) <= index:
                self._processes.append(_Process(len(self._processes), *self._processes[0].config()))
            process = self._processes[index]
            jobs = process.adopt(sock, running, ended)
            found.jobs.extend(jobs)
            found.dropped.extend(dropped)
            found.launchers.append(process.pid())
            top = max([top, *(s.job.key for s in jobs), *(r[0] for r in running)])
        self._keys = itertools.count(top + 1)
        return found

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
        ident: Any = None,
    ) -> LaunchedJob:
        """Spawn ``argv`` in its own session in ``cwd`` (an empty directory, emptied again once
        the job ends), at once or, given ``after``, the moment that job ends. Its environment
        is ``env`` updated with ``shared``. ``on_started`` runs on a reader thread once the
        process exists. Output goes to ``log_path`` (created at the first line)."""
        if self._closed:
            raise LauncherGone("the job launcher is closed")
        process = after.process if after is not None else min(self._processes, key=_Process.load)
        return process.start(next(self._keys), argv, shared, env, cwd, log_path, on_started, after, ident)

    def close(self) -> None:
        """Stop the launcher processes; each kills what still runs."""
        self._closed = True
        for process in self._processes:
            process.close()


class _Process:
    """One launcher process, its socket and the jobs in its hands."""

    def __init__(self, index: int, max_log_bytes: int = 0, survive: tuple[str, float] | None = None) -> None:
        self.index = index
        self.max_log_bytes = max_log_bytes  # per job; 0: no cap
        self.survive = survive  # (socket directory, adopt_seconds): it outlives a crashed server
        self._lock = threading.Lock()  # guards the process, the socket and ``_jobs``
        self._jobs: dict[int, LaunchedJob] = {}
        self._proc: subprocess.Popen[bytes] | int | None = None  # a pid: adopted, not our child
        self._sock: socket.socket | None = None
        self._closed = False
        self._sent: set[int] = set()  # SharedEnv ids the live process has

    def load(self) -> int:
        return len(self._jobs)

    def pid(self) -> int:
        proc = self._proc
        return proc if isinstance(proc, int) else proc.pid if proc is not None else 0

    def config(self) -> tuple[int, tuple[str, float] | None]:
        return self.max_log_bytes, self.survive

    def adopt(self, sock: socket.socket, running: list[Any], ended: list[Any]) -> list[Survivor]:
        """Take over a launcher a dead server left, through ``sock``; its jobs as Survivors."""
        found = []
        with self._lock:
            for key, ident, pid, seconds_run, cwd in running:
                job = LaunchedJob(key, self, lambda: None)
                job.pid = pid
                self._jobs[key] = job
                found.append(Survivor(job, ident, seconds_run, cwd))
            for key, ident, code in ended:
                job = LaunchedJob(key, self, lambda: None)
                job.returncode = code
                job._done.set()
                found.append(Survivor(job, ident, 0.0, None))
            pid = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            self._proc, self._sock = struct.unpack("3i", pid)[0], sock
            self._sent.clear()
        name = f"job-launcher-{self.index}"
        threading.Thread(target=self._read, args=(sock, self._proc), name=name, daemon=True).start()
        return found

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
        ident: Any = None,
    ) -> LaunchedJob:
        with self._lock:
            sock = self._ensure_running()
            job = LaunchedJob(key, self, on_started)
            self._jobs[key] = job
            waits_for = after.key if after is not None and after.key in self._jobs else None
            message = encode(("start", key, list(argv), shared.id, env, cwd, log_path, waits_for, ident))
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
                sock.sendall(encode(("bye",)))  # a clean stop: the launcher ends its jobs
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        _wait(proc, 5, kill=True)

    def _ensure_running(self) -> socket.socket:
        """The socket to the live process, started if needed (hold ``_lock``)."""
        if self._closed:
            raise LauncherGone("the job launcher is closed")
        if self._sock is not None:
            return self._sock
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        argv = [sys.executable, "-I", "-S", str(LOOP_SCRIPT), str(theirs.fileno()), str(self.max_log_bytes)]
        if self.survive is not None:
            argv += [os.path.join(self.survive[0], f"{self.index}.sock"), str(self.survive[1])]
        try:
            # A session of its own: a Ctrl-C in the server's terminal must not reach it, the
            # server stops it; nor does a kill -9 of the server's process group, so it can
            # outlive the server. -I -S: no site-packages, no environment; stdlib only.
            proc = subprocess.Popen(
                argv,
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

    def _read(self, sock: socket.socket, proc: subprocess.Popen[bytes] | int) -> None:
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

    def _gone(self, sock: socket.socket, proc: subprocess.Popen[bytes] | int) -> None:
        """The process ended: kill what it had started, fail what it held."""
        with self._lock:
            if self._sock is sock:
                self._proc = self._sock = None
            orphans, self._jobs = self._jobs, {}
        sock.close()
        code = _wait(proc, 5)
        if orphans and not self._closed:
            log.error("a job launcher exited (%s) with %d job(s) in hand", code, len(orphans))
        for job in orphans.values():
            if job.pid is not None:
                with contextlib.suppress(OSError):
                    os.killpg(job.pid, signal.SIGKILL)
            job.lost = True
            job._done.set()
            if job._answered is not None:
                job._answered.set()


def waiting_launchers(sock_dir: str) -> Iterator[tuple[int, socket.socket, tuple[Any, ...]]]:
    """(index, socket, inventory) of each launcher a dead server left waiting in ``sock_dir``;
    a socket nobody answers on (an older crash's) is removed."""
    with contextlib.suppress(FileNotFoundError):
        os.chmod(sock_dir, 0o700)
    try:
        names = sorted(os.listdir(sock_dir))
    except FileNotFoundError:
        return
    for name in names:
        stem, _, ext = name.partition(".")
        if ext != "sock" or not stem.isdigit():
            continue
        path = os.path.join(sock_dir, name)
        inventory = _connect(path)
        if inventory is None:
            with contextlib.suppress(OSError):
                os.unlink(path)  # a launcher that is gone (or serves another server)
            continue
        yield int(stem), *inventory


def dismiss_launchers(sock_dir: str) -> int:
    """End the launchers a dead server left waiting, and their jobs (for a server that will not
    take them back: another runtime now). Returns how many jobs they still ran."""
    jobs = 0
    for _, sock, inventory in waiting_launchers(sock_dir):
        jobs += len(inventory[1])
        pid = struct.unpack(
            "3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        )[0]
        with contextlib.suppress(OSError):
            sock.sendall(encode(("bye",)))
        sock.close()
        _wait(pid, 10, kill=True)
    return jobs


def _connect(path: str) -> tuple[socket.socket, tuple[Any, ...]] | None:
    """Connect to a launcher waiting at ``path``; its inventory, or None if none answers."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(10)
        sock.connect(path)
        decoder = Decoder()
        while True:
            data = sock.recv(1 << 16)
            if not data:
                raise ConnectionResetError("closed without an inventory")
            messages = decoder.feed(data)
            if messages:
                sock.settimeout(None)
                return sock, messages[0]
    except OSError:
        sock.close()
        return None


def _wait(proc: subprocess.Popen[bytes] | int | None, timeout: float, kill: bool = False) -> int | None:
    """Wait for a launcher process to exit (SIGKILL it after ``timeout`` if ``kill``); an
    adopted one is not our child: its pid is watched through a pidfd."""
    if proc is None:
        return None
    if isinstance(proc, subprocess.Popen):
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            if not kill:
                return None
            proc.kill()
            return proc.wait()
    try:
        fd = os.pidfd_open(proc)
    except OSError:
        return None  # gone already
    try:
        if not select.select([fd], [], [], timeout)[0] and kill:
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(fd, signal.SIGKILL)
            select.select([fd], [], [], 5)
    finally:
        os.close(fd)
    return None
