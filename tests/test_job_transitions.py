"""How a batch of job state changes is written (store/transitions.py), on SQLite and PostgreSQL.

Many jobs' changes reach the database in one statement per kind (job rows, events, counters);
these tests check that nothing a client reads is lost on the way: each job's event order, exact
timestamps, arbitrary reason text, and that a compare-and-set write which finds a row changed
under it refuses as a whole.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from openhtc.domain.enums import JobStatus
from openhtc.domain.models import AttemptReport, Capacity, JobLaunch
from openhtc.domain.recovery import EveryAttempt
from openhtc.services.service_set import ServiceSet
from openhtc.store.transitions import _FLUSH_PG, StatusWrites, StoreConsistencyError
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
def queue_with(tmp_path: Path, db_url: str | None) -> Iterator[Callable[..., Queue]]:
    """A Queue on services built with the given settings."""
    with ExitStack() as stack:
        yield lambda **settings: Queue(
            stack.enter_context(in_process_services(tmp_path / "data", db_url, **settings))
        )


@pytest.fixture
def queue(queue_with: Callable[..., Queue]) -> Queue:
    return queue_with()


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


@pytest.mark.parametrize("commit", [False, True], ids=["flush", "flush-and-commit"])
def test_a_write_that_finds_a_row_changed_under_it_refuses_and_changes_nothing(
    queue: Queue, commit: bool
) -> None:
    claimed = queue.submit_and_claim(3)
    db = queue.services.db
    before = queue.sql("SELECT id, status, attempt, updated_at FROM jobs ORDER BY id")
    events_before = queue.sql("SELECT COUNT(*) FROM job_events")
    with pytest.raises(StoreConsistencyError, match="1 job rows changed under us"), db.write() as conn:
        writes = StatusWrites(db, conn, 2.0, EXECUTOR)
        jobs = writes.load_ids([job.job_id for job in claimed])
        # another writer moves one job on after these rows were loaded
        conn.exec_driver_sql(
            db.sql("UPDATE jobs SET attempt = attempt + 1 WHERE id = ?"), (claimed[1].job_id,)
        )
        for job in jobs:
            writes.report(job, [AttemptReport(job.id, job.attempt, S.STARTING, 2.0)])
        writes.flush(commit=commit)  # commit: PostgreSQL commits in the same round trip
    assert queue.sql("SELECT id, status, attempt, updated_at FROM jobs ORDER BY id") == before
    assert queue.sql("SELECT COUNT(*) FROM job_events") == events_before
    assert queue.counters() == {S.RUNNABLE: 3}


def _restart_with_markers(queue: Queue) -> list[JobLaunch]:
    """Five claimed jobs: 0-3 reported STARTING (3 also RUNNING), 4 still RUNNABLE; the executor
    restarts naming jobs 1 and 2 as handed to its runtime (and job 0's next attempt)."""
    jobs = queue.submit_and_claim(5)
    reports = [AttemptReport(j.job_id, j.attempt, S.STARTING, 1.0) for j in jobs[:4]]
    reports.append(AttemptReport(jobs[3].job_id, jobs[3].attempt, S.RUNNING, 1.5))
    queue.executor.report(EXECUTOR, reports)
    marked = {(jobs[1].job_id, jobs[1].attempt), (jobs[2].job_id, jobs[2].attempt)}
    marked.add((jobs[0].job_id, jobs[0].attempt + 1))  # another attempt's marker says nothing
    region = queue.services.settings.region
    recovered = queue.executor.register(EXECUTOR, "inc-2", region, ["X86"], Capacity(64, 1 << 20), marked)
    assert recovered == 5
    return jobs


_ROWS = "SELECT id, status, attempt, failed_attempts, infra_retries, failure_code, status_reason FROM jobs"
REQUEUED_FREE = "Re-queued: the executor restarted before the job started"
FAULT = "ErrorInfrastructureFault"


def test_a_restarted_executor_reruns_what_it_may_have_started_without_spending_a_retry(queue: Queue) -> None:
    """Recovery at registration: an attempt never handed to a runtime is re-queued free; one
    the executor may have started (its journal names it, or it was RUNNING) is an infrastructure
    fault: a new attempt on max_infrastructure_retries (3 by default), no user retry spent."""
    jobs = _restart_with_markers(queue)
    rows = {row[0]: row[1:] for row in queue.sql(_ROWS)}
    # STARTING or RUNNABLE, never handed over: a free new attempt
    for job in (jobs[0], jobs[4]):
        assert rows[job.job_id] == (S.SUBMITTED_TO_RESCALE, 2, 0, 0, None, REQUEUED_FREE)
    # handed over (its RUNNING report may be what was lost), or RUNNING: re-run, maxRetries 0 untouched
    for job in jobs[1:4]:
        status, attempt, failed, infra, code, reason = rows[job.job_id]
        assert (status, attempt, failed, infra, code) == (S.SUBMITTED_TO_RESCALE, 2, 0, 1, FAULT)
        assert (
            reason.startswith("Re-run 1 of 3 after an infrastructure fault") and "may have started" in reason
        )
        events = queue.sql(
            "SELECT attempt, status, reason FROM job_events WHERE job_id = ? ORDER BY id", job.job_id
        )
        assert [e[:2] for e in events[-2:]] == [(1, S.FAILED), (2, S.SUBMITTED_TO_RESCALE)]
        assert "may have started" in events[-2][2]  # the lost attempt's event says why
    assert queue.counters() == {S.SUBMITTED_TO_RESCALE: 5}


def test_with_no_infrastructure_retries_a_restart_fails_what_may_have_started(
    queue_with: Callable[..., Queue],
) -> None:
    """max_infrastructure_retries = 0: at most once. What may have started fails at the first
    infrastructure fault; what cannot have started is still re-queued free."""
    queue = queue_with(max_infrastructure_retries=0)
    jobs = _restart_with_markers(queue)
    rows = {row[0]: row[1:] for row in queue.sql(_ROWS)}
    for job in (jobs[0], jobs[4]):
        assert rows[job.job_id] == (S.SUBMITTED_TO_RESCALE, 2, 0, 0, None, REQUEUED_FREE)
    for job in jobs[1:4]:
        status, attempt, failed, infra, code, reason = rows[job.job_id]
        assert (status, attempt, failed, infra, code) == (S.FAILED, 1, 0, 0, FAULT)
        assert "may have started" in reason
    assert queue.counters() == {S.SUBMITTED_TO_RESCALE: 2, S.FAILED: 3}


def test_an_executor_that_cannot_say_what_it_started_fails_every_attempt_it_held(
    queue_with: Callable[..., Queue],
) -> None:
    """After a crash of its machine a lazy journal may have lost records (executor/journal.py):
    the executor registers with EveryAttempt, and every attempt it held, RUNNABLE ones too, may
    have started: none is re-queued free (with no infrastructure re-run: FAILED)."""
    queue = queue_with(max_infrastructure_retries=0)
    jobs = queue.submit_and_claim(3)
    queue.executor.report(EXECUTOR, [AttemptReport(jobs[1].job_id, jobs[1].attempt, S.STARTING, 1.0)])
    region = queue.services.settings.region
    assert (
        queue.executor.register(EXECUTOR, "inc-2", region, ["X86"], Capacity(64, 1 << 20), EveryAttempt())
        == 3
    )
    rows = {row[0]: row[1:] for row in queue.sql(_ROWS)}
    for job in jobs:
        status, attempt, failed, infra, code, reason = rows[job.job_id]
        assert (status, attempt, failed, infra, code) == (S.FAILED, 1, 0, 0, FAULT)
        assert "after its machine did" in reason and "may have started" in reason
    assert queue.counters() == {S.FAILED: 3}


def test_lease_expiry_reruns_on_the_infrastructure_budget_then_fails(
    queue_with: Callable[..., Queue],
) -> None:
    """A lost executor cannot say what it started: each expiry is an infrastructure fault. The
    job is re-run while max_infrastructure_retries allows (here 1) and then fails; its own
    retries (maxRetries 2) are never spent on it."""
    queue = queue_with(max_infrastructure_retries=1)
    queue.submit(queue.project, queue.task, queue.job_request(3, retryStrategy={"maxRetries": 2}))
    jobs = queue.claim(3)
    queue.executor.report(EXECUTOR, [AttemptReport(jobs[0].job_id, jobs[0].attempt, S.STARTING, 1.0)])
    lease = queue.services.settings.lease_seconds
    far_future = queue.services.clock.now() + 10 * lease
    assert len(queue.services.queue.expire_leases(far_future).changes) == 3
    assert (
        queue.sql("SELECT status, attempt, failed_attempts, infra_retries, failure_code FROM jobs")
        == [(S.SUBMITTED_TO_RESCALE, 2, 0, 1, FAULT)] * 3
    )
    queue.services.queue.admit(queue.services.clock.now(), 100)
    assert len(queue.claim(3)) == 3
    assert len(queue.services.queue.expire_leases(far_future + 10 * lease).changes) == 3
    rows = queue.sql(
        "SELECT status, attempt, failed_attempts, infra_retries, failure_code, status_reason FROM jobs"
    )
    for status, attempt, failed, infra, code, reason in rows:
        assert (status, attempt, failed, infra, code) == (S.FAILED, 2, 0, 1, FAULT)
        assert reason.endswith("its 1 re-run(s) after infrastructure faults are spent")
    assert queue.counters() == {S.FAILED: 3}


def test_a_flush_on_postgresql_finds_its_rows_by_the_primary_key(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """The statement of a PostgreSQL flush looks its rows up by id. Joined on the id alone, the
    planner (which guesses 100 rows for any JSON array) hashed a sequential scan of every job
    on each flush: the largest PostgreSQL cost per job of W1 (docs/performance.md). A PostgreSQL
    plan: it runs once, on PostgreSQL (not parametrized by --db, so nothing is skipped in CI)."""
    if request.config.getoption("--db") == "sqlite":
        pytest.skip("a PostgreSQL plan (run with --db postgres or both)")
    pg_url = request.getfixturevalue("pg_url_factory")()
    with in_process_services(tmp_path / "data", pg_url) as services:
        _plan_uses_the_primary_key(Queue(services))


def _plan_uses_the_primary_key(queue: Queue) -> None:
    db = queue.services.db
    body = {"batchSize": 1000, "htcJobDefinition": {"imageName": "bb", "commands": ["true"], "maxMemory": 64}}
    for _ in range(3):
        queue.submit(queue.project, queue.task, body)
    claimed = queue.claim(40)
    # each job's columns as a flush writes them, then the compare-and-set key (id, status, attempt)
    started = (S.STARTING, 1, 0, 0, EXECUTOR, 9e9, 2.0, None, None, None, None, None, False)
    rows = [[*started, j.job_id, S.RUNNABLE, j.attempt] for j in claimed]
    with db.read() as conn:
        plan = "\n".join(
            row[0]
            for row in conn.exec_driver_sql("EXPLAIN " + _FLUSH_PG, (json.dumps(rows), "[]", "[]", "[]"))
        )
    assert "pk_jobs" in plan and "Seq Scan on jobs" not in plan, plan


def test_a_claim_gives_the_next_job_to_the_project_whose_running_jobs_hold_fewer_vcpus(queue: Queue) -> None:
    """Fair share reads what each project's claimed jobs hold from the counters, in the claim's
    own transaction: the project that holds two vCPUs already waits behind one that holds none,
    though its jobs were queued first."""
    first = queue.create_project("first")
    later = queue.create_project("later")
    first_task, later_task = queue.create_task(first), queue.create_task(later)
    queue.submit(first, first_task, queue.job_request(4))
    assert {j.project_id for j in queue.claim(2)} == {first.id}
    queue.submit(later, later_task, queue.job_request(2))
    assert [j.project_id for j in queue.claim(1)] == [later.id]
    # once both hold two vCPUs' worth, the first project's older jobs come first again
    assert [j.project_id for j in queue.claim(1)] == [later.id]
    assert [j.project_id for j in queue.claim(1)] == [first.id]
