"""The executor's sans-I/O core (executor/state.py), driven by event sequences: no threads,
no database, no clock (time is an argument)."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from openhtc.domain.enums import JobStatus
from openhtc.domain.models import Capacity, JobLaunch
from openhtc.executor.state import (
    BUSY_TURN_SECONDS,
    HOLD_SECONDS,
    TURN_SECONDS,
    Attempt,
    ExecutorState,
    Prefetch,
)

pytestmark = pytest.mark.unit  # pure code: make test-unit runs it

_ids = itertools.count(1)


def job(vcpus: int = 1, memory_mb: int = 64, attempt: int = 1) -> JobLaunch:
    n = next(_ids)
    return JobLaunch(
        job_id=n,
        attempt=attempt,
        job_uuid=f"p:{n}",
        batch_id=1,
        array_index=n,
        project_id="p",
        task_id="t",
        region="r",
        image="",
        commands=("true",),
        envs=(),
        vcpus=vcpus,
        memory_mb=memory_mb,
        disk_gib=1,
        timeout_s=None,
        working_dir=None,
    )


def core(
    vcpus: int = 4, memory_mb: int = 4096, prefetch: int | None = None, max_running: int = 64
) -> ExecutorState:
    return ExecutorState(Capacity(vcpus, memory_mb), max_running, Prefetch(prefetch, 0.25, vcpus), 10.0)


def launch_all(state: ExecutorState) -> list[Attempt]:
    started = []
    while (attempt := state.launch()) is not None:
        started.append(attempt)
    return started


# -- packing -------------------------------------------------------------------------------------


def test_jobs_are_packed_by_vcpus_in_claim_order() -> None:
    state = core(vcpus=4)
    big, other, small = job(vcpus=2), job(vcpus=2), job(vcpus=1)
    state.claimed([big, other, small, job(vcpus=1)])
    started = launch_all(state)
    assert [a.launch for a in started] == [big, other]  # the 1-vCPU jobs wait: the machine is full
    assert state.free == Capacity(0, 4096 - 128)
    assert len({a.slot for a in started}) == 2
    assert state.ended(started[0], None).launch == small  # its slot's capacity goes to the next


def test_jobs_are_packed_by_memory() -> None:
    state = core(vcpus=8, memory_mb=1000)
    state.claimed([job(memory_mb=600), job(memory_mb=600), job(memory_mb=300)])
    assert len(launch_all(state)) == 1  # the second 600 MB job does not fit, and blocks the queue
    assert state.free == Capacity(7, 400)


def test_max_running_caps_launches() -> None:
    state = core(vcpus=8, max_running=3)
    state.claimed([job() for _ in range(6)])
    assert len(launch_all(state)) == 3


# -- claims and prefetch -------------------------------------------------------------------------


def test_claim_asks_for_the_prefetch_floor_plus_one_per_vcpu_less_what_is_held() -> None:
    state = core(vcpus=2)
    claim = state.claim(0.0)
    assert claim is not None
    assert claim.max_jobs == 2 * 2 + 2  # two per vCPU prefetched, one per vCPU running
    assert claim.free == Capacity(2, 4096)
    state.claimed([job() for _ in range(claim.max_jobs)])
    assert state.claim(0.01) is None  # it holds what it wants
    launch_all(state)
    assert state.claim(0.02) is None  # running jobs count as held too


def test_prefetch_grows_with_the_completion_rate_up_to_its_ceiling() -> None:
    prefetch = Prefetch(None, 0.25, vcpus=2, ceiling=500)
    assert prefetch.target(0, 0.0) == 4
    assert prefetch.target(400, 0.2) == 250  # 2,000 jobs/s, smoothed by half: 1,000 -> 250 held
    assert prefetch.target(2400, 0.4) == 500  # capped
    idle = [prefetch.target(2400, 10.0 * i) for i in range(1, 11)]
    assert idle[-2] < 500 and idle[-1] == 4  # and shrinks to its floor when jobs stop finishing


def test_slow_turns_make_the_prefetch_cover_two_of_them() -> None:
    """A turn (report, claim) that takes longer than the prefetched work lasts would leave the
    slots idle until its claim lands: the buffer then holds two turns' worth at the rate."""
    prefetch = Prefetch(None, 0.25, vcpus=2, ceiling=4096)
    prefetch.target(0, 0.0)
    assert prefetch.target(400, 0.2) == 250  # 1,000 jobs/s (smoothed), fast turns: 0.25 s of work
    prefetch.turn_took(0.45)
    assert prefetch.target(400, 0.25) == 1000  # two turns of 0.45 s plus a busy pause each
    prefetch.turn_took(0.01)  # turns are fast again: it shrinks back by halves
    prefetch.turn_took(0.01)
    prefetch.turn_took(0.01)
    assert prefetch.target(400, 0.3) < 400


