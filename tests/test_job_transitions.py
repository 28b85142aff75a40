"""How a batch of job state changes is written (store/transitions.py), on SQLite and PostgreSQL.

Many jobs' changes reach the database in one statement per kind (job rows, events, counters);
these tests check that nothing a client reads is lost on the way: each job's event order, exact
timestamps, arbitrary reason text, and that a compare-and-set write which finds a row changed
under it refuses as a whole.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from openhtc.auth.tokens import Principal
from openhtc.config import Settings
from openhtc.domain.enums import JobStatus
from openhtc.domain.models import AttemptReport, Capacity, JobLaunch
from openhtc.runtime import bootstrap, build_services
from openhtc.services.container import Services
from openhtc.services.executors import ExecutorService
from openhtc.services.submission import submit
from openhtc.store.transitions import Batch, StoreConsistencyError

S = JobStatus
EXECUTOR = "ex-1"


class Queue:
    """A task with jobs submitted, and an executor that claims and reports them by hand."""

    def __init__(self, services: Services) -> None:
        self.services = services
        bootstrap(services)
        ws = services.accounts.workspaces()[0]
        region = services.settings.region
        self.project = services.projects.create(ws.id, "p", "", [region], None, "test", 1.0)
        self.task = services.projects.create_task(self.project, "t", "", "test", 1.0)
        self.who = Principal("test", ws.id, "WORKSPACE_ADMIN")
        self.executor = ExecutorService(services)
        self.executor.register(EXECUTOR, "inc-1", region, ["X86"], Capacity(64, 1 << 20))

    def submit_and_claim(self, n: int) -> list[JobLaunch]:
        body = [
            {"batchSize": n, "htcJobDefinition": {"imageName": "bb", "commands": ["true"], "maxMemory": 64}}
        ]
        submit(self.services, self.who, self.project, self.task, body, None)
        region = self.services.settings.region
        claimed = self.executor.claim(EXECUTOR, region, ["X86"], Capacity(64, 1 << 20), n)
        assert len(claimed) == n
        return claimed

    def sql(self, statement: str, *params: Any) -> list[tuple[Any, ...]]:
        db = self.services.db
        with db.read() as conn:
            return [tuple(row) for row in conn.exec_driver_sql(db.sql(statement), params).all()]

    def counters(self) -> dict[int, int]:
        rows = self.sql("SELECT status, count FROM job_counters WHERE task_id = ?", self.task.id)
        return {status: count for status, count in rows if count}


@pytest.fixture
def queue(tmp_path: Path, db_url: str | None) -> Iterator[Queue]:
    settings = Settings(data_dir=tmp_path / "data", database_url=db_url, executor=False, runtime="noop")
    services = build_services(settings)
    try:
        yield Queue(services)
    finally:
        services.db.dispose()


def test_reports_written_together_keep_each_jobs_history_and_exact_values(queue: Queue) -> None:
    claimed = queue.submit_and_claim(6)
    at = 1_796_000_000.123456  # microseconds must survive the trip through the database
    reason = 'exit 3: "quoted", back\\slash, ünïcode ✓, newline\nand tab\t'
    reports = []
    for i, job in enumerate(claimed):
        reports += [
            AttemptReport(job.job_id, job.attempt, S.STARTING, at + i),
            AttemptReport(job.job_id, job.attempt, S.RUNNING, at + i + 0.5),
        ]
        if i % 2:
            reports.append(
                AttemptReport(job.job_id, job.attempt, S.FAILED, at + i + 0.75, 3, "ErrorExitCode", reason)
            )
        else:
            reports.append(AttemptReport(job.job_id, job.attempt, S.SUCCEEDED, at + i + 0.75, 0))
    queue.executor.report(EXECUTOR, reports)

    for i, job in enumerate(claimed):
        events = queue.sql("SELECT status, at FROM job_events WHERE job_id = ? ORDER BY id", job.job_id)
        final = S.FAILED if i % 2 else S.SUCCEEDED
        assert events == [
            (S.RUNNABLE, pytest.approx(events[0][1])),
            (S.STARTING, at + i),
            (S.RUNNING, at + i + 0.5),
            (final, at + i + 0.75),
        ]
        row = queue.sql(
            "SELECT status, exit_code, failure_code, status_reason, started_at, completed_at, executor_id"
            " FROM jobs WHERE id = ?",
            job.job_id,
        )[0]
        if i % 2:
            assert row == (S.FAILED, 3, "ErrorExitCode", reason, at + i + 0.5, at + i + 0.75, EXECUTOR)
        else:
            assert row == (S.SUCCEEDED, 0, None, None, at + i + 0.5, at + i + 0.75, EXECUTOR)
    assert queue.counters() == {S.SUCCEEDED: 3, S.FAILED: 3}


def test_a_write_that_finds_a_row_changed_under_it_refuses_and_changes_nothing(queue: Queue) -> None:
    claimed = queue.submit_and_claim(3)
    db = queue.services.db
    before = queue.sql("SELECT id, status, attempt, updated_at FROM jobs ORDER BY id")
    events_before = queue.sql("SELECT COUNT(*) FROM job_events")
    with pytest.raises(StoreConsistencyError, match="1 job rows changed under us"), db.write() as conn:
        batch = Batch(db, conn, 2.0, EXECUTOR)
        jobs = batch.load_ids([job.job_id for job in claimed])
        # another writer moves one job on after this batch loaded it
        conn.exec_driver_sql(
            db.sql("UPDATE jobs SET attempt = attempt + 1 WHERE id = ?"), (claimed[1].job_id,)
        )
        for job in jobs:
            batch.move(job, S.STARTING, 2.0)
        batch.flush()
    assert queue.sql("SELECT id, status, attempt, updated_at FROM jobs ORDER BY id") == before
    assert queue.sql("SELECT COUNT(*) FROM job_events") == events_before
    assert queue.counters() == {S.RUNNABLE: 3}
