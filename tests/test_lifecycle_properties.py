"""The pure job lifecycle (domain/lifecycle.py) under random sequences of inputs.

A Hypothesis state machine submits jobs and drives them with claims, executor reports (in order,
several at once, duplicated, late, for old attempts, from the wrong executor, infrastructure
failures), lease expiry, executor restarts and cancels, under a drawn ``max_infrastructure_retries``.
After every step it checks what a user relies on: each job is in exactly one status, the
per-status counters (kept from the counter deltas the lifecycle returns) equal a recount, a
terminal status never changes, a stale report changes nothing, retries never exceed
``maxRetries``, infrastructure loss never spends a user retry, infrastructure re-runs never
exceed their budget, and an attempt that never started is re-queued for free.
No database: the whole machine runs in well under a second per example.
"""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from openhtc.domain import lifecycle
from openhtc.domain.enums import ACTIVE_STATUSES, FailureCode, JobStatus
from openhtc.domain.errors import InvalidTransition
from openhtc.domain.lifecycle import JobRecord, Step
from openhtc.domain.models import AttemptReport

pytestmark = pytest.mark.unit  # pure code: make test-unit runs it

S = JobStatus
EXECUTORS = ("exec-a", "exec-b")
ACTIVE = {int(s) for s in ACTIVE_STATUSES}
JOB = st.integers(0, 3)  # which job a rule acts on: an index from the newest
# the status an executor reports next for an attempt, and the failure codes it reports with FAILED
NEXT = {S.RUNNABLE: S.STARTING, S.STARTING: S.RUNNING, S.RUNNING: S.SUCCEEDED}
FAILURES = (
    FailureCode.ErrorNonZeroContainerExitCode,
    FailureCode.ErrorTimeout,
    FailureCode.ErrorNotEnoughMemory,
    FailureCode.ErrorStartingContainer,
)


