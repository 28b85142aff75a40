"""Job logs that every server reads: ``log_store = "database"``.

With several servers on one PostgreSQL, each on its own data directory, a log written to files
lives on the server that received the agent's chunks, and an agent that alternates servers
splits one log over two. Here the chunks agents ship go to the database instead (table
``log_chunks``, one multi-row insert per call), and every server reads them: the same page of
lines, from the same ``(attempt, byte offset)`` cursor, whichever server is asked. A reader
following a log is woken through the notifier (across servers: the cluster notifier).

An attempt the database holds nothing of is read from this server's files, as before: the logs
of the jobs its embedded executor runs, which write files directly.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

from openhtc.services.logs import LogLine, LogStore, _parse
from openhtc.store.log_chunks import AttemptKey, LogChunkStore

BATCH = 64  # chunks read per query


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
            rows.append((attempt, end, piece))
            ends[attempt] = end + len(piece)
        if self.chunks.insert(rows) < len(rows):  # another server wrote meanwhile: its ends rule
            ends = self.chunks.ends(attempts)
        return ends

    def delete_task(self, task_id: str) -> int:
        return self.chunks.delete_task(task_id)

    def _forward_in(self, job: tuple[str, str, int], number: int, position: int) -> Iterator[LogLine]:
        found = False
        while True:
            batch = self.chunks.forward(job, number, position, BATCH)
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
            if len(batch) < BATCH:
                break
        if not found:
            yield from super()._forward_in(job, number, position)

    def _backward_in(self, job: tuple[str, str, int], number: int, end: int) -> Iterator[LogLine]:
        found = False
        limit: int | None = None if end < 0 else end
        while True:
            batch = self.chunks.backward(job, number, limit, BATCH)
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
            if len(batch) < BATCH:
                break
        if not found:
            yield from super()._backward_in(job, number, end)
