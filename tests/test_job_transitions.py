"""How a batch of job state changes is written (store/transitions.py), on SQLite and PostgreSQL.

Many jobs' changes reach the database in one statement per kind (job rows, events, counters);
these tests check that nothing a client reads is lost on the way: each job's event order, exact
timestamps, arbitrary reason text, and that a compare-and-set write which finds a row changed
under it refuses as a whole.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from openhtc.domain.enums import JobStatus
from openhtc.domain.models import AttemptReport, Capacity, JobLaunch
from openhtc.services.service_set import ServiceSet
from openhtc.store.transitions import Batch, StoreConsistencyError
from openhtc.testing.inprocess import EXECUTOR, StoreHarness, in_process_services

S = JobStatus


class Queue(StoreHarness):
    """A task with jobs submitted, and an executor that claims and reports them by hand."""

    def __init__(self, services: ServiceSet) -> None:
        super().__init__(services)
        self.project = self.create_project("p")
        self.task = self.create_task(self.project)

    def submit_and_claim(self, n: int) -> list[JobLaunch]:
        body = {
            "batchSize": n,
            "htcJobDefinition": {"imageName": "bb", "commands": ["true"], "maxMemory": 64},
        }
        self.submit(self.project, self.task, body)
        claimed = self.claim(n)
        assert len(claimed) == n
        return claimed

    def counters(self, task_id: str | None = None) -> dict[int, int]:
        return super().counters(task_id or self.task.id)


@pytest.fixture
def queue(tmp_path: Path, db_url: str | None) -> Iterator[Queue]:
    with in_process_services(tmp_path / "data", db_url) as services:
        yield Queue(services)


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


def test_a_restarted_executor_requeues_free_only_attempts_it_never_handed_to_a_runtime(queue: Queue) -> None:
    """Recovery at registration (issue 13 item 2): the executor names the attempts it may have
    started (its journal); those fail, whatever their status says; the rest are re-queued free."""
    jobs = queue.submit_and_claim(5)
    reports = [AttemptReport(j.job_id, j.attempt, S.STARTING, 1.0) for j in jobs[:4]]
    reports.append(AttemptReport(jobs[3].job_id, jobs[3].attempt, S.RUNNING, 1.5))
    queue.executor.report(EXECUTOR, reports)
    marked = {(jobs[1].job_id, jobs[1].attempt), (jobs[2].job_id, jobs[2].attempt)}
    marked.add((jobs[0].job_id, jobs[0].attempt + 1))  # another attempt's marker says nothing
    region = queue.services.settings.region
    recovered = queue.executor.register(EXECUTOR, "inc-2", region, ["X86"], Capacity(64, 1 << 20), marked)
    assert recovered == 5
    rows = {
        row[0]: row[1:]
        for row in queue.sql(
            "SELECT id, status, attempt, failed_attempts, failure_code, status_reason FROM jobs"
        )
    }
    requeued_reason = "Re-queued: the executor restarted before the job started"
    fault = "ErrorInfrastructureFault"
    # STARTING, never handed over: a free new attempt
    assert rows[jobs[0].job_id] == (S.SUBMITTED_TO_RESCALE, 2, 0, None, requeued_reason)
    # STARTING or RUNNABLE in the database, but handed over: its RUNNING report may be what was lost
    for job in jobs[1:3]:
        status, attempt, failed, code, reason = rows[job.job_id]
        assert (status, attempt, failed, code) == (S.FAILED, 1, 1, fault)
        assert "may have started" in reason
    assert rows[jobs[3].job_id][:4] == (S.FAILED, 1, 1, fault)  # RUNNING: it ran
    assert rows[jobs[4].job_id] == (S.SUBMITTED_TO_RESCALE, 2, 0, None, requeued_reason)  # RUNNABLE
    assert queue.counters() == {S.SUBMITTED_TO_RESCALE: 2, S.FAILED: 3}


def test_lease_expiry_fails_every_attempt_it_cannot_vouch_for(queue: Queue) -> None:
    """A lost executor cannot say what it started: its held jobs fail their attempt."""
    jobs = queue.submit_and_claim(3)
    queue.executor.report(EXECUTOR, [AttemptReport(jobs[0].job_id, jobs[0].attempt, S.STARTING, 1.0)])
    far_future = queue.services.clock.now() + 10 * queue.services.settings.lease_seconds
    assert queue.services.queue.expire_leases(far_future) == 3
    rows = queue.sql("SELECT status, failure_code, failed_attempts FROM jobs")
    assert rows == [(S.FAILED, "ErrorInfrastructureFault", 1)] * 3
    assert queue.counters() == {S.FAILED: 3}
