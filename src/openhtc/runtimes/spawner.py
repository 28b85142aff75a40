"""The server's side of the sandbox spawners (``spawner_loop.py``, processes of their own).

``Spawners.spawn`` hands a sandbox to a spawner process and returns at once; a reader thread
per process receives what happened to it (set up, released, ended) and the descriptors the
slot's worker needs to copy the job's output (see ``sandbox.Sandbox``). A sandbox held
``after`` another goes to that one's spawner, which releases it the moment the job ahead ends
with no round trip through the server; any other to the spawner with the fewest in hand.

The processes are started from one long-lived thread of their own: a child's parent-death
signal follows the thread that forked it, and a spawner must die with the server, not with
whichever worker thread first needed one. A spawner that dies (killed) takes its sandboxes with
it (their bwrap has ``--die-with-parent``); their jobs end as lost and the next sandbox starts
a new spawner.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import os
import queue
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Any

from openhtc.runtimes.launcher_loop import Decoder, encode

if TYPE_CHECKING:
    from openhtc.runtimes.sandbox import Sandbox

log = logging.getLogger("openhtc.runtimes.spawner")
LOOP_SCRIPT = Path(__file__).with_name("spawner_loop.py")
READY_FDS = 3  # a "ready" carries the output's read end, bwrap's pidfd, the init's pidfd


class SpawnerGone(RuntimeError):
    """The spawners were closed."""


class _Starter:
    """One thread that starts the spawner processes and lives as long as the runtime."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def call(self, fn: Callable[[], Any]) -> Any:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="sandbox-spawner-starter", daemon=True)
                self._thread.start()
        done: Future[Any] = Future()
        self._queue.put((fn, done))
        return done.result()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            fn, done = item
            try:
                done.set_result(fn())
            except BaseException as exc:
                done.set_exception(exc)

    def close(self) -> None:
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(None)
            thread.join(5)


class Spawners:
    """A pool of spawner processes (by default one per CPU, at most 8)."""

    def __init__(self, processes: int | None = None) -> None:
        self._starter = _Starter()
        count = processes or min(os.cpu_count() or 1, 8)
        self._processes = [_Process(i, self._starter) for i in range(count)]
        self._keys = itertools.count(1)
        self._closed = False

    def spawn(
        self,
        sandbox: Sandbox,
        argv: list[str],
        env: dict[str, str],
        procs: list[str],
        after: Sandbox | None,
        armed: bool,
    ) -> None:
        """Start bwrap (``argv`` up to ``--`` and the command after it) in the cgroup whose
        ``cgroup.procs`` files are ``procs``; released once ``armed`` (or ``Sandbox.arm``) and
        ``after`` has ended. Raises SpawnerGone once closed, OSError if no spawner starts."""
        if self._closed:
            raise SpawnerGone("the sandbox spawners are closed")
        ahead = [p for p in self._processes if after is not None and p is after.process]
        process = ahead[0] if ahead else min(self._processes, key=_Process.load)
        process.spawn(next(self._keys), sandbox, argv, env, procs, after, armed)

    def pids(self) -> list[int]:
        """The live spawner processes (tests, diagnostics)."""
        return [pid for p in self._processes if (pid := p.pid())]

    def close(self) -> None:
        """Stop the spawners; each kills the sandboxes it still has."""
        self._closed = True
        for process in self._processes:
            process.close()
        self._starter.close()


