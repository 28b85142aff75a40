"""Ships the logs of the attempts an agent runs to the server, as they grow.

Its own thread: a slow upload never holds up the executor's exchanges. Each attempt's local log
(written by the runtime, one timestamped line per output line) is read from the byte offset the
server has, whole lines only, and POSTed at least every ``INTERVAL`` seconds while it grows;
the server writes each chunk at its offset (idempotent), so ``GET …/logs`` and ``htc logs -f``
show the lines within a second. An attempt that ended is shipped to its end, then forgotten.
A chunk the server did not take (503, 507: its disk failed) is sent again from the same offset;
the attempts the server refuses (409: no longer this agent's) are forgotten.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from openhtc.agent.transport import HttpTransport
from openhtc.domain.models import JobLaunch
from openhtc.services.logs import LogStore, whole_lines

log = logging.getLogger("openhtc.agent")
INTERVAL = 0.3
MAX_CHUNK = 256 * 1024
# A worker flushing an ended attempt's log never waits long for the server: it waits this long
# for the shipper's lock (the shipping thread may be in a POST), sends with this timeout, and
# after a failure leaves the logs to the shipping thread for FLUSH_BACKOFF seconds.
FLUSH_LOCK_SECONDS = 0.2
FLUSH_TIMEOUT = 2.0
FLUSH_BACKOFF = 5.0


@dataclass(slots=True)
class _Tail:
    path: str
    offset: int = 0
    seen: bool = False  # among the executor's held attempts once
    looked: bool = False  # shipped once: not held at two ships in a row, it has ended
    ended: bool = False


class LogShipper:
    def __init__(
        self, transport: HttpTransport, logs: LogStore, held: Callable[[], list[tuple[int, int]]]
    ) -> None:
        self.transport = transport
        self.logs = logs
        self.held = held  # the attempts the executor holds: one seen there that left it has ended
        self._tails: dict[tuple[int, int], _Tail] = {}
        self._lock = threading.Lock()  # the shipping thread, and workers flushing an ended attempt
        self._flush_after = 0.0  # monotonic: flushes leave the logs to the shipping thread until then
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="agent-logs", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.ship()  # the last lines of what ended

    def _run(self) -> None:
        while not self._stop.wait(INTERVAL):
            try:
                self.ship()
            except Exception:
                log.exception("agent: log shipping failed")

    def flush(self, launch: JobLaunch) -> None:
        """Ship what an attempt that just ended wrote and the server does not have, now: its end
        is reported next, and a reader that sees the end (``htc logs -f``) then has every line.
        Never raises, and never waits long (the shipping thread sends what is left): a worker
        that waited on a hanging server would hold up the next job, and the next worker too."""
        key = (launch.job_id, launch.attempt)
        if time.monotonic() < self._flush_after:
            return  # the server failed a moment ago
        try:
            tail = self._tails.get(key)
            offset = tail.offset if tail is not None else 0
            parent = launch.job_uuid.rpartition(":")[0]
            path = (
                tail.path
                if tail is not None
                else str(self.logs.path(launch.task_id, parent, launch.array_index, launch.attempt))
            )
            try:
                if os.stat(path).st_size <= offset:
                    return  # nothing new: no lock taken (the shipping thread may be sending)
            except FileNotFoundError:
                return  # a silent job
            if not self._lock.acquire(timeout=FLUSH_LOCK_SECONDS):
                return  # the shipping thread is sending (perhaps to a server that hangs)
            try:
                if key not in self._tails and key not in self.transport.launched:
                    return  # not a lease of this run (the shipping thread knows it, if anyone)
                tail = self._tail(key, launch)
                data = whole_lines(tail.path, tail.offset, MAX_CHUNK)
                if not data:
                    return
                chunk = {"job_id": key[0], "attempt": key[1], "offset": tail.offset,
                         "data": data.decode("utf-8", "replace")}  # fmt: skip
                acked = self.transport.send_logs([chunk], timeout=FLUSH_TIMEOUT)
                if acked is None and not self.transport.refused_logs:  # not taken: back off
                    self._flush_after = time.monotonic() + FLUSH_BACKOFF
                self._acked(acked)
            finally:
                self._lock.release()
        except Exception:
            log.exception("agent: shipping the log of job %s failed", launch.job_uuid)

    def _tail(self, key: tuple[int, int], launch: JobLaunch) -> _Tail:
        tail = self._tails.get(key)
        if tail is None:
            parent = launch.job_uuid.rpartition(":")[0]
            path = self.logs.path(launch.task_id, parent, launch.array_index, launch.attempt)
            tail = self._tails[key] = _Tail(str(path))
        return tail

    def _acked(self, acked: list[tuple[int, int, int]] | None) -> None:
        refused, self.transport.refused_logs = self.transport.refused_logs, set()
        for key in refused:  # not this agent's attempt any more: its lines go nowhere
            self._tails.pop(key, None)
            self.transport.launched.pop(key, None)
        for job_id, attempt, next_offset in acked or ():
            shipped = self._tails.get((job_id, attempt))
            if shipped is not None:
                shipped.offset = next_offset

    def ship(self) -> None:
        with self._lock:
            self._ship()

    def _ship(self) -> None:
        held = set(self.held())
        for key, launch in list(self.transport.launched.items()):
            self._tail(key, launch)
        chunks = []
        for key, tail in list(self._tails.items()):
            # read before deciding it ended: its last lines were written before it left
            # A short job can start and end between two ships, never seen held: not held at
            # two ships in a row it has ended too (at the first it may only just be claimed).
            # Otherwise it would be kept, and its log read at every ship, for ever.
            tail.seen = tail.seen or key in held
            ended = (tail.seen or tail.looked) and key not in held
            tail.looked = True
            data = whole_lines(tail.path, tail.offset, MAX_CHUNK)
            if data:
                chunks.append({"job_id": key[0], "attempt": key[1], "offset": tail.offset,
                               "data": data.decode("utf-8", "replace")})  # fmt: skip
            elif tail.ended:  # ended, and shipped to its end
                del self._tails[key]
                self.transport.launched.pop(key, None)
            tail.ended = ended
        if not chunks:
            return
        self._acked(self.transport.send_logs(chunks))
