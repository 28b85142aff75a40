"""A job's output written to its log: the rules every runtime shares.

Standard library only: the process runtime's job launcher (``launcher_loop.py``, run as
``python -I -S``, without openhtc on its path) loads this file from beside itself; the bwrap and
podman runtimes use it through ``output.py``.

Each line goes to the log as ``"{unix time}\\t{line}"`` (what :mod:`openhtc.services.logs`
reads); the file is created at the first line, so a silent job writes none. Past ``max_bytes``
of output the rest is discarded after one marker line; the job runs on. A log that cannot be
written (a full disk: ENOSPC) ends the copying the same way, marker attempted: the job's output
is lost, never the job or another job.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from typing import TextIO

CHUNK = 1 << 16  # a line longer than this without a newline is written as it is


def truncation_marker(max_bytes: int) -> str:
    return f"[openhtc] output truncated: the job wrote more than {max_bytes} bytes; the rest is discarded"


def write_failed_marker(exc: OSError) -> str:
    return f"[openhtc] output truncated: the log could not be written ({exc.strerror or exc})"


def append_to(path: str) -> TextIO:
    """Open a job's log for appending, creating its directory."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return open(path, "a", encoding="utf-8", errors="replace")


class LogWriter:
    """The job's side of its log: timestamped lines, a byte cap, soft failure on write errors."""

    __slots__ = ("_file", "_partial", "done", "last", "max_bytes", "open_log", "written")

    def __init__(self, open_log: Callable[[], TextIO], max_bytes: int | None = None) -> None:
        self.open_log = open_log
        self.max_bytes = max_bytes  # None: no cap
        self.written = 0
        self.done = False  # capped or failed: discard the rest
        self.last = b""  # the last line seen (a runtime's own error message, if it failed)
        self._partial = b""
        self._file: TextIO | None = None

    def feed(self, data: bytes) -> None:
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        if len(self._partial) > CHUNK:  # no newline for a long while: write what there is
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
        size = sum(len(line) + 1 for line in lines)
        if self.max_bytes is not None and self.written + size > self.max_bytes:
            room, kept = self.max_bytes - self.written, []
            for line in lines:
                if len(line) + 1 > room:
                    break
                kept.append(line)
                room -= len(line) + 1
            lines, size = kept, self.max_bytes - self.written - room
            marker = truncation_marker(self.max_bytes)
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
        self.written += size
        if marker is not None:
            self.done = True

    def _fail(self, exc: OSError) -> None:
        """The log cannot be written: say so in it if at all possible, and discard the rest."""
        self.done = True
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