class Lifecycle(RuleBasedStateMachine):
    """Jobs as the store would hold them, changed only by what the lifecycle returns."""

    def __init__(self) -> None:
        super().__init__()
        self.records: dict[int, JobRecord] = {}
        self.counters: Counter[int] = Counter()
        self.history: dict[int, list[lifecycle.Event]] = {}
        self.reports: list[tuple[str, AttemptReport]] = []  # every report sent, for late replays
        self.started: dict[int, set[int]] = {}  # attempts whose process may have started
        self.now = 0.0
        self.budget = 0  # max_infrastructure_retries, drawn per run

    # -- the store's part: apply a step as transitions.Batch does -------------------------------

    def apply(self, job_id: int, step: Step) -> None:
        before = self.records[job_id]
        if not step.changed:
            assert step.record == before, "a step without events changed the record"
            return
        assert not before.terminal, f"job {job_id} left terminal {S(before.status).name}"
        for status, count, _vcpus in lifecycle.counter_deltas(before.status, step.record.status, 1, 1):
            self.counters[status] += count
        self.records[job_id] = step.record
        self.history[job_id].extend(map(lifecycle.Event._make, step.events))  # the hot steps give plain rows

    def pick(self, i: int) -> int:
        """One of the jobs submitted so far (rules draw an index: the later jobs are hit often)."""
        ids = list(self.records)
        return ids[-1 - i % len(ids)]

    @initialize(budget=st.integers(0, 2))
    def first_job(self, budget: int) -> None:
        self.budget = budget
        self.submit(True, 1)

    def tick(self) -> float:
        self.now += 1.0
        return self.now

    # -- rules -----------------------------------------------------------------------------------

    @rule(admit=st.booleans(), max_retries=st.integers(0, 2))
    def submit(self, admit: bool, max_retries: int) -> None:
        job_id = len(self.records) + 1
        statuses = lifecycle.submitted(admit)
        self.records[job_id] = JobRecord(job_id, int(statuses[-1]), max_retries=max_retries)
        self.counters[int(statuses[-1])] += 1
        self.history[job_id] = []
        self.started[job_id] = set()

    @rule(job_id=JOB)
    def admit(self, job_id: int) -> None:
        job_id = self.pick(job_id)
        self.apply(job_id, lifecycle.admit(self.records[job_id], self.tick()))

    @rule(job_id=JOB, executor=st.sampled_from(EXECUTORS))
    def claim(self, job_id: int, executor: str) -> None:
        """The executor claims a queued job; claiming one that is not queued is refused."""
        job_id = self.pick(job_id)
        if self.records[job_id].status != S.SUBMITTED_TO_PROVIDER:
            with pytest.raises(InvalidTransition):
                lifecycle.claim([self.records[job_id]], executor, self.now + 30, self.now)
            queued = [j for j, rec in self.records.items() if rec.status == S.SUBMITTED_TO_PROVIDER]
            if not queued:
                return
            job_id = queued[0]
        at = self.tick()
        (row,), events = lifecycle.claim([self.records[job_id]], executor, at + 30, at)
        record = JobRecord._make(row)
        assert record.executor_id == executor and record.lease_expires_at == at + 30
        self.apply(job_id, Step(record, tuple(events)))

    @rule(
        job_id=JOB,
        fails=st.sampled_from((False, False, True)),
        failure=st.sampled_from(FAILURES),
        exit_code=st.integers(0, 3),
        late=st.booleans(),
    )
    def report(self, job_id: int, fails: bool, failure: FailureCode, exit_code: int, late: bool) -> None:
        """The executor holding the job reports its attempt's next status (an executor reports
        them in order), or its failure (non-zero exit, timeout, OOM, start failure)."""
        active = [j for j, rec in self.records.items() if rec.status in ACTIVE]
        if not active:
            return
        job_id = active[job_id % len(active)]
        rec = self.records[job_id]
        status = S.FAILED if fails else NEXT[S(rec.status)]
        r = AttemptReport(job_id, rec.attempt, status, self.tick(), exit_code, failure.value, "why")
        if status is not S.STARTING or rec.status != S.RUNNABLE:
            self.started[job_id].add(rec.attempt)  # the process ran (or its start failed)
        self.reports.append((rec.executor_id, r))
        self.apply(job_id, self.fold(rec, [r], rec.executor_id))
        if late:  # every earlier report of the job arrives again, after this one
            for executor, old in [(e, o) for e, o in self.reports[:-1] if o.job_id == job_id]:
                now = self.records[job_id]
                step = self.fold(now, [old], executor)
                assert not step.changed and step.record == now, "a late report changed the job"

    @rule(job_id=JOB, upto=st.sampled_from((S.RUNNING, S.SUCCEEDED)), fails=st.booleans())
    def report_several_at_once(self, job_id: int, upto: JobStatus, fails: bool) -> None:
        """The executor sends the rest of an attempt's statuses in one flush (a short job starts,
        runs and ends between two turns), perhaps ending in a failure, with a duplicate inside:
        folded in one call, they give what they give one by one."""
        active = [j for j, rec in self.records.items() if rec.status in ACTIVE]
        if not active:
            return
        job_id = active[job_id % len(active)]
        rec = self.records[job_id]
        statuses = [s for s in (S.STARTING, S.RUNNING, S.SUCCEEDED) if rec.status < s <= upto]
        if fails:
            statuses[-1:] = [S.FAILED]
        sent = []
        for status in statuses:
            code = FailureCode.ErrorNonZeroContainerExitCode.value if status == S.FAILED else None
            sent.append(
                AttemptReport(job_id, rec.attempt, status, self.tick(), 1 if code else 0, code, "why")
            )
        if sent:
            sent.insert(1, sent[0])  # a duplicate in the same flush changes nothing
            self.started[job_id].add(rec.attempt)
        one_by_one = rec
        for r in sent:
            one_by_one = self.fold(one_by_one, [r], rec.executor_id).record
        step = self.fold(rec, sent, rec.executor_id)
        assert step.record == one_by_one
        self.reports.extend((rec.executor_id, r) for r in sent)
        self.apply(job_id, step)

    @rule(job_id=JOB)
    def report_an_infrastructure_failure(self, job_id: int) -> None:
        """The executor's own infrastructure fails the attempt (its job launcher stopped while
        the job ran): like a lost executor, it spends no user retry."""
        active = [j for j, rec in self.records.items() if rec.status in ACTIVE]
        if not active:
            return
        job_id = active[job_id % len(active)]
        rec = self.records[job_id]
        fault = FailureCode.ErrorInfrastructureFault.value
        r = AttemptReport(job_id, rec.attempt, S.FAILED, self.tick(), None, fault, "launcher stopped")
        self.started[job_id].add(rec.attempt)
        self.reports.append((rec.executor_id, r))
        self.apply(job_id, self.fold(rec, [r], rec.executor_id))
        self.check_infrastructure_fault(rec, self.records[job_id])

    def fold(self, rec: JobRecord, reports: list[AttemptReport], executor: str | None) -> Step:
        return lifecycle.report(rec, reports, executor, self.budget)

    @rule(data=st.data())
    def replay_a_report(self, data: st.DataObject) -> None:
        """A duplicate or late report (an old attempt, a job since re-queued, cancelled or ended)."""
        if not self.reports:
            return
        # every report was applied (or fenced) when it was sent: sent again, it changes nothing
        executor, r = data.draw(st.sampled_from(self.reports))
        rec = self.records[r.job_id]
        step = self.fold(rec, [r], executor)
        assert not step.changed and step.record == rec, "a duplicate or late report changed the job"

    @rule(job_id=JOB)
    def replay_every_report_of_a_job(self, job_id: int) -> None:
        """All of one job's reports arrive again, oldest first (an executor's retried flush).
        A job still running its attempt is chosen first: there the late ones matter."""
        reported = {r.job_id for _, r in self.reports}
        if not reported:
            return
        running = sorted(j for j in reported if self.records[j].status in ACTIVE)
        candidates = running or sorted(reported)
        job_id = candidates[job_id % len(candidates)]
        for executor, r in [(e, r) for e, r in self.reports if r.job_id == job_id]:
            rec = self.records[job_id]
            step = self.fold(rec, [r], executor)
            assert not step.changed and step.record == rec, "a duplicate or late report changed the job"

    @rule(job_id=JOB, executor=st.sampled_from(EXECUTORS))
    def report_from_another_executor(self, job_id: int, executor: str) -> None:
        job_id = self.pick(job_id)
        rec = self.records[job_id]
        if rec.executor_id == executor:
            return
        r = AttemptReport(job_id, rec.attempt, S.SUCCEEDED, self.tick(), 0)
        step = self.fold(rec, [r], executor)
        assert not step.changed and step.record == rec, "a report from a non-holder changed the job"

    @rule(job_id=JOB)
    def lease_expires(self, job_id: int) -> None:
        job_id = self.pick(job_id)
        rec = self.records[job_id]
        if rec.status not in ACTIVE:
            return
        self.lose(job_id, None)

    @rule(executor=st.sampled_from(EXECUTORS))
    def executor_restarts(self, executor: str) -> None:
        """The executor registers again and names the attempts it may have started."""
        for job_id, rec in list(self.records.items()):
            if rec.executor_id == executor and rec.status in ACTIVE:
                self.lose(job_id, rec.attempt in self.started[job_id])

    def lose(self, job_id: int, may_have_started: bool | None) -> None:
        """The crash rule: an attempt that cannot have started is re-queued free; one that may
        have is an infrastructure fault."""
        rec = self.records[job_id]
        self.apply(job_id, lifecycle.lose_executor(rec, self.tick(), "lost", may_have_started, self.budget))
        new = self.records[job_id]
        if may_have_started is False and rec.status != S.RUNNING:
            assert (new.status, new.attempt, new.failed_attempts, new.infra_retries) == (
                S.SUBMITTED_TO_RESCALE,
                rec.attempt + 1,
                rec.failed_attempts,
                rec.infra_retries,
            )
        else:
            self.check_infrastructure_fault(rec, new)
        assert new.executor_id is None or new.status == S.FAILED

    def check_infrastructure_fault(self, rec: JobRecord, new: JobRecord) -> None:
        """Infrastructure loss never spends a user retry: the job is re-run on its budget, or
        fails once that is spent."""
        assert new.failed_attempts == rec.failed_attempts, "an infrastructure fault spent a user retry"
        assert new.failure_code == FailureCode.ErrorInfrastructureFault
        if rec.infra_retries < self.budget:
            assert (new.status, new.attempt, new.infra_retries) == (
                S.SUBMITTED_TO_RESCALE,
                rec.attempt + 1,
                rec.infra_retries + 1,
            )
        else:
            assert (new.status, new.attempt, new.infra_retries) == (S.FAILED, rec.attempt, rec.infra_retries)

    @rule(job_id=JOB, often=st.integers(0, 3))
    def cancel(self, job_id: int, often: int) -> None:
        if often:  # one draw in four: a cancel ends the job, and the other rules need live ones
            return
        job_id = self.pick(job_id)
        rec = self.records[job_id]
        step = lifecycle.cancel(rec, self.tick())
        self.apply(job_id, step)
        assert self.records[job_id].terminal
        if not rec.terminal:
            assert self.records[job_id].cancelled and self.records[job_id].status == S.FAILED

    # -- invariants ------------------------------------------------------------------------------

    @invariant()
    def each_job_in_one_status_and_counters_match_a_recount(self) -> None:
        recount = Counter(rec.status for rec in self.records.values())
        assert +self.counters == recount
        assert sum(recount.values()) == len(self.records)

    @invariant()
    def terminal_jobs_are_settled(self) -> None:
        for rec in self.records.values():
            if rec.terminal:
                assert rec.lease_expires_at is None and rec.completed_at is not None
                assert rec.status == S.SUCCEEDED or rec.failure_code or rec.cancelled

    @invariant()
    def retries_and_infrastructure_reruns_stay_within_their_budgets(self) -> None:
        for job_id, rec in self.records.items():
            started = len(self.started[job_id])
            assert rec.failed_attempts <= rec.max_retries + 1, "retries exceeded maxRetries"
            assert rec.infra_retries <= self.budget, "infrastructure re-runs exceeded their budget"
            # every attempt that may have started is accounted for, as a user retry or an
            # infrastructure re-run (the last one may still run, or have succeeded or been cancelled)
            assert started <= rec.failed_attempts + rec.infra_retries + 1
            failed_events = [e for e in self.history[job_id] if e.status == S.FAILED and not e.cancelled]
            spent_on_infra = (
                rec.status == S.FAILED
                and not rec.cancelled
                and rec.failure_code == FailureCode.ErrorInfrastructureFault
            )
            if rec.status == S.FAILED and not rec.cancelled:  # a final failure: a budget is spent
                if spent_on_infra:
                    assert rec.infra_retries == self.budget
                else:
                    assert rec.failed_attempts == rec.max_retries + 1
            assert len(failed_events) == rec.failed_attempts + rec.infra_retries + spent_on_infra
            # each attempt's number is its place: first + retries + re-runs + free re-queues
            requeued_free = sum(1 for e in self.history[job_id] if e.status == S.SUBMITTED_TO_RESCALE) - (
                rec.infra_retries + min(rec.failed_attempts, rec.max_retries)
            )
            assert requeued_free >= 0
            assert (
                rec.attempt
                == 1 + rec.infra_retries + min(rec.failed_attempts, rec.max_retries) + requeued_free
            )

    @invariant()
    def a_queued_job_holds_no_executor(self) -> None:
        for rec in self.records.values():
            if rec.status in (S.SUBMITTED_TO_RESCALE, S.SUBMITTED_TO_PROVIDER):
                assert rec.executor_id is None and rec.lease_expires_at is None