def test_a_turn_whose_claim_held_nothing_is_not_a_slow_turn() -> None:
    """An agent's idle claim long-polls for work (up to 30 s): that is how long the fleet was
    idle, not how slow its turns are. Counted, the first agent woken at the next burst would
    claim a rate times two polls' worth (and journal hundreds ahead)."""
    state = core(vcpus=2)
    claim = state.claim(0.0)
    assert claim is not None and claim.idle  # nothing held: this claim may wait for work
    state.turn_took(30.0, claim.idle)
    state.claimed([job(1)])
    claim = state.claim(0.05)
    assert claim is not None and not claim.idle
    state.completed = 400  # then a burst at 1,000 jobs/s (smoothed)
    assert state.prefetch.target(400, 0.2) == 250  # 0.25 s of work, not two 30 s turns of it
    state.turn_took(0.45, claim.idle)  # a turn that held work and was slow still counts
    assert state.prefetch.target(400, 0.25) == 1000


def test_the_prefetch_never_holds_more_than_its_ceiling() -> None:
    prefetch = Prefetch(None, 1.0, vcpus=2, ceiling=256)  # htc agent's
    prefetch.target(0, 0.0)
    prefetch.turn_took(30.0)
    assert prefetch.target(2000, 0.2) == 256


def test_a_fixed_prefetch_overrides_the_rate_but_turns_still_see_the_rate() -> None:
    state = core(vcpus=2, prefetch=1)
    claim = state.claim(0.0)
    assert claim is not None and claim.max_jobs == 1 + 2
    state.completed = 100
    state.claim(1.0)
    assert state.prefetch.rate > 0
    state.claimed([job()])  # an executor holding work paces its turns
    assert state.next_turn(5.0) == 5.0 + TURN_SECONDS
    state.prefetch.rate = 1000.0
    assert state.next_turn(5.0) == 5.0 + BUSY_TURN_SECONDS


def test_an_idle_executor_turns_at_once() -> None:
    """Nothing runs or waits: a lone job's end is reported without waiting for the pace."""
    state = core(vcpus=2)
    state.claimed([job()])
    (attempt,) = launch_all(state)
    assert state.next_turn(5.0) == 5.0 + TURN_SECONDS  # it runs
    state.report(attempt.launch, JobStatus.SUCCEEDED, 6.0)
    state.ended(attempt, None)
    assert state.next_turn(5.0) == 5.0


def test_a_stopping_executor_claims_and_launches_nothing() -> None:
    state = core()
    state.claimed([job(), job()])
    state.stop()
    assert state.claim(0.0) is None
    assert state.launch() is None


def test_heartbeats_come_every_period_or_at_once_when_forced() -> None:
    state = core()
    assert state.heartbeat_due(0.0)
    assert not state.heartbeat_due(5.0)
    assert state.heartbeat_due(5.0, forced=True)  # a cancel arrived
    assert not state.heartbeat_due(14.0)
    assert state.heartbeat_due(15.0)


# -- successors and withdrawal -------------------------------------------------------------------


