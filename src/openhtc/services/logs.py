"""Job logs: one file per job attempt, one timestamped line per output line.

Files, not database rows: logs are append-only, read rarely, and can be large.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from openhtc.runtimes.base import JobLog


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

    def lines(self, task_id: str, parent_job_id: str, index: int, attempts: int) -> list[tuple[float, str]]:
        """Every captured line of every attempt, oldest first."""
        out: list[tuple[float, str]] = []
        for attempt in range(1, attempts + 1):
            out.extend(self._read(self.path(task_id, parent_job_id, index, attempt)))
        return out

    @staticmethod
    def _read(path: Path) -> Iterator[tuple[float, str]]:
        try:
            with open(path, encoding="utf-8", errors="replace") as fh:
                for raw in fh:
                    stamp, _, message = raw.rstrip("\n").partition("\t")
                    try:
                        yield float(stamp), message
                    except ValueError:
                        continue
        except FileNotFoundError:
            return
