"""``log_store = database`` on both databases: chunks written at their offsets (idempotent, no
gaps, one racing writer kept), read back exactly as the files are read (the same lines, the same
[attempt, byte offset] cursors, both orders), a file-only attempt still read from its file, and
a deleted task's chunks gone. The whole path through two servers: tests/cluster/test_logs_across_servers.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from openhtc.config import Settings
from openhtc.domain.models import JobLaunch, Mount
from openhtc.runtimes.base import LogOpener
from openhtc.services.logs import LogStore
from openhtc.services.service_set import ServiceSet
from openhtc.services.shared_logs import MAX_CHUNK, DatabaseLogs, LogMirror, MirroringStager
from openhtc.store.log_chunks import Chunk, LogChunkStore, LogKey
from openhtc.wiring import bootstrap, build_services

JOB = ("task-1", "parent-1", 3)


@pytest.fixture
def services(tmp_path: Path, db_url: str | None) -> Iterator[ServiceSet]:
    settings = Settings(
        data_dir=tmp_path / "data", database_url=db_url, executor=False, runtime="noop", log_store="database"
    )
    services = build_services(settings)
    try:
        bootstrap(services)
        yield services
    finally:
        services.db.dispose()


def lines(start: int, count: int) -> bytes:
    return b"".join(f"{1000 + i}.5\tline {i} ✓\r tab\tin it\n".encode() for i in range(start, start + count))


def test_chunks_read_back_as_files_read(services: ServiceSet, tmp_path: Path) -> None:
    logs = services.logs
    assert isinstance(logs, DatabaseLogs)
    one, two = (*JOB, 1), (*JOB, 2)
    first, rest = lines(0, 30), lines(30, 20)
    assert logs.append([(one, 0, first)]) == {one: len(first)}
    assert logs.append([(one, 0, first)]) == {one: len(first)}  # the same chunk again: nothing new
    gap = len(first) + 10
    assert logs.append([(one, gap, rest)]) == {one: len(first)}  # past the end: resend from there
    overlap = first[-len(lines(29, 1)) :] + rest  # overlaps what is there: only the new part is kept
    assert logs.append([(one, len(first) - len(lines(29, 1)), overlap), (two, 0, lines(0, 5))]) == {
        one: len(first) + len(rest),
        two: len(lines(0, 5)),
    }

    # the same log as files: every page, both orders, every cursor the same
    files = LogStore(tmp_path / "files")
    for number, data in ((1, first + rest), (2, lines(0, 5))):
        path = files.path(*JOB, number)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    for newest_first in (False, True):
        for size in (1, 7, 64, 200):
            pages_db, pages_files = [], []
            for store, pages in ((logs, pages_db), (files, pages_files)):
                start = None
                while page := store.page(JOB, 2, size, newest_first, start):
                    pages.append(page)
                    start = page[-1].after
            assert pages_db == pages_files, (newest_first, size)
            assert sum(len(p) for p in pages_db) == 55
    assert logs.page(JOB, 2, 3, False)[0].message == "line 0 \u2713\r tab\tin it"

    # an attempt the database has nothing of is read from this server's files
    local = logs.path("task-2", "parent-2", 0, 1)
    local.parent.mkdir(parents=True)
    local.write_bytes(lines(0, 3))
    assert [line.message for line in logs.page(("task-2", "parent-2", 0), 1, 10, True)] == [
        "line 2 \u2713\r tab\tin it",
        "line 1 \u2713\r tab\tin it",
        "line 0 \u2713\r tab\tin it",
    ]

    assert logs.delete_task("task-1") == 3
    assert logs.page(JOB, 2, 10, False) == []


class _Failing:
    """A stager whose staging fails (the store unreachable, a disk full)."""

    def prepare(self, launch: JobLaunch) -> tuple[Mount, ...]:
        raise OSError("no space left on device")

    def finish(self, launch: JobLaunch, stopped: bool, open_log: LogOpener) -> None:
        raise AssertionError("an attempt never staged is never finished")


def test_an_attempt_whose_staging_failed_is_not_mirrored(services: ServiceSet) -> None:
    """An attempt whose staging raised never runs and is never finished: the mirror keeps
    nothing of it (before: one entry per such job, forever, its file opened every 0.3 s)."""
    assert isinstance(services.logs, DatabaseLogs)
    mirror = LogMirror(services.logs, services.notify)
    stager = MirroringStager(_Failing(), mirror)
    for job_id in range(1, 21):
        launch = JobLaunch(job_id, 1, f"parent-1:{job_id}", 1, job_id, "p", "task-1", "AWS_US_EAST_1",
                           "img", (), (), 1, 512, 1, None, None)  # fmt: skip
        with pytest.raises(OSError):
            stager.prepare(launch)
    assert mirror._watched == {}


def test_a_page_reads_a_few_chunks_not_the_whole_log(services: ServiceSet, tmp_path: Path) -> None:
    """A chunk longer than MAX_CHUNK (agents may send more) is stored split at its lines, and a
    page reads a chunk or two, not the whole log (before: up to 64 chunks of any size per query),
    with the same pages as the file reader."""
    logs = services.logs
    assert isinstance(logs, DatabaseLogs)
    job, big = ("task-9", "parent-9", 0), lines(0, 100_000)  # ~4 MiB in one chunk
    assert len(big) > 12 * MAX_CHUNK
    assert logs.append([((*job, 1), 0, big)]) == {(*job, 1): len(big)}
    stored = logs.chunks.forward(job, 1, 0, 1000)
    assert b"".join(d for _, d in stored) == big
    assert all(len(d) <= MAX_CHUNK and d.endswith(b"\n") for _, d in stored)

    read: list[int] = []

    class Counting(LogChunkStore):
        def forward(self, key: LogKey, attempt: int, position: int, limit: int) -> list[Chunk]:
            found = super().forward(key, attempt, position, limit)
            read.extend(len(d) for _, d in found)
            return found

        def backward(self, key: LogKey, attempt: int, end: int | None, limit: int) -> list[Chunk]:
            found = super().backward(key, attempt, end, limit)
            read.extend(len(d) for _, d in found)
            return found

    logs.chunks = Counting(services.db)
    for newest_first in (False, True):
        read.clear()
        assert len(logs.page(job, 1, 100, newest_first)) == 100
        assert sum(read) <= MAX_CHUNK, newest_first

    files = LogStore(tmp_path / "files")
    path = files.path(*job, 1)
    path.parent.mkdir(parents=True)
    path.write_bytes(big)
    for newest_first in (False, True):
        pages_db, pages_files = [], []
        for store, pages in ((logs, pages_db), (files, pages_files)):
            start = None
            while page := store.page(job, 1, 7001, newest_first, start):
                pages.append(page)
                start = page[-1].after
        assert pages_db == pages_files, newest_first