def test_a_successor_takes_over_its_predecessors_slot_and_reservation() -> None:
    state = core(vcpus=2)
    state.claimed([job(vcpus=2), job(vcpus=1), job(vcpus=2)])
    first = state.launch()
    assert first is not None
    successor = state.successor(first, now=0.0)
    assert successor is not None and successor.slot == first.slot and successor.reserved == Capacity(2, 64)
    assert state.ended(first, successor) is None  # the slot stays busy: nothing fresh
    assert state.used == Capacity(2, 64)
    assert state.successor(successor, now=0.1) is not None  # 2 vCPUs fit in the 2-vCPU slot


def test_a_successor_must_fit_in_the_slot() -> None:
    state = core(vcpus=4)
    state.claimed([job(vcpus=1), job(vcpus=2)])
    first = state.launch()
    assert first is not None
    assert state.successor(first, now=0.0) is None
    assert len(state.pending) == 1


def test_a_held_successor_is_withdrawn_after_the_hold_only_when_a_slot_is_free() -> None:
    state = core(vcpus=2)
    state.claimed([job(), job(), job(), job()])
    first = state.launch()
    second = state.launch()
    assert first is not None and second is not None
    held = state.successor(first, now=10.0)
    assert held is not None
    assert not state.should_withdraw(held, 10.0 + HOLD_SECONDS / 2)  # the 50 ms rule
    assert not state.should_withdraw(held, 10.0 + HOLD_SECONDS)  # no slot is free
    behind = state.successor(second, now=10.0)
    assert state.ended(second, behind) is None  # `second` ends: its successor keeps the slot
    assert not state.should_withdraw(held, 10.0 + HOLD_SECONDS)
    assert state.ended(behind, None) is None  # and ends: nothing queued, the slot is free
    assert state.should_withdraw(held, 10.0 + HOLD_SECONDS)
    held.marked = True
    assert state.to_unmark(held) == held.key  # out of the journal before it is queued again
    state.withdrawn(held)
    assert state.pending[0] == held.launch and held.launch.job_id not in state.running
    fresh = state.launch()
    assert fresh is not None and fresh.launch == held.launch and fresh.slot != first.slot


# -- cancels (the heartbeat's answer) ------------------------------------------------------------


def test_cancel_of_prefetched_held_and_running_jobs() -> None:
    state = core(vcpus=1)
    running, held, prefetched, kept = job(), job(), job(), job()
    state.claimed([running, held, prefetched, kept])
    state.prefetch.rate = 100.0  # 5 jobs expected before the next busy turn: all journaled ahead
    keys = state.to_premark()
    state.premarked_on_disk(keys)
    first = state.launch()
    assert first is not None
    successor = state.successor(first, now=0.0)
    assert successor is not None
    answer = state.stop_attempts([(j.job_id, j.attempt) for j in (running, held, prefetched)])
    assert {a.launch for a in answer.kill} == {running, held}
    assert list(state.pending) == [kept]  # the prefetched one is dropped
    assert (prefetched.job_id, 1) in answer.unjournal  # journaled ahead: its record is ended
    assert state.ended(first, successor) is None
    assert state.ended(successor, None) is not None  # the slot is free again: `kept` starts
    assert state.used == Capacity(1, 64)


def test_a_stale_attempt_in_the_answer_kills_nothing() -> None:
    state = core()
    launch = job(attempt=2)
    state.claimed([launch])
    state.launch()
    answer = state.stop_attempts([(launch.job_id, 1)])
    assert answer.kill == [] and answer.unjournal == []


# -- the attempt journal -------------------------------------------------------------------------


