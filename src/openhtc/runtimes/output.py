"""A container job's output copied to its log (the bwrap and podman runtimes), by the rules
every runtime shares (``joblog.py``: timestamped lines, the byte cap, soft failure).

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

from openhtc.runtimes.base import LogOpener
from openhtc.runtimes.joblog import CHUNK, LogWriter

log = logging.getLogger("openhtc.runtimes.output")


class LogSink(LogWriter):
    """A LogWriter that also says in the server's log when a job's log cannot be written."""

    __slots__ = ()

    def _fail(self, exc: OSError) -> None:
        log.warning("job output discarded: cannot write its log (%s)", exc)
        super()._fail(exc)


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
