"""Job logs: one file per job attempt, one timestamped line per output line.

Files, not database rows: logs are append-only, read rarely, and can be large.

A page is read from a position, ``(attempt, byte offset)``, with a seek: oldest first it reads
forward from there, newest first backward in chunks, so a request costs O(page), whatever the
file's size. Only whole lines (ending in a newline) are returned: the line a running job is
still writing shows up once it is complete.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, NamedTuple

from openhtc.runtimes.base import JobLog

CHUNK = 64 * 1024  # bytes read per step when reading backward


class LogLine(NamedTuple):
    timestamp: float
    message: str
    after: tuple[int, int]  # where the next line (in the page's order) is read from


class LogStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, task_id: str, parent_job_id: str, index: int, attempt: int) -> Path:
        return self.root / task_id / parent_job_id / f"{index}.{attempt}.log"

    def attempt_log(self, task_id: str, parent_job_id: str, index: int, attempt: int) -> JobLog:
        """Where a runtime writes an attempt's output (the file appears at the first line).

        A string, not a Path: made for every job on the executor's hot path, where pathlib's
        joins cost more than the rest of it."""
        return JobLog(f"{self.root}/{task_id}/{parent_job_id}/{index}.{attempt}.log")

    def page(
        self,
        job: tuple[str, str, int],
        attempts: int,
        count: int,
        newest_first: bool,
        start: tuple[int, int] | None = None,
    ) -> list[LogLine]:
        """Up to ``count`` lines of the attempts 1..``attempts`` of ``job`` (task id, parent job
        id, index) in reading order (attempt 1 first) or its reverse, from ``start`` (a previous
        line's ``after``; None: the beginning, or the end when ``newest_first``)."""
        out: list[LogLine] = []
        lines = self._backward(job, attempts, start) if newest_first else self._forward(job, attempts, start)
        for line in lines:
            out.append(line)
            if len(out) == count:
                break
        return out

    def _forward(
        self, job: tuple[str, str, int], attempts: int, start: tuple[int, int] | None
    ) -> Iterator[LogLine]:
        attempt, offset = start or (1, 0)
        for number in range(attempt, attempts + 1):
            yield from self._forward_in(job, number, offset if number == attempt else 0)

    def _forward_in(self, job: tuple[str, str, int], number: int, position: int) -> Iterator[LogLine]:
        """The lines of one attempt from ``position`` (a line start) on."""
        try:
            fh = open(self.path(*job, number), "rb")  # noqa: SIM115 - closed below
        except FileNotFoundError:
            return
        with fh:
            fh.seek(position)
            for raw in fh:
                if not raw.endswith(b"\n"):
                    break  # the line being written
                position += len(raw)
                parsed = _parse(raw[:-1])
                if parsed is not None:
                    yield LogLine(*parsed, (number, position))

    def _backward(
        self, job: tuple[str, str, int], attempts: int, start: tuple[int, int] | None
    ) -> Iterator[LogLine]:
        attempt, end = start or (attempts, -1)
        for number in range(min(attempt, attempts), 0, -1):
            yield from self._backward_in(job, number, end if number == attempt else -1)

    def _backward_in(self, job: tuple[str, str, int], number: int, end: int) -> Iterator[LogLine]:
        """The lines of one attempt that start before ``end`` (-1: all), last first."""
        try:
            fh = open(self.path(*job, number), "rb")  # noqa: SIM115 - closed below
        except FileNotFoundError:
            return
        with fh:
            size = os.fstat(fh.fileno()).st_size
            limit = size if end < 0 else min(end, size)
            for offset, raw in _lines_before(fh, limit):
                parsed = _parse(raw)
                if parsed is not None:
                    yield LogLine(*parsed, (number, offset))


def _lines_before(fh: BinaryIO, end: int) -> Iterator[tuple[int, bytes]]:
    """The whole lines that end before ``end`` (a line start, or the file's size), last first,
    with their start offsets; what follows the last newline before ``end`` is left out."""
    pos = end
    carry = b""  # the start of a line whose beginning lies before ``pos``
    tail_dropped = False  # the text after the last newline before ``end`` (b"" at a line start)
    while pos > 0:
        step = min(CHUNK, pos)
        pos -= step
        fh.seek(pos)
        parts = (fh.read(step) + carry).split(b"\n")
        if not tail_dropped:
            if len(parts) == 1:
                carry = b""
                continue
            parts.pop()
            tail_dropped = True
        carry = parts[0]
        starts = []
        offset = pos + len(carry) + 1
        for part in parts[1:]:
            starts.append(offset)
            offset += len(part) + 1
        for i in range(len(parts) - 1, 0, -1):
            yield starts[i - 1], parts[i]
    if tail_dropped:
        yield 0, carry


def _parse(raw: bytes) -> tuple[float, str] | None:
    stamp, _, message = raw.partition(b"\t")
    try:
        return float(stamp), message.decode("utf-8", "replace")
    except ValueError:
        return None


def whole_lines(path: str, offset: int, limit: int) -> bytes:
    """The whole lines of the log at ``path`` from byte ``offset``, at most ``limit`` bytes (a
    line still being written waits for its newline; no file yet: nothing)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            data = fh.read(limit)
    except FileNotFoundError:
        return b""
    cut = data.rfind(b"\n")
    return data[: cut + 1] if cut >= 0 else b""
