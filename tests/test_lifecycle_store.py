"""The store writes exactly what the pure lifecycle says, on SQLite and PostgreSQL.

The Hypothesis state machine of ``test_lifecycle_properties.py`` drives the pure model; this one
sends the same kinds of inputs (submit, claim, reports in order, several in one flush,
duplicated and late, infrastructure failures, lease expiry, executor restarts, admission of
retries and re-runs, cancel) through the real store
(``QueueStore``/``JobStore`` on a real database) and keeps a pure model beside it, fed the same
inputs through ``domain/lifecycle.py``. After every step each job's row, its own events and the
task's counters must equal the model's, so the writer (load under lock, compare-and-set, bulk
events, counter deltas) is checked against the pure lifecycle.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from openhtc.auth.tokens import Principal
from openhtc.config import Settings
from openhtc.domain import lifecycle
from openhtc.domain.enums import ACTIVE_STATUSES, FailureCode, JobStatus
from openhtc.domain.lifecycle import JobRecord
from openhtc.domain.models import AttemptReport, Capacity
from openhtc.services.service_set import ServiceSet
from openhtc.services.submission import submit
from openhtc.wiring import bootstrap, build_services

S = JobStatus
EXECUTORS = ("exec-a", "exec-b")
ACTIVE = {int(s) for s in ACTIVE_STATUSES}
CAPACITY = Capacity(64, 1 << 20)
LEASE = 30.0
NEXT = {S.RUNNABLE: S.STARTING, S.STARTING: S.RUNNING, S.RUNNING: S.SUCCEEDED}
RESTARTED = "the executor restarted"  # the causes the store names
EXPIRED = "the executor stopped responding (lease expired)"
BUDGET = 1  # max_infrastructure_retries: one re-run after an infrastructure fault, then failure
_ROW = (
    "SELECT id, status, attempt, failed_attempts, infra_retries, executor_id, lease_expires_at, started_at,"
    " completed_at, exit_code, failure_code, status_reason, cancelled FROM jobs WHERE task_id = ? ORDER BY id"
)


class StoreLifecycle(RuleBasedStateMachine):
    jobs = Bundle("jobs")

    def __init__(self, services: ServiceSet, project: Any, who: Principal) -> None:
        super().__init__()
        self.services = services
        self.project = project
        self.who = who
        self.region = services.settings.region
        self.task = services.projects.create_task(project, f"t-{uuid.uuid4()}", "", "test", time.time())
        self.records: dict[int, JobRecord] = {}
        self.history: dict[int, list[tuple[int, int, bool]]] = {}  # (attempt, status, cancelled)
        self.reports: list[tuple[str, AttemptReport]] = []
        self.started: set[tuple[int, int]] = set()
        self.incarnation = 0
        self.now = time.time() + 1000.0  # after the submissions' own timestamps

    def tick(self, seconds: float = 1.0) -> float:
        self.now += seconds
        return self.now

    def apply(self, job_id: int, step: lifecycle.Step) -> None:
        self.records[job_id] = step.record
        self.history[job_id].extend(
            (e.attempt, e.status, e.cancelled) for e in map(lifecycle.Event._make, step.events)
        )

    def sql(self, statement: str, *params: Any) -> list[tuple[Any, ...]]:
        db = self.services.db
        with db.read() as conn:
            return [tuple(row) for row in conn.exec_driver_sql(db.sql(statement), params).all()]

    # -- rules -----------------------------------------------------------------------------------

    @rule(target=jobs, n=st.integers(1, 3), max_retries=st.integers(0, 2))
    def submit(self, n: int, max_retries: int) -> Any:
        """Submit n jobs; the first goes to the bundle the other rules draw from."""
        definition = {"imageName": "bb", "commands": ["true"], "maxMemory": 64}
        body = [
            {"batchSize": n, "htcJobDefinition": definition, "retryStrategy": {"maxRetries": max_retries}}
        ]
        submit(self.services, self.who, self.project, self.task, body, None)
        new = [i for (i,) in self.sql("SELECT id FROM jobs WHERE task_id = ? ORDER BY id", self.task.id)]
        new = [i for i in new if i not in self.records]
        assert len(new) == n
        status = lifecycle.submitted(admit=True)[-1]  # the project has no vCPU limit
        for job_id in new:
            self.records[job_id] = JobRecord(job_id, int(status), max_retries=max_retries)
            self.history[job_id] = []
        return new[0]

    @rule(executor=st.sampled_from(EXECUTORS), max_jobs=st.integers(1, 3))
    def claim(self, executor: str, max_jobs: int) -> None:
        at = self.tick()
        claimed = self.services.queue.claim(executor, self.region, ["X86"], CAPACITY, max_jobs, LEASE, at)
        for job in claimed:
            assert self.records[job.id].status == S.SUBMITTED_TO_PROVIDER
            (row,), events = lifecycle.claim([self.records[job.id]], executor, at + LEASE, at)
            self.apply(job.id, lifecycle.Step(JobRecord._make(row), tuple(events)))

    @rule(
        job_id=jobs,
        fails=st.booleans(),
        failure=st.sampled_from(
            (
                FailureCode.ErrorNonZeroContainerExitCode,
                FailureCode.ErrorTimeout,
                FailureCode.ErrorInfrastructureFault,  # the executor's launcher stopped
            )
        ),
        several=st.booleans(),
    )
    def report(self, job_id: int, fails: bool, failure: FailureCode, several: bool) -> None:
        """The executor holding the job reports its attempt's next status, or its failure; or
        (``several``) the rest of the attempt's statuses in one flush."""
        rec = self.records[job_id]
        if rec.executor_id is None or rec.status not in ACTIVE:
            return
        statuses = [NEXT[S(rec.status)]]
        while several and statuses[-1] != S.SUCCEEDED:
            statuses.append(NEXT[statuses[-1]])
        if fails:
            statuses[-1] = S.FAILED
        sent = [
            AttemptReport(job_id, rec.attempt, s, self.tick(), 1 if s == S.FAILED else 0, failure.value)
            for s in statuses
        ]
        if statuses != [S.STARTING]:
            self.started.add((job_id, rec.attempt))
        self.reports.extend((rec.executor_id, r) for r in sent)
        self.services.queue.report(rec.executor_id, sent, self.now)
        self.apply(job_id, lifecycle.report(rec, sent, rec.executor_id, BUDGET))

    @rule(data=st.data())
    def replay_a_report(self, data: st.DataObject) -> None:
        if self.reports:
            executor, r = data.draw(st.sampled_from(self.reports))
            self.services.queue.report(executor, [r], self.tick())  # the invariants check nothing moved

    @rule(seconds=st.sampled_from((1.0, LEASE + 1)))
    def leases_expire(self, seconds: float) -> None:
        at = self.tick(seconds)
        self.services.queue.expire_leases(at)
        for job_id, rec in self.records.items():
            if rec.status in ACTIVE and rec.lease_expires_at is not None and rec.lease_expires_at < at:
                self.apply(job_id, lifecycle.lose_executor(rec, at, EXPIRED, None, BUDGET))

    @rule(executor=st.sampled_from(EXECUTORS))
    def executor_restarts(self, executor: str) -> None:
        at = self.tick()
        self.incarnation += 1
        self.services.queue.register(
            executor, f"inc-{self.incarnation}", self.region, ["X86"], CAPACITY, at, self.started
        )
        for job_id, rec in self.records.items():
            if rec.executor_id == executor and rec.status in ACTIVE:
                marked = (job_id, rec.attempt) in self.started
                self.apply(job_id, lifecycle.lose_executor(rec, at, RESTARTED, marked, BUDGET))

    @rule()
    def admit_retries(self) -> None:
        at = self.tick()
        self.services.queue.admit(at, 1000)
        for job_id, rec in self.records.items():
            self.apply(job_id, lifecycle.admit(rec, at))

    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        if data.draw(st.integers(0, 5)) == 0:  # rare: it ends every job of the task
            at = self.tick()
            self.services.jobs.cancel(self.task.id, None, at)
            for job_id, rec in self.records.items():
                self.apply(job_id, lifecycle.cancel(rec, at))

    def teardown(self) -> None:
        # leave nothing claimable or held for the next example's executors
        self.services.jobs.cancel(self.task.id, None, self.tick())

    # -- invariants ------------------------------------------------------------------------------

    @invariant()
    def rows_equal_the_model(self) -> None:
        rows = self.sql(_ROW, self.task.id)
        assert len(rows) == len(self.records)
        for row in rows:
            r = self.records[row[0]]
            model = (
                r.id, r.status, r.attempt, r.failed_attempts, r.infra_retries, r.executor_id,
                r.lease_expires_at, r.started_at, r.completed_at, r.exit_code, r.failure_code,
                r.status_reason, r.cancelled,
            )  # fmt: skip
            assert (*row[:12], bool(row[12])) == pytest.approx(model)

    @invariant()
    def events_equal_the_model(self) -> None:
        if not self.records:
            return
        rows = self.sql(
            "SELECT e.job_id, e.attempt, e.status, e.cancelled FROM job_events e"
            " JOIN jobs j ON j.id = e.job_id WHERE j.task_id = ? ORDER BY e.id",
            self.task.id,
        )
        stored: dict[int, list[tuple[int, int, bool]]] = {job_id: [] for job_id in self.records}
        for job_id, attempt, status, cancelled in rows:
            stored[job_id].append((attempt, status, bool(cancelled)))
        assert stored == self.history

    @invariant()
    def counters_equal_a_recount(self) -> None:
        rows = self.sql(
            "SELECT status, SUM(count) FROM job_counters WHERE task_id = ? GROUP BY status", self.task.id
        )
        assert {status: count for status, count in rows if count} == dict(
            Counter(r.status for r in self.records.values())
        )


@pytest.fixture
def services(tmp_path: Path, db_url: str | None) -> Iterator[ServiceSet]:
    settings = Settings(
        data_dir=tmp_path / "data",
        database_url=db_url,
        executor=False,
        runtime="noop",
        max_infrastructure_retries=BUDGET,
    )
    services = build_services(settings)
    try:
        bootstrap(services)
        yield services
    finally:
        services.db.dispose()


def test_the_store_writes_what_the_pure_lifecycle_says(services: ServiceSet) -> None:
    ws = services.accounts.workspaces()[0]
    project = services.projects.create(ws.id, "p", "", [services.settings.region], None, "test", 1.0)
    who = Principal("test", ws.id, "WORKSPACE_ADMIN")
    run_state_machine_as_test(
        lambda: StoreLifecycle(services, project, who),
        settings=settings(
            max_examples=25,
            stateful_step_count=25,
            derandomize=True,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