TestLifecycle = Lifecycle.TestCase
TestLifecycle.settings = settings(
    max_examples=200,
    stateful_step_count=50,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def test_the_legality_table_is_the_effect_table() -> None:
    for (src, dst), _effect in lifecycle.EFFECTS.items():
        assert lifecycle.can_transition(src, dst)
    assert not lifecycle.can_transition(S.SUCCEEDED, S.FAILED)
    assert not lifecycle.can_transition(S.SUBMITTED_TO_PROVIDER, S.SUBMITTED_TO_RESCALE)


def test_a_lost_executor_requeues_an_unstarted_attempt_free_and_reruns_a_started_one_on_its_budget() -> None:
    (row,), _ = lifecycle.claim([JobRecord(1, int(S.SUBMITTED_TO_PROVIDER))], "e", 30.0, 1.0)
    claimed = JobRecord._make(row)
    free = lifecycle.lose_executor(claimed, 2.0, "restarted", False, 0)
    assert free.requeued and free.record.attempt == 2 and free.record.failed_attempts == 0
    assert free.record.executor_id is None and free.record.status == S.SUBMITTED_TO_RESCALE
    rerun = lifecycle.lose_executor(claimed, 2.0, "restarted", True, 1)
    assert rerun.requeued and rerun.record.status == S.SUBMITTED_TO_RESCALE
    assert (rerun.record.attempt, rerun.record.failed_attempts, rerun.record.infra_retries) == (2, 0, 1)
    assert [e.status for e in rerun.events] == [S.FAILED, S.SUBMITTED_TO_RESCALE]
    assert "may have started" in (rerun.events[0].reason or "")
    final = lifecycle.lose_executor(claimed._replace(infra_retries=1), 2.0, "restarted", True, 1)
    assert final.record.status == S.FAILED and final.record.failed_attempts == 0
    assert final.record.failure_code == FailureCode.ErrorInfrastructureFault
    at_most_once = lifecycle.lose_executor(claimed, 2.0, "restarted", True, 0)
    assert at_most_once.record.status == S.FAILED and at_most_once.record.infra_retries == 0