def test_every_hand_off_is_journaled_first() -> None:
    state = core(vcpus=2)
    state.claimed([job() for _ in range(6)])
    keys = state.to_premark()
    assert len(keys) == 2  # what fits in the free vCPUs (no rate yet)
    assert state.to_premark() == []  # once each
    state.premarked_on_disk(keys[:1])
    on_disk, not_yet = state.launch(), state.launch()
    assert on_disk is not None and not_yet is not None
    assert state.to_mark(on_disk) is None  # premarked and synced: nothing to wait for
    assert state.to_mark(not_yet) == not_yet.key  # its worker journals it before the hand-off
    held = state.successor(on_disk, 0.0)
    assert held is not None and state.to_mark(held) == held.key
    state.journaled(held)
    assert state.to_mark(held) is None


def test_the_journal_window_ahead_covers_two_turns_at_the_rate() -> None:
    """Journaled ahead once a turn: what the workers will take until the turn after next, so
    short jobs (function calls) do not outrun it and sync the journal themselves, per job."""
    state = core(vcpus=2)
    state.claimed([job() for _ in range(2000)])
    launch_all(state)  # no free vCPUs: only the rate decides
    state.prefetch.rate = 1000.0
    assert len(state.to_premark()) == 100  # 2 x 50 ms at 1,000 jobs/s
    state.prefetch.turn_took(0.2)  # slow turns (a loaded database): the window spans them too
    assert len(state.to_premark()) == 500 - 100  # 2 x (50 + 200) ms, less those journaled already


def test_only_terminal_reports_end_journal_records() -> None:
    state = core()
    launch = job()
    state.report(launch, JobStatus.STARTING, 1.0)
    state.report(launch, JobStatus.RUNNING, 2.0)
    state.report(launch, JobStatus.SUCCEEDED, 3.0, exit_code=0)
    reports = state.take_reports()
    assert state.reports == []
    assert state.reports_delivered(reports) == [(launch.job_id, 1)]
    state.report(launch, JobStatus.FAILED, 4.0)
    state.reports_failed(reports)  # a failed flush keeps its reports first, for the next one
    assert [r.status for r in state.take_reports()] == [
        JobStatus.STARTING,
        JobStatus.RUNNING,
        JobStatus.SUCCEEDED,
        JobStatus.FAILED,
    ]


def test_at_stop_what_never_started_leaves_the_journal() -> None:
    state = core(vcpus=2)
    state.claimed([job() for _ in range(4)])
    ahead = state.to_premark()
    taken = state.launch()
    begun = state.launch()
    assert taken is not None and begun is not None
    begun.begun = True
    state.stop()
    assert set(state.never_started()) == {*ahead} - {begun.key} | {taken.key}


def test_at_stop_the_held_hand_offs_are_named_for_withdrawal_and_nothing_is_journaled_ahead() -> None:
    state = core(vcpus=2)
    state.claimed([job() for _ in range(6)])
    first, second = launch_all(state)
    first.begun = second.begun = True
    held = state.successor(first, 0.0)
    assert held is not None
    held.begun, held.handoff = True, "held behind first"
    first.handoff = "running"  # a fresh slot's job is never held: not named
    state.stop()
    assert state.held_in_runtime() == ["held behind first"]
    assert state.handed_over() == 3
    assert state.to_premark() == []
    state.withdrawn(held)  # the stop withdrew it: it is queued again, and no longer handed over
    assert state.handed_over() == 2 and state.pending[0] == held.launch


# -- exits in any order, and no capacity leak ----------------------------------------------------


def test_exits_in_any_order_give_all_capacity_back() -> None:
    for order in itertools.permutations(range(4)):
        state = core(vcpus=4)
        state.claimed([job() for _ in range(8)])
        started = launch_all(state)
        refills = [state.ended(started[i], None) for i in order]  # each exit starts the next
        for refill in reversed(refills):
            assert refill is not None and state.ended(refill, None) is None
        assert state.used == Capacity(0, 0) and not state.running and not state.pending


