"""One warm function worker: ``runner.py`` started through the executor's runtime as a job of
its own (the same sandbox, image and limits as any job of that image), talked to over two named
pipes in a directory the runtime binds into the sandbox.

Named pipes, not the job's stdin/stdout: every runtime already binds directories into its jobs
and copies their output to a log, so a worker needs nothing new from any runtime. The executor's
ends are opened read-write, so opening never blocks; a worker's death is told by the runtime's
``run`` returning (the thread here then pokes a wake-up pipe), not by an end of file.
"""

from __future__ import annotations

import contextlib
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
        # (``inflight`` bytes of them, answered or not): the pool's (functions/pool.py).
        self.calls: deque[Any] = deque()
        self.sent = 0
        self.inflight = 0
        self.call_seconds: float | None = None  # how long its calls take (the handler's time)
        self.reply: tuple[bytes, bytes] | None = None  # its current call's, read ahead (pool.wait)
        self.victim_taken = False  # the call it died during has been failed
        self.closed = False
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

    def send(self, *payloads: bytes) -> None:
        """Send calls, all in one write."""
        data = memoryview(b"".join(_HEAD.pack(b"C", len(p)) + p for p in payloads))
        while data:
            if self.closed or not self.alive:
                raise WorkerGone
            # A full pipe (a huge event) blocks until the worker reads: it is running.
            data = data[os.write(self._calls, data) :]

    def receive(self, deadline: float | None) -> tuple[bytes, bytes] | None:
        """The next frame (tag, payload); None at ``deadline`` (monotonic); WorkerGone if the
        worker ended first."""
        while True:
            frame = self._frame()
            if frame is not None:
                return frame
            if self.closed:
                raise WorkerGone
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return None
            readable, _, _ = select.select([self._replies, self._wake_r], [], [], left)
            if self._replies in readable:
                self._buf += os.read(self._replies, 1 << 20)
            elif self._wake_r in readable:
                raise WorkerGone

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
