"""A container job's output copied to its log (the bwrap and podman runtimes; the process
runtime's launcher has its own copy of these rules, in the standard library only).

Each line goes to the log as ``"{unix time}\t{line}"``. Past ``max_bytes`` of output the rest
is read and discarded, and one marker line says so; the job runs on. A log that cannot be
written (a full disk: ENOSPC) ends the copying the same way, marker attempted, and the job runs
on: its output is lost, never the job or another job.

The copy ends at EOF, or shortly after the job's main process has exited (``exited``, a pidfd):
then ``on_exit`` kills what the job left behind and what is already in the pipe is drained, so
a background child holding the pipe open cannot keep a job from ending.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import time
from collections.abc import Callable
from typing import TextIO

from openhtc.runtimes.base import LogOpener

log = logging.getLogger("openhtc.runtimes.output")
CHUNK = 1 << 16


def truncation_marker(max_bytes: int) -> str:
    return f"[openhtc] output truncated: the job wrote more than {max_bytes} bytes; the rest is discarded"


def write_failed_marker(exc: OSError) -> str:
    return f"[openhtc] output truncated: the log could not be written ({exc.strerror or exc})"


class LogSink:
    """The job's side of its log: timestamped lines, a byte cap, soft failure on write errors."""

    def __init__(self, open_log: LogOpener, max_bytes: int | None) -> None:
        self.open_log = open_log
        self.max_bytes = max_bytes
        self.written = 0
        self.done = False  # capped or failed: discard the rest
        self.last = b""
        self._partial = b""
        self._file: TextIO | None = None

    def feed(self, data: bytes) -> None:
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        if len(self._partial) > CHUNK:  # no newline for a long while: flush what there is
            lines.append(self._partial)
            self._partial = b""
        if lines:
            self.last = lines[-1]
            self._write(lines)

    def close(self) -> None:
        if self._partial:
            self.last = self._partial
            self._write([self._partial])
            self._partial = b""
        if self._file is not None:
            try:
                self._file.close()
            except OSError as exc:
                self._fail(exc)
            self._file = None

    def _write(self, lines: list[bytes]) -> None:
        if self.done:
            return
        marker = None
        if self.max_bytes is not None:
            room = self.max_bytes - self.written
            kept: list[bytes] = []
            for line in lines:
                if len(line) + 1 > room:
                    marker = truncation_marker(self.max_bytes)
                    break
                kept.append(line)
                room -= len(line) + 1
            lines = kept
        stamp = f"{time.time():.6f}\t"
        text = "".join(f"{stamp}{line.decode('utf-8', 'replace')}\n" for line in lines)
        if marker is not None:
            text += f"{stamp}{marker}\n"
        try:
            if self._file is None:
                self._file = self.open_log()
            self._file.write(text)
            self._file.flush()  # a chunk at a time: readers of a running job's log see it now
        except OSError as exc:
            self._fail(exc)
            return
        self.written += sum(len(line) + 1 for line in lines)
        if marker is not None:
            self.done = True

    def _fail(self, exc: OSError) -> None:
        """The log cannot be written: say so in it if at all possible, and discard the rest."""
        self.done = True
        log.warning("job output discarded: cannot write its log (%s)", exc)
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None
        with contextlib.suppress(OSError):
            fh = self.open_log()
            try:
                fh.write(f"{time.time():.6f}\t{write_failed_marker(exc)}\n")
            finally:
                fh.close()


def pump_output(
    fd: int,
    open_log: LogOpener,
    max_bytes: int | None = None,
    exited: int | None = None,
    on_exit: Callable[[], object] | None = None,
    grace: float = 0.05,
) -> str:
    """Copy the job's output from ``fd`` to its log until EOF, or until ``grace`` seconds after
    the pidfd ``exited`` is readable (then ``on_exit`` runs and the pipe is drained). Returns
    the last line."""
    sink = LogSink(open_log, max_bytes)
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    if exited is not None:
        poller.register(exited, select.POLLIN)
    deadline = None  # once the main process has exited
    try:
        while True:
            if deadline is None:
                events = dict(poller.poll())
            else:
                left = deadline - time.monotonic()
                events = dict(poller.poll(max(0, int(left * 1000)))) if left > 0 else {}
            if fd in events:
                data = os.read(fd, CHUNK)
                if not data:
                    break
                sink.feed(data)
                continue
            if deadline is None and exited is not None and exited in events:
                # The rest of the sandbox usually closes the pipe a moment later; what does
                # not within ``grace`` is left behind, and is killed.
                poller.unregister(exited)
                deadline = time.monotonic() + grace
                continue
            if deadline is not None:
                if on_exit is not None:
                    on_exit()
                os.set_blocking(fd, False)
                with contextlib.suppress(BlockingIOError):
                    while data := os.read(fd, CHUNK):
                        sink.feed(data)
                break
    finally:
        sink.close()
    return sink.last.decode("utf-8", "replace").strip()
