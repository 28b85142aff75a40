"""One bwrap sandbox, seen from the server: handed to a spawner, released, its output copied.

A spawner process (``spawner_loop.py``) starts bwrap born in the job's cgroup, waits for it to
report the sandbox on ``--info-fd``, holds it at ``--block-fd`` and releases it (at once, or the
moment the job ahead of it in the same slot ends), reaps it and waits for the sandbox's init to
die; the messages arrive on the spawner's reader thread (``on_*_message``). The server only
copies the job's output: with the first message it gets the output pipe's read end and a pidfd
of bwrap, and the slot's worker calls ``pump``, with the rules of ``output.pump_output``: the job
ends when bwrap does (its main process exited); what is left holding the pipe ``grace`` seconds
later is killed.

bwrap reads ``--block-fd`` until a byte or EOF: the sandbox keeps its own writer of that pipe
(``--sync-fd``, closed before the job's command runs), so a held sandbox never runs its job
unless the spawner tells it to; bwrap dies with the spawner (``--die-with-parent``), the spawner
with the server, and the restarted executor kills what the job cgroups still hold.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from openhtc.runtimes.output import CHUNK, LogSink


class SpawnerProcess(Protocol):
    """The spawner holding a sandbox (``spawner._Process``)."""

    def send(self, sandbox: Sandbox, message: tuple[Any, ...]) -> bool: ...

    def pid(self) -> int: ...


GRACE = 0.05  # seconds the rest of the sandbox gets to close the pipe once bwrap has exited


class Sandbox:
    """A bwrap sandbox from ``Spawners.spawn`` to ``reap``. ``kill`` may come from any thread;
    ``pump`` and ``reap`` from the slot's worker thread; ``on_*`` from the spawner's reader."""

    def __init__(self, kill_also: Callable[[], object]) -> None:
        self._lock = threading.Lock()
        self._kill_also = kill_also
        self.key = 0  # the spawner's name for it
        self.process: SpawnerProcess | None = None
        self.sock: socket.socket | None = None  # the spawner's socket when spawned (its life)
        self.pid: int | None = None  # bwrap's, once set up
        self.child: int | None = None  # the sandbox's init, once set up
        self.code: int | None = None  # bwrap's exit status (Popen.returncode style)
        self.failure: str | None = None  # why the sandbox could not be set up
        self.lost = False  # the spawner died with it
        self.killed = False
        self.released = False
        self.withdrawn = False
        self.over = False  # bwrap has exited (seen by the pump): the job's main process is gone
        self.ended = False  # ... and the output is copied
        self.on_release: Callable[[], None] | None = None  # the job's own process starts now
        self.on_ready: Callable[[int], None] | None = None  # given the init; then ``arm``
        self.cancel_timeout: Callable[[], None] | None = None
        self.out: int | None = None
        self.exited = -1  # bwrap's pidfd
        self._child_fd = -1
        self._settled = threading.Event()  # set up, or failed, or lost
        self._done = threading.Event()  # reaped, or failed, or lost
        self._answered = threading.Event()
        self._sink: LogSink | None = None
        self._deadline: float | None = None
        self._poller = select.poll()

    # -- from the spawner (its reader thread) ---------------------------------------------------

    def on_ready_message(self, pid: int, child: int, fds: list[int]) -> None:
        self.out, self.exited, self._child_fd = fds
        self.pid, self.child = pid, child
        self._poller.register(self.out, select.POLLIN)
        self._poller.register(self.exited, select.POLLIN)
        try:
            if self.on_ready is not None:  # the job network, before the job may run
                try:
                    self.on_ready(child)
                except OSError as exc:  # the sandbox died meanwhile (a cancel)
                    self.failure = f"the sandbox ended before it started the job ({exc.strerror or exc})"
                    self.kill()
                else:
                    self.arm()
        finally:
            self._settled.set()

    def on_running_message(self) -> None:
        self.released = True
        if self.on_release is not None:
            self.on_release()

    def on_withdrawn_message(self, held: bool) -> None:
        self.withdrawn = self.withdrawn or held
        self._answered.set()

    def on_failed_message(self, said: str, code: int | None) -> None:
        self.failure = said or "bwrap failed"
        self.code = code
        self.over = self.ended = True
        self._finish()

    def on_exited_message(self, code: int) -> None:
        with self._lock:
            self.code = code
        self._done.set()
        self._answered.set()

    def on_lost(self) -> None:
        self.lost = True
        self._kill_also()  # whatever of the job is left (its bwrap died with the spawner)
        if self.out is None:
            self.over = self.ended = True
        self._finish()

    def _finish(self) -> None:
        self._settled.set()
        self._done.set()
        self._answered.set()

    # -- from the runtime -----------------------------------------------------------------------

    def arm(self) -> None:
        """Let it run once the job ahead has ended (for a sandbox spawned not ``armed``)."""
        if self.process is not None:
            self.process.send(self, ("release", self.key))

    def take_back(self) -> bool:
        """Kill the sandbox if its job has not been released (True), else leave it (False).
        Two threads may ask at once (a worker, and the executor's stop): both get the answer."""
        if self.released:
            return False
        if self.process is None or not self.process.send(self, ("withdraw", self.key)):
            return not self.released  # the spawner has it no more: ended, or lost unstarted
        self._answered.wait()
        if self.withdrawn:
            self.killed = True
            self._kill_also()
        return self.withdrawn

    def kill(self) -> None:
        """SIGKILL bwrap (through its spawner) and what else the job has (its cgroup)."""
        with self._lock:
            self.killed = True
            alive = self.code is None
        if alive and self.process is not None:
            self.process.send(self, ("kill", self.key))
        self._kill_also()

    def pump(self, sink: LogSink, timeout: float | None) -> bool:
        """Copy output to ``sink`` until the job has ended (True) or ``timeout`` passed (False)."""
        self._sink = sink
        until = None if timeout is None else time.monotonic() + timeout
        if not self._settled.wait(timeout):
            return False
        while not self.ended:
            if self.out is None:  # never set up (failed, lost)
                self.over = self.ended = True
                break
            now = time.monotonic()
            waits = [t for t in (self._deadline, until) if t is not None]
            wait_ms = None if not waits else max(0, int((min(waits) - now) * 1000) + 1)
            events = dict(self._poller.poll(wait_ms))
            if self.out in events:
                data = os.read(self.out, CHUNK)
                if data:
                    sink.feed(data)
                    continue
                self._close_out()  # EOF: bwrap, which holds the pipe too, has exited
                self.over = True
            elif self.exited in events and self._deadline is None:
                self._poller.unregister(self.exited)
                self.over = True
                self._deadline = time.monotonic() + GRACE
            if self.out is not None and self._deadline is not None and time.monotonic() >= self._deadline:
                self._kill_also()  # the rest of the sandbox kept the pipe open: it goes now
                os.set_blocking(self.out, False)
                with contextlib.suppress(BlockingIOError):
                    while data := os.read(self.out, CHUNK):
                        sink.feed(data)
                self._close_out()
            if self.out is None:
                self.ended = True
            elif until is not None and time.monotonic() >= until:
                return False
        return True

    def _close_out(self) -> None:
        if self.out is not None:
            self._poller.unregister(self.out)
            os.close(self.out)
            self.out = None

    @property
    def last_output(self) -> str:
        return self._sink.last.decode("utf-8", "replace") if self._sink is not None else ""

    def reap(self) -> int | None:
        """bwrap's exit status once it has exited and the sandbox's init is gone (None: lost
        with its spawner); closes every descriptor. The output must be copied (or the sandbox
        killed) first, or this waits for the job."""
        self._done.wait()
        self._close_out()
        for fd in (self.exited, self._child_fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.exited = self._child_fd = -1
        return self.code