class _Process:
    """One spawner process, its socket and the sandboxes in its hands."""

    def __init__(self, index: int, starter: _Starter) -> None:
        self.index = index
        self._starter = starter
        self._lock = threading.Lock()  # guards the process, the socket and ``_jobs``
        self._jobs: dict[int, Sandbox] = {}
        self._proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._closed = False

    def load(self) -> int:
        return len(self._jobs)

    def pid(self) -> int:
        proc = self._proc
        return proc.pid if proc is not None else 0

    def spawn(
        self,
        key: int,
        sandbox: Sandbox,
        argv: list[str],
        env: dict[str, str],
        procs: list[str],
        after: Sandbox | None,
        armed: bool,
    ) -> None:
        with self._lock:
            sock = self._ensure_running()
            # The job ahead counts only if this very process holds it (else it is gone).
            waits_for = after.key if after is not None and after.sock is sock and not after.over else None
            sandbox.key, sandbox.process, sandbox.sock = key, self, sock
            self._jobs[key] = sandbox
            with contextlib.suppress(OSError):  # it died: its reader ends the sandbox as lost
                sock.sendall(encode(("spawn", key, argv, env, procs, waits_for, armed)))

    def send(self, sandbox: Sandbox, message: tuple[Any, ...]) -> bool:
        """A message about one of this process's sandboxes; False if it no longer has it."""
        with self._lock:
            mine = self._jobs.get(sandbox.key) is sandbox
            if self._sock is None or sandbox.sock is not self._sock or not mine:
                return False
            try:
                self._sock.sendall(encode(message))
            except OSError:
                return False  # the process is gone; the reader thread ends its sandboxes
            return True

    def close(self) -> None:
        with self._lock:
            self._closed = True
            proc, sock = self._proc, self._sock
            self._proc = self._sock = None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.sendall(encode(("bye",)))  # it kills what it still has
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        if proc is not None:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def _ensure_running(self) -> socket.socket:
        """The socket to the live process, started if needed (hold ``_lock``)."""
        if self._closed:
            raise SpawnerGone("the sandbox spawners are closed")
        if self._sock is not None:
            return self._sock
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        argv = [sys.executable, "-I", "-S", str(LOOP_SCRIPT), str(theirs.fileno()), str(os.getpid())]
        try:
            proc = self._starter.call(
                lambda: subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, pass_fds=(theirs.fileno(),), start_new_session=True
                )
            )
        finally:
            theirs.close()
        self._proc, self._sock = proc, mine
        name = f"sandbox-spawner-{self.index}"
        threading.Thread(target=self._read, args=(mine, proc), name=name, daemon=True).start()
        return mine

    def _read(self, sock: socket.socket, proc: subprocess.Popen[bytes]) -> None:
        decoder = Decoder()
        fds: collections.deque[int] = collections.deque()
        try:
            while True:
                data, got, _, _ = socket.recv_fds(sock, 1 << 16, 16)
                fds.extend(got)
                if not data:
                    break
                for message in decoder.feed(data):
                    self._dispatch(message, fds)
        except OSError:
            pass
        finally:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._gone(sock, proc)

    def _dispatch(self, message: tuple[Any, ...], fds: collections.deque[int]) -> None:
        kind, key = message[0], message[1]
        passed = [fds.popleft() for _ in range(READY_FDS)] if kind == "ready" else []
        ends = kind in ("failed", "exited")
        with self._lock:
            sandbox = self._jobs.pop(key, None) if ends else self._jobs.get(key)
        if sandbox is None:
            for fd in passed:
                os.close(fd)
            return
        if kind == "ready":
            sandbox.on_ready_message(message[2], message[3], passed)
        elif kind == "running":
            sandbox.on_running_message()
        elif kind == "withdrawn":
            sandbox.on_withdrawn_message(message[2])
        elif kind == "failed":
            sandbox.on_failed_message(message[2], message[3])
        elif kind == "exited":
            sandbox.on_exited_message(message[2])

    def _gone(self, sock: socket.socket, proc: subprocess.Popen[bytes]) -> None:
        """The process ended: its sandboxes died with it (``--die-with-parent``)."""
        with self._lock:
            if self._sock is sock:
                self._proc = self._sock = None
            orphans, self._jobs = self._jobs, {}
        sock.close()
        try:
            code = proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        if orphans and not self._closed:
            log.error("a sandbox spawner exited (%s) with %d sandbox(es) in hand", code, len(orphans))
        for sandbox in orphans.values():
            sandbox.on_lost()
