"""Job logs that every server reads: ``log_store = "database"``.

With several servers on one PostgreSQL, each on its own data directory, a log written to files
lives on the server that received the agent's chunks, and an agent that alternates servers
splits one log over two. Here the chunks agents ship go to the database instead (table
``log_chunks``, one multi-row insert per call), and every server reads them: the same page of
lines, from the same ``(attempt, byte offset)`` cursor, whichever server is asked. A reader
following a log is woken through the notifier (across servers: the cluster notifier).

The embedded executor's runtimes write files; ``LogMirror`` copies them into the database as an
agent ships its logs (every 0.3 s while a job runs, and to the end before the end is reported).
An attempt the database holds nothing of is read from this server's files, as before.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from openhtc.domain.models import JobLaunch, Mount
from openhtc.runtimes.base import LogOpener
from openhtc.services.logs import LogLine, LogStore, _parse, whole_lines
from openhtc.services.notify import Notifier, job_key
from openhtc.storage.staging import Stager
from openhtc.store.log_chunks import AttemptKey, LogChunkStore

log = logging.getLogger("openhtc.logs")

# A page reads a few chunks at a time (most pages need one): 1, 2, then BATCH per query; rows
# hold at most MAX_CHUNK bytes (a longer chunk an agent sends is stored split at its lines), so
# a query reads at most BATCH * MAX_CHUNK bytes.
BATCH = 4
MAX_CHUNK = 256 * 1024


class DatabaseLogs(LogStore):
    def __init__(self, root: Path, chunks: LogChunkStore) -> None:
        super().__init__(root)
        self.chunks = chunks

    def append(self, chunks: Sequence[tuple[AttemptKey, int, bytes]]) -> dict[AttemptKey, int]:
        """Add (attempt, offset, data) chunks at the end of their attempts' logs; idempotent
        by offset. Returns each attempt's end: where its writer goes on from (a chunk past the
        end, a gap, is not written: the writer resends from the end)."""
        attempts = list(dict.fromkeys(a for a, _, _ in chunks))
        ends = self.chunks.ends(attempts)
        rows: list[tuple[AttemptKey, int, bytes]] = []
        for attempt, offset, data in sorted(chunks, key=lambda c: (c[0], c[1])):
            end = ends[attempt]
            if offset > end or offset + len(data) <= end:
                continue  # a gap, or written already
            piece = data[end - offset :]
            rows.extend((attempt, at, part) for at, part in _split(end, piece))
            ends[attempt] = end + len(piece)
        if self.chunks.insert(rows) < len(rows):  # another server wrote meanwhile: its ends rule
            ends = self.chunks.ends(attempts)
        return ends

    def delete_task(self, task_id: str) -> int:
        return self.chunks.delete_task(task_id)

    def delete_tasks(self, task_ids: Sequence[str]) -> int:
        return self.chunks.delete_tasks(task_ids)

    def _forward_in(self, job: tuple[str, str, int], number: int, position: int) -> Iterator[LogLine]:
        found, size = False, 1
        while True:
            batch = self.chunks.forward(job, number, position, size)
            for offset, data in batch:
                found = True
                cursor = max(offset, position)
                *lines, rest = data[cursor - offset :].split(b"\n")
                for raw in lines:
                    cursor += len(raw) + 1
                    parsed = _parse(raw)
                    if parsed is not None:
                        yield LogLine(*parsed, (number, cursor))
                if rest:
                    return  # not a whole line (a writer's chunk never ends so)
                position = cursor
            if len(batch) < size:
                break
            size = min(2 * size, BATCH)
        if not found:
            yield from super()._forward_in(job, number, position)

    def _backward_in(self, job: tuple[str, str, int], number: int, end: int) -> Iterator[LogLine]:
        found, size = False, 1
        limit: int | None = None if end < 0 else end
        while True:
            batch = self.chunks.backward(job, number, limit, size)
            for offset, data in batch:
                found = True
                if limit is not None:
                    data = data[: limit - offset]
                parts = data.split(b"\n")
                parts.pop()  # after the last newline: nothing, or a line cut by ``end``
                starts, at = [], offset
                for part in parts:
                    starts.append(at)
                    at += len(part) + 1
                for start, raw in zip(reversed(starts), reversed(parts), strict=True):
                    parsed = _parse(raw)
                    if parsed is not None:
                        yield LogLine(*parsed, (number, start))
                limit = offset
            if len(batch) < size:
                break
            size = min(2 * size, BATCH)
        if not found:
            yield from super()._backward_in(job, number, end)


INTERVAL = 0.3  # seconds between two looks at the logs being written (as an agent ships them)


class LogMirror:
    """Copies the logs an embedded executor writes to files into the database, as an agent
    ships its logs (``log_store = database``, several servers each with its executor): every
    ``INTERVAL`` while a job runs, and to its end before its end is reported."""

    def __init__(self, logs: DatabaseLogs, notify: Notifier) -> None:
        self.logs = logs
        self.notify = notify
        self._lock = threading.Lock()
        self._watched: dict[tuple[int, int], _Mirrored] = {}
        self._thread: threading.Thread | None = None

    def watch(self, launch: JobLaunch) -> None:
        key = _log_key(launch)
        with self._lock:
            self._watched[(launch.job_id, launch.attempt)] = _Mirrored(
                launch.job_id, key, str(self.logs.path(*key))
            )
            if self._thread is None:  # a daemon: what it has not copied, the end's flush does
                self._thread = threading.Thread(target=self._run, name="log-mirror", daemon=True)
                self._thread.start()

    def flush(self, launch: JobLaunch) -> None:
        """Copy what an attempt that ended wrote; never raises."""
        with self._lock:
            item = self._watched.pop((launch.job_id, launch.attempt), None)
        try:
            if item is None:  # an attempt taken back after a restart: go on from the database's end
                key = _log_key(launch)
                item = _Mirrored(launch.job_id, key, str(self.logs.path(*key)))
                item.offset = self.logs.chunks.ends([key])[key]
            while self._copy([item]):
                pass
        except Exception:
            log.exception("copying the log of job %s to the database failed", launch.job_uuid)

    def _run(self) -> None:
        while True:
            time.sleep(INTERVAL)
            with self._lock:
                items = list(self._watched.values())
            try:
                self._copy(items)
            except Exception:
                log.exception("copying job logs to the database failed")

    def _copy(self, items: list[_Mirrored]) -> bool:
        """One chunk of each item's new whole lines; whether any was copied."""
        rows, owners = [], {}
        for item in items:
            data = whole_lines(item.path, item.offset, MAX_CHUNK)
            if data:
                rows.append((item.key, item.offset, data))
                owners[item.key] = item
        if not rows:
            return False
        for key, end in self.logs.append(rows).items():
            owners[key].offset = end
        self.notify.publish(job_key(item.job_id) for item in owners.values())
        return True


