"""One warm function worker: ``runner.py`` started through the executor's runtime as a job of
its own (the same sandbox, image and limits as any job of that image), talked to over two named
pipes in a directory the runtime binds into the sandbox.

Named pipes, not the job's stdin/stdout: every runtime already binds directories into its jobs
and copies their output to a log, so a worker needs nothing new from any runtime. The executor's
ends are opened read-write, so opening never blocks; a worker's death is told by the runtime's
``run`` returning (the thread here then pokes a wake-up pipe), not by an end of file. Once it
is dead, every reply it wrote is still read (``receive`` drains the pipe) before WorkerGone: a
call it answered before a kill keeps its answer.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import select
import shutil
import struct
import threading
import time
from collections import deque
from typing import Any

from openhtc.domain.enums import FailureCode
from openhtc.domain.models import JobLaunch, Mount
from openhtc.runtimes.base import JobLog, Outcome, RunHandle, Runtime

_HEAD = struct.Struct(">cI")
FRAME_HEAD = _HEAD.size  # a frame's bytes before its payload
LONG_CALL_SECONDS = 0.05
POKED = (b"P", b"")  # what receive returns when poke woke it (a call was stopped: look again)


class WorkerGone(Exception):
    """The worker process ended (crash, memory, kill); ``outcome`` says how."""


class Worker:
    def __init__(self, runtime: Runtime, launch: JobLaunch, pipes: str, log_path: str) -> None:
        self.pipes = pipes
        self.log_path = log_path
        os.makedirs(pipes, exist_ok=True)
        for name in ("calls", "replies"):
            os.mkfifo(os.path.join(pipes, name), 0o666)
        self._calls = os.open(os.path.join(pipes, "calls"), os.O_RDWR)
        self._replies = os.open(os.path.join(pipes, "replies"), os.O_RDWR)
        self._wake_r, self._wake_w = os.pipe()
        self._buf = bytearray()
        self.handle = RunHandle()
        self.outcome: Outcome | None = None
        self.idle_since = time.monotonic()
        self.ready = False
        # The calls given to it and not finished, in order; the first ``sent`` are in its pipe
        # (``inflight`` bytes of them), of which the first ``answered`` have their reply (kept
        # on the call): the pool's (functions/pool.py).
        self.calls: deque[Any] = deque()
        self.sent = 0
        self.answered = 0
        self.inflight = 0
        self.call_seconds: float | None = None  # how long its calls take (the handler's time)
        self.killed = False  # the pool killed it: never given back
        self.killed_for: Any = None  # the call it was killed for (a timeout, a stop)
        self.closed = False
        self._drained = False  # dead, and every reply it wrote is in _buf
        self._runtime = runtime
        self._launch = launch
        self._ended = threading.Event()
        self._thread = threading.Thread(target=self._run, name="function-worker", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self.outcome = self._runtime.run(self._launch, self.handle, JobLog(self.log_path), lambda: None)
        except Exception as exc:  # the runtime failed: the worker never ran
            self.outcome = Outcome(None, FailureCode.ErrorStartingContainer.value, f"Runtime error: {exc}")
        finally:
            self._ended.set()
            with contextlib.suppress(OSError):
                os.write(self._wake_w, b"x")

    @property
    def alive(self) -> bool:
        return not self._ended.is_set()

    def kill(self) -> None:
        self.handle.stop()

    def poke(self) -> None:
        """Wake whoever waits in ``receive`` (with POKED): one of its calls was stopped."""
        if not self.closed:  # (its descriptor's number may be another file's once closed)
            with contextlib.suppress(OSError):
                os.write(self._wake_w, b"p")

    def end(self) -> Outcome:
        """Wait for the process to end (after a kill, or on its own); how it ended."""
        self._ended.wait()
        assert self.outcome is not None
        return self.outcome

    def close(self) -> None:
        """Kill the worker, wait for it, and free its pipes."""
        if self.closed:
            return
        self.closed = True
        self.kill()
        self._ended.wait(30)
        for fd in (self._calls, self._replies, self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        shutil.rmtree(self.pipes, ignore_errors=True)
        with contextlib.suppress(OSError):
            os.unlink(self.log_path)

    def send(self, *payloads: bytes) -> int:
        """Send calls, all in one write; how many were written whole (all, unless the worker
        ended first: a call cut short never runs)."""
        data = memoryview(b"".join(_HEAD.pack(b"C", len(p)) + p for p in payloads))
        written = 0
        while written < len(data):
            if self.closed or not self.alive:
                ends = itertools.accumulate(_HEAD.size + len(p) for p in payloads)
                return sum(1 for end in ends if end <= written)
            # A full pipe (a huge event) blocks until the worker reads: it is running.
            written += os.write(self._calls, data[written:])
        return len(payloads)

    def receive(self, deadline: float | None) -> tuple[bytes, bytes] | None:
        """The next frame (tag, payload); None at ``deadline`` (monotonic); POKED after a
        ``poke``; WorkerGone once the worker has ended and every frame it wrote was returned."""
        while True:
            frame = self._frame()
            if frame is not None:
                return frame
            if self.closed or self._drained:
                raise WorkerGone
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            readable, _, _ = select.select([self._replies, self._wake_r], [], [], left)
            if self._replies in readable:
                self._buf += os.read(self._replies, 1 << 20)
            elif self._wake_r in readable:
                os.read(self._wake_r, 64)
                if self.alive:
                    return POKED
                self._drain()
            else:  # nothing by the deadline (a deadline past: nothing readable now)
                return None

    def _drain(self) -> None:
        """The worker has ended: what it wrote before is all in the pipe; read it to the end."""
        while select.select([self._replies], [], [], 0)[0]:
            chunk = os.read(self._replies, 1 << 20)
            if not chunk:
                break
            self._buf += chunk
        self._drained = True

    def took(self, seconds: float) -> None:
        """A call took ``seconds``: a long one (LONG_CALL_SECONDS) counts at once, shorter ones
        (a fast call the machine's load held up) are smoothed in."""
        known = self.call_seconds
        if known is None or (seconds >= LONG_CALL_SECONDS and seconds > known):
            self.call_seconds = seconds
        else:
            self.call_seconds = 0.9 * known + 0.1 * seconds

    def _frame(self) -> tuple[bytes, bytes] | None:
        if len(self._buf) < _HEAD.size:
            return None
        tag, size = _HEAD.unpack_from(self._buf)
        end = _HEAD.size + size
        if len(self._buf) < end:
            return None
        payload = bytes(self._buf[_HEAD.size : end])
        del self._buf[:end]
        return tag, payload


def worker_launch(
    launch: JobLaunch,
    python: str,
    runner_dir: str,
    pipes: str,
    code_dir: str | None,
    handler: str,
    local: bool,
) -> JobLaunch:
    """The job that runs a worker: ``launch``'s image, limits and storage, the runner instead
    of its commands, no timeout of its own (the pool times calls)."""
    mounts = [*launch.mounts, Mount("OPENHTC_FN_PIPES", pipes, "/.openhtc/pipes", False)]
    runner = os.path.join(runner_dir, "runner.py")
    if not local:
        mounts.append(Mount("OPENHTC_FN_RUNNER", runner_dir, "/.openhtc/runner", True))
        runner = "/.openhtc/runner/runner.py"
    if code_dir is not None:
        mounts.append(Mount("OPENHTC_FN_CODE", code_dir, "/.openhtc/code", True))
    return launch._replace(
        commands=(python, runner, handler), envs=(), timeout_s=None, mounts=tuple(mounts), working_dir=None
    )