class ExecutorMachine(RuleBasedStateMachine):
    """A driver doing whatever a worker, the launcher or the heartbeat may do, in any order.
    The capacity in use always equals the live slots' reservations; all of it comes back."""

    @initialize(vcpus=st.integers(1, 4), memory=st.sampled_from([256, 1024]))
    def setup(self, vcpus: int, memory: int) -> None:
        self.state = core(vcpus=vcpus, memory_mb=memory, max_running=6)
        self.slots: dict[int, list[Attempt]] = {}  # slot -> [running, held successor?]
        self.now = 0.0

    @rule(sizes=st.lists(st.tuples(st.integers(1, 2), st.sampled_from([64, 128])), min_size=1, max_size=4))
    def claim(self, sizes: list[tuple[int, int]]) -> None:
        fits = [
            s for s in sizes if s[0] <= self.state.capacity.vcpus and s[1] <= self.state.capacity.memory_mb
        ]
        self.state.claimed([job(v, m) for v, m in fits])

    @rule(pipelined=st.booleans())
    def launch(self, pipelined: bool) -> None:
        """A worker takes the next job; pipelined, it hands the launcher a successor at once."""
        if (attempt := self.state.launch()) is not None:
            self.slots[attempt.slot] = [attempt]
            if pipelined and (successor := self.state.successor(attempt, self.now)) is not None:
                self.slots[attempt.slot].append(successor)

    @precondition(lambda self: self.state.pending and any(len(a) == 1 for a in self.slots.values()))
    @rule(data=st.data())
    def hand_successor(self, data: st.DataObject) -> None:
        slot = data.draw(st.sampled_from(sorted(s for s, a in self.slots.items() if len(a) == 1)))
        if (successor := self.state.successor(self.slots[slot][0], self.now)) is not None:
            self.slots[slot].append(successor)

    @precondition(lambda self: any(len(a) == 2 for a in self.slots.values()))
    @rule(data=st.data())
    def withdraw(self, data: st.DataObject) -> None:
        """The launcher's wait for the slot's running job timed out: the held one may go."""
        slot = data.draw(st.sampled_from(sorted(s for s, a in self.slots.items() if len(a) == 2)))
        self.now += HOLD_SECONDS
        if self.state.should_withdraw(self.slots[slot][1], self.now):
            self.state.withdrawn(self.slots[slot].pop())

    @precondition(lambda self: bool(self.slots))
    @rule(data=st.data())
    def exit(self, data: st.DataObject) -> None:
        slot = data.draw(st.sampled_from(sorted(self.slots)))
        self._end(slot)

    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        keys = self.state.held()
        if keys:
            chosen = data.draw(st.lists(st.sampled_from(keys), max_size=3))
            self.state.stop_attempts(chosen)  # the killed ones exit like any other

    @rule(dt=st.sampled_from([0.01, HOLD_SECONDS]))
    def tick(self, dt: float) -> None:
        self.now += dt

    def _end(self, slot: int) -> None:
        attempts = self.slots.pop(slot)
        fresh = self.state.ended(attempts[0], attempts[1] if len(attempts) == 2 else None)
        if len(attempts) == 2:
            self.slots[slot] = [attempts[1]]
        if fresh is not None:
            self.slots[fresh.slot] = [fresh]

    @invariant()
    def capacity_in_use_is_the_live_slots(self) -> None:
        used = [attempts[0].reserved for attempts in self.slots.values()]
        assert self.state.used == Capacity(sum(c.vcpus for c in used), sum(c.memory_mb for c in used))
        assert self.state.free.vcpus >= 0 and self.state.free.memory_mb >= 0
        taken = {a.launch.job_id for attempts in self.slots.values() for a in attempts}
        assert taken == set(self.state.running)
        assert not taken & {j.job_id for j in self.state.pending}

    def teardown(self) -> None:
        while self.slots:  # every job exits: all capacity comes back
            self._end(next(iter(self.slots)))
        self.state.pending.clear()
        assert self.state.used == Capacity(0, 0) and not self.state.running


ExecutorMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
test_no_capacity_leaks = ExecutorMachine.TestCase