@dataclass(slots=True)
class _Mirrored:
    job_id: int
    key: AttemptKey
    path: str
    offset: int = 0


class MirroringStager:
    """The embedded executor's stager, telling the mirror which attempts run and when they end."""

    def __init__(self, inner: Stager, mirror: LogMirror) -> None:
        self.inner = inner
        self.mirror = mirror

    def prepare(self, launch: JobLaunch) -> tuple[Mount, ...]:
        mounts = self.inner.prepare(launch)  # raising: never run, never finished: not watched
        self.mirror.watch(launch)
        return mounts

    def finish(self, launch: JobLaunch, stopped: bool, open_log: LogOpener) -> None:
        try:
            self.inner.finish(launch, stopped, open_log)
        finally:
            self.mirror.flush(launch)


def _log_key(launch: JobLaunch) -> AttemptKey:
    return (launch.task_id, launch.job_uuid.rpartition(":")[0], launch.array_index, launch.attempt)


def _split(offset: int, data: bytes) -> Iterator[tuple[int, bytes]]:
    """``data`` (whole lines) at ``offset`` as pieces of at most MAX_CHUNK bytes, each of whole
    lines (a longer line is a piece of its own)."""
    while len(data) > MAX_CHUNK:
        cut = data.rfind(b"\n", 0, MAX_CHUNK)
        if cut < 0:
            cut = data.find(b"\n", MAX_CHUNK)
            if cut < 0 or cut == len(data) - 1:
                break
        yield offset, data[: cut + 1]
        offset, data = offset + cut + 1, data[cut + 1 :]
    yield offset, data
