"""Group commit of the agents' exchanges: two writer threads per server serve them all.

An exchange (or a woken long poll's claim) is queued here and waits on a future: it holds no
thread of the server's pool and no database connection while it waits. A writer thread takes
every call queued at that moment as a group and serves it in one transaction, whatever its size
(store/exchanges.py): its reads (the agents' rows, their held jobs' records, their leases no
report reached, whether anything is queued), then its writes: every report of the group, the
lost leases re-queued, and one claim for all the agents that want work, split between them by
their free capacity, committed in the same round trip as its flush. (Idle long polls: a read,
and a write only if needed.)
While it runs, the next group gathers. So under load the calls share transactions instead of
queueing for the pool's threads and connections, and a server's write transactions never
compete with each other (only with the other servers' groups, on PostgreSQL's row locks).

Latency (``_take``): a group takes the calls carrying reports first, and is bounded by its work;
a server hands out at most CLAIM_WINDOW leases no report has reached yet, so the reports they
bring back wait for about one group, not for a burst of claims; the jobs wait in the database's
queue meanwhile. A group with reports and claims commits its reports first and claims in a
transaction of its own (``_claims``): a failed claim leaves the reports acknowledged.

Every guarantee of a single exchange holds for each member of a group (services/agents.py):
the token and incarnation check before anything of it is written (a member that fails it gets
its error, the others go on), duplicate reports acknowledged and not applied, a report for an
attempt not the agent's refused and its attempt killed, an invalid one refused alone, lost
leases re-queued after two exchanges missed them, nothing claimed for a lost or draining agent.
A group whose transaction fails is served again one call at a time, so one call's failure is
its own.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from openhtc.domain import lifecycle
from openhtc.domain.allocation import ENDS_AT_LABEL
from openhtc.domain.errors import InsufficientStorage, OpenHTCError, Unavailable
from openhtc.domain.lifecycle import JobRecord
from openhtc.domain.models import AttemptReport, Capacity, JobLaunch
from openhtc.services.executors import ExecutorService
from openhtc.services.notify import EVERYTHING, task_key
from openhtc.services.service_set import ServiceSet
from openhtc.store.agent_rows import AgentState
from openhtc.store.allocation import PILOT_LABEL
from openhtc.store.exchanges import ClaimWant, Group, Reads, Work, state_of
from openhtc.store.functions import ReportedResult
from openhtc.store.transitions import Applied, JobState

log = logging.getLogger("openhtc.agents")
Attempt = tuple[int, int]
# A group's size at most, in calls and in jobs (a job's reports count a third each, a claim what
# it may take): bounds a transaction's length, its locks, and so the wait of the calls behind it.
MAX_GROUP = 256
MAX_GROUP_JOBS = 2000
# Leases a server hands out that no report has reached yet, at most (a window): a claim beyond it
# waits (CLAIM_HOLD_SECONDS at most, then takes nothing), so the reports its leases bring back
# never queue for more than about one group. Leases older than UNREPORTED_SECONDS leave the
# count (their agent reports elsewhere, or was lost).
CLAIM_WINDOW = 2000
CLAIM_HOLD_SECONDS = 2.0
UNREPORTED_SECONDS = 10.0
# Writers per server: while one group waits for PostgreSQL the next is served (their locks are
# taken in one order: agents' rows, job rows, counter rows; claims skip each other's rows)
WRITERS = 2


@dataclass(slots=True)
class Exchanged:
    """An exchange's answer (the route adds what only the wire needs)."""

    region: str
    architectures: list[str]
    acked: list[tuple[int, int, int]] = field(default_factory=list)
    refused: list[Attempt] = field(default_factory=list)
    leases: list[JobLaunch] = field(default_factory=list)
    kill: list[Attempt] = field(default_factory=list)
    suspect: bool = False  # it did not list some of its claimed leases: answer now, no long poll


class Fleet(Protocol):
    """What the writer needs of the agent service (services/agents.py)."""

    services: ServiceSet
    executors: ExecutorService

    def work_seen(self) -> int: ...
    def heard(self, now: float) -> None: ...
    def check_state(
        self, agent_id: str, state: AgentState, token_region: str, token_hash: str | None
    ) -> AgentState: ...
    def remember(
        self, agent_id: str, incarnation: str, token_hash: str | None, state: AgentState, read_at: float
    ) -> None: ...
    def beat(self, agent_id: str, now: float) -> None: ...
    def forget(self, agent_id: str) -> None: ...
    def drain(self, agent_id: str) -> None: ...
    def idle_known(self, mark: int, began: float) -> bool: ...
    def idle_seen(self, mark: int, began: float) -> None: ...
    def save_results(
        self,
        agent_id: str,
        fresh: Sequence[tuple[int, AttemptReport]],
        results: dict[Attempt, ReportedResult],
    ) -> None: ...


@dataclass(slots=True, eq=False)
class Call:
    """One exchange (``claim_only``: a woken long poll's claim) waiting for its group."""

    agent_id: str
    incarnation: str = ""
    held: Sequence[Attempt] = ()
    reports: Sequence[tuple[int, AttemptReport]] = ()
    free: Capacity = field(default_factory=lambda: Capacity(0, 0))
    max_jobs: int = 0
    draining: bool = False
    token_region: str = "*"
    token_hash: str | None = None
    exchange_seq: int | None = None
    results: dict[Attempt, ReportedResult] | None = None
    claim_only: bool = False
    region: str = ""  # a claim-only call's (an exchange's comes from its agent's row)
    architectures: tuple[str, ...] = ()
    future: concurrent.futures.Future[Any] = field(default_factory=concurrent.futures.Future)
    # filled while its group is served
    out: Exchanged | None = None
    fresh: list[tuple[int, AttemptReport]] = field(default_factory=list)
    duplicates: list[tuple[int, AttemptReport]] = field(default_factory=list)  # seqs applied before
    missing: set[Attempt] = field(default_factory=set)  # unreported leases it did not list
    claim: int | None = None  # its index among the group's claims
    queued_at: float = field(default_factory=time.monotonic)
    cap: int | None = None  # the jobs its claim may take in its group (the window's share)


# what a group's transactions did, for its answers: the calls served, those that reported (in
# the order of the group's reports), the group commit (None: nothing to write), the held
# jobs' records, its time, and its claims when they wait for a transaction of their own (its
# reports committed first: ``ExchangeWriter._claims``)
Served = tuple[list["Call"], list["Call"], Group | None, dict[int, JobRecord], float, Work | None]


class ExchangeWriter:
    """The writers of one server (WRITERS threads, started at the first call)."""

    def __init__(self, agents: Fleet) -> None:
        self.agents = agents
        self.services = agents.services
        self._cond = threading.Condition()
        self._calls: list[Call] = []
        self._thread: threading.Thread | None = None
        # agent -> highest seq applied per attempt through this server: a cache (services/agents.py)
        self.seqs: dict[str, dict[Attempt, int]] = {}
        # agent -> the claimed leases its last exchange through this server did not list
        self.unheld: dict[str, set[Attempt]] = {}
        # job -> when its lease was handed out (monotonic), until a report of it is served
        self.unreported: dict[int, float] = {}

    def backlog(self) -> int:
        """Calls waiting for a group (not counting the one being served)."""
        return len(self._calls)

    def forget(self, agent_id: str) -> None:
        """The agent registered again or was marked lost: what was kept of it goes."""
        with self._cond:
            self.seqs.pop(agent_id, None)
            self.unheld.pop(agent_id, None)

    def submit(self, call: Call) -> concurrent.futures.Future[Any]:
        with self._cond:
            if self.services.notify.closing:
                call.future.set_exception(Unavailable("the server is stopping"))
                return call.future
            self._calls.append(call)
            if self._thread is None:
                for _ in range(WRITERS):
                    self._thread = threading.Thread(target=self._loop, name="agent-exchanges", daemon=True)
                    self._thread.start()
            self._cond.notify()
        return call.future

    def _loop(self) -> None:
        while True:
            with self._cond:
                while True:
                    closing = self.services.notify.closing
                    if closing:
                        group, self._calls = self._calls, []
                        break
                    if not self._calls:
                        self._cond.wait(1.0)
                        continue
                    # nothing queued (as last seen): the claims take nothing and weigh nothing
                    now = time.monotonic()
                    idle = self.agents.idle_known(self.agents.work_seen(), now)
                    group, rest = _take(self._calls, not idle, self._budget(), now)
                    if group:
                        self._calls = rest
                        break
                    # every call is a claim waiting for the window: until reports free some of
                    # it (the writer serving them notifies), a call comes, or a hold ends
                    oldest = min(c.queued_at for c in self._calls)
                    self._cond.wait(max(0.005, CLAIM_HOLD_SECONDS - (now - oldest)))
            if closing:
                for call in group:
                    call.future.set_exception(Unavailable("the server is stopping"))
                if not group:
                    return
                continue
            self.run(group)

    def _budget(self) -> int:
        """The jobs the next group may hand out (under ``_cond``): the window less the leases
        no report has reached yet."""
        now = time.monotonic()
        unreported = self.unreported
        if unreported and now - next(iter(unreported.values())) > UNREPORTED_SECONDS:
            for job_id in [j for j, t in unreported.items() if now - t > UNREPORTED_SECONDS]:
                del unreported[job_id]
        return max(0, CLAIM_WINDOW - len(unreported))

    def run(self, group: list[Call]) -> None:
        """Serve a group; if its transactions fail, each call alone (a failure is its own).
        Once they committed nothing is served again (a claim would take more jobs)."""
        try:
            done = self._serve(group)
        except Exception as exc:
            pending = [c for c in group if not c.future.done()]
            if len(pending) > 1 and not isinstance(exc, (Unavailable, InsufficientStorage)):
                log.warning(
                    "agents: a group of %d calls failed (%s); serving them one by one", len(group), exc
                )
                for call in pending:
                    self.run([call])
                return
            if not isinstance(exc, OpenHTCError):
                log.exception("agents: an exchange failed")
            for call in pending:
                call.future.set_exception(exc)
            return
        try:
            self._answer(*done)
        except Exception as exc:
            log.exception("agents: answering a group failed")
            for call in group:
                if not call.future.done():
                    call.future.set_exception(exc)

    def _launches(self, jobs: list[JobState]) -> list[JobLaunch]:
        """The claimed jobs' launches, read after the group's commit: read again once when that
        fails (a database blip), since the claims are committed and an agent that does not list
        the leases it got (no ``exchange_seq``) would never give them back."""
        try:
            return self.agents.executors.launches(jobs)
        except Exception as exc:
            log.warning("agents: reading the launches of a committed claim failed (%s); once more", exc)
            time.sleep(0.1)
            return self.agents.executors.launches(jobs)

    # -- one group ------------------------------------------------------------------------------

    def _serve(self, group: list[Call]) -> Served:
        """The group's reads and its write transaction; what ``_answer`` needs after them."""
        s, agents = self.services, self.agents
        now = s.clock.now()
        began = time.monotonic()
        mark = agents.work_seen()  # before the reads: work signalled after them voids "nothing queued"
        agents.heard(now)
        exchanges = [c for c in group if not c.claim_only]
        for c in group:  # served afresh (again, alone, after its group failed)
            c.fresh, c.duplicates, c.missing, c.claim, c.out = [], [], set(), None, None
        with self._cond:
            for c in exchanges:
                seqs = self.seqs.get(c.agent_id, {})
                for pair in c.reports:
                    seq, r = pair
                    (c.fresh if seq > seqs.get((r.job_id, r.attempt), 0) else c.duplicates).append(pair)
                    self.unreported.pop(r.job_id, None)  # its report is served: out of the window
            if any(c.reports for c in exchanges):
                self._cond.notify()  # a writer may wait for the window
        # the held jobs' records: those its fresh reports name come from the group commit (which
        # loads them under lock), the others from this read
        held_jobs = {j for c in exchanges for j, _ in c.held} - {
            r.job_id for c in exchanges for _, r in c.fresh
        }
        reconciling = {c.agent_id for c in exchanges if c.exchange_seq is not None}
        wants_claim = any(c.max_jobs > 0 and c.free.vcpus > 0 and not c.draining for c in group)
        idle = agents.idle_known(mark, began)
        want_queue = wants_claim and not idle
        work = Work()
        later = Work()  # the claims, when the group writes reports too (see _claims)
        report_of: list[Call] = []
        served: list[Call] = []

        def plan(rows: dict[str, Any], reads: Reads) -> Work:
            """What the group writes, from what it read (and each call's check)."""
            queued = want_queue and reads.queued
            if want_queue and not reads.queued:
                agents.idle_seen(mark, began)
            for c in group:
                if c.claim_only:
                    if queued:
                        self._want(c, work.claims, c.region, c.architectures, rows.get(c.agent_id))
                    served.append(c)
                    continue
                try:
                    state = agents.check_state(
                        c.agent_id,
                        state_of(rows.get(c.agent_id), c.incarnation),
                        c.token_region,
                        c.token_hash,
                    )
                except Exception as exc:  # MustRegister (409) or PermissionDenied (403): its own
                    agents.forget(c.agent_id)  # a record this server trusted is wrong: never reused
                    c.future.set_exception(exc)
                    continue
                served.append(c)
                agents.remember(c.agent_id, c.incarnation, c.token_hash, state, began)
                agents.beat(c.agent_id, now)  # only once the caller is known to speak for this agent
                c.out = Exchanged(state.region, state.architectures)
                if c.draining:
                    agents.drain(c.agent_id)
                    if not state.draining:  # written once, not at every exchange of a draining agent
                        work.draining.append((c.agent_id, c.incarnation))
                if c.results and c.fresh:  # before the ends: a call read as ended has its result
                    agents.save_results(c.agent_id, c.fresh, c.results)
                if c.fresh:
                    work.reports.append((c.agent_id, [r for _, r in c.fresh]))
                    report_of.append(c)
                if c.exchange_seq is not None:
                    with self._cond:
                        suspected = self.unheld.get(c.agent_id, set())
                    reported = {(r.job_id, r.attempt) for _, r in c.reports}
                    missing = reads.unreported.get(c.agent_id, set()) - set(c.held) - reported
                    lost = missing & suspected
                    c.missing = missing - lost
                    if lost:
                        work.releases.append((c.agent_id, lost))
                if not c.draining and queued:
                    self._want(c, work.claims, state.region, tuple(state.architectures), rows.get(c.agent_id))
            if work.claims and (work.reports or work.releases or work.draining):
                later.claims, work.claims = work.claims, []  # the reports commit first, alone
            return work

        ids = {c.agent_id for c in group}
        lease = s.settings.lease_seconds
        results = any(c.results and c.fresh for c in exchanges)
        if (want_queue or any(c.fresh for c in exchanges)) and not results:
            # reads and writes in one transaction (function results are stored in one of their
            # own before the ends are written: then two)
            rows, reads, result = s.queue.exchange_group(
                ids, held_jobs, reconciling, want_queue, plan, now, lease
            )
        else:  # likely nothing to write (idle long polls): a read, and a write only if needed
            rows, reads = s.queue.exchange_reads(ids, held_jobs, reconciling, want_queue)
            plan(rows, reads)
            result = s.queue.group_commit(now, lease, work) if work.any() else None
        s.metrics.agent_groups.inc()
        s.metrics.agent_group_calls.inc(len(group))
        return served, report_of, result, reads.records, now, later if later.claims else None

    def _want(
        self, c: Call, claims: list[ClaimWant], region: str, architectures: tuple[str, ...], row: Any
    ) -> None:
        max_jobs = c.max_jobs if c.cap is None else min(c.max_jobs, c.cap)
        if max_jobs <= 0 or c.free.vcpus <= 0 or not architectures:
            return
        # a Slurm pilot's agent takes only jobs whose timeout fits its walltime left (issue 17);
        # an agent whose labels name no end has none (asked only of the others: a read each)
        allocation = self.services.allocation
        labels = (row.labels if row is not None else None) or {}
        ends = PILOT_LABEL in labels or ENDS_AT_LABEL in labels
        max_timeout = allocation.max_timeout(c.agent_id) if allocation is not None and ends else None
        if max_timeout is not None and max_timeout < 0:
            return
        c.claim = len(claims)
        claims.append(ClaimWant(c.agent_id, region, architectures, c.free, max_jobs, max_timeout))

    def _answer(
        self,
        served: list[Call],
        report_of: list[Call],
        group: Group | None,
        held_records: dict[int, JobRecord],
        now: float,
        later: Work | None,
    ) -> None:
        """After the commit: count, notify, and answer every call of the group: first those that
        take no job, then (``later``: the claims' own transaction) the claimants, their
        launches built last."""
        s = self.services
        claimed: list[list[JobState]] = group.claimed if group is not None else []
        released = group.released if group is not None else set()
        if group is not None:
            self._tell(group, report_of, claimed, released, now)
        records = {**held_records, **(group.records if group is not None else {})}
        invalid = group.invalid if group is not None else {}
        changed = group.changed if group is not None else {}
        index = {id(c): i for i, c in enumerate(report_of)}

        def answer(c: Call, jobs: list[JobState], leases: list[JobLaunch]) -> None:
            if c.claim_only or c.claim is not None:  # a claim call (perhaps of nothing)
                s.metrics.jobs.claimed(jobs, now)
            if c.claim_only:
                c.future.set_result(leases)
                return
            out = c.out
            assert out is not None
            pos = index.get(id(c))
            if pos is None:
                self._fence(c, out, records, set(), set())
            else:
                self._fence(c, out, records, invalid.get(pos, set()), changed.get(pos, set()))
            with self._cond:
                if c.exchange_seq is not None:
                    if c.missing:  # the next exchange re-queues those it does not list either
                        out.suspect = True
                        self.unheld[c.agent_id] = c.missing
                    else:
                        self.unheld.pop(c.agent_id, None)
            out.leases = leases
            c.future.set_result(out)

        if later is not None:  # the reports are committed: answer who claims nothing, then claim
            for c in served:
                if c.claim is None:
                    answer(c, [], [])
            claimed = self._claims(later, now, [c for c in served if c.claim is not None])
        # the calls that took no job are answered first: the launches are built after
        claiming = [c for c in served if c.claim is not None and claimed[c.claim]]
        for c in served:
            if not c.future.done() and (c.claim is None or not claimed[c.claim]):
                answer(c, [], [])
        if claiming:
            jobs = [claimed[c.claim or 0] for c in claiming]
            handed = time.monotonic()
            with self._cond:
                for mine in jobs:
                    for job in mine:
                        self.unreported[job.id] = handed
            every = self._launches([job for mine in jobs for job in mine])
            at = 0
            for c, mine in zip(claiming, jobs, strict=True):
                answer(c, mine, every[at : at + len(mine)])
                at += len(mine)

    def _claims(self, work: Work, now: float, claimants: list[Call]) -> list[list[JobState]]:
        """A group's claims in a transaction of their own, after its reports committed: when
        they fail, a claimant's reports are acknowledged all the same (an exchange is answered
        with no lease, a woken long poll's claim gets the error). Nothing is served again."""
        s = self.services
        try:
            group = s.queue.group_commit(now, s.settings.lease_seconds, work)
        except Exception as exc:
            log.warning("agents: the claims of a group failed (%s); its reports stand", exc)
            for c in claimants:
                if c.claim_only:
                    c.future.set_exception(
                        exc if isinstance(exc, OpenHTCError) else Unavailable("the claim failed; try again")
                    )
            return [[] for _ in work.claims]
        self._tell(group, [], group.claimed, set(), now)
        return group.claimed

    def _fence(
        self,
        c: Call,
        out: Exchanged,
        records: dict[int, JobRecord],
        invalid: set[int],
        changed: set[int],
    ) -> None:
        """Each report of the call acknowledged (a duplicate, or applied) or refused (an
        invalid transition, or not for the agent's current attempt: then killed too), and the
        held attempts the agent no longer owns killed. ``invalid``: positions in ``c.fresh``;
        ``changed``: the jobs its reports changed; ``records``: the jobs' records after the group."""
        agent_id = c.agent_id
        kill: set[Attempt] = set()
        out.acked.extend((r.job_id, r.attempt, seq) for seq, r in c.duplicates)
        with self._cond:
            seqs = self.seqs.setdefault(agent_id, {})
            for position, (seq, r) in enumerate(c.fresh):
                key = (r.job_id, r.attempt)
                rec = records.get(r.job_id)
                mine = rec is not None and rec.attempt == r.attempt and rec.executor_id == agent_id
                if position in invalid:  # refused; its attempt killed unless it is still the agent's
                    out.refused.append(key)
                    if not may_hold(agent_id, r.attempt, rec):
                        kill.add(key)
                elif mine or r.job_id in changed:
                    out.acked.append((r.job_id, r.attempt, seq))
                    seqs[key] = max(seq, seqs.get(key, 0))
                else:
                    out.refused.append(key)
                    kill.add(key)
            # what the agent holds no more needs no memory of its seqs
            keep = set(c.held) | {(r.job_id, r.attempt) for _, r in c.reports}
            for key in [k for k in seqs if k not in keep]:
                del seqs[key]
            if not seqs:
                self.seqs.pop(agent_id, None)
        kill.update(k for k in c.held if not may_hold(agent_id, k[1], records.get(k[0])))
        out.kill = sorted(kill)

    def _tell(
        self,
        group: Group,
        report_of: list[Call],
        claimed: list[list[JobState]],
        released: set[int],
        now: float,
    ) -> None:
        """The metrics and wake-ups of what the group changed, as single calls tell them."""
        s = self.services
        applied = group.applied
        claimed_ids = {job.id for jobs in claimed for job in jobs}
        if not claimed_ids and not released:
            by_reports = applied
        else:
            skip = claimed_ids | released
            by_reports = Applied(
                applied.at,
                [ch for ch in applied.changes if ch[0] not in skip],
                [e for e in applied.events if e[0] not in skip],
                applied.requeued,
            )
        if report_of:
            s.metrics.jobs.reported(sum(len(c.fresh) for c in report_of), by_reports)
            if by_reports.requeued:  # retried attempts wait in SUBMITTED_TO_RESCALE for the scheduler
                s.wakeups.schedule_round.set()
            if by_reports.changes and not s.notify.idle:
                self.agents.executors.notify_applied(by_reports)
            elif by_reports.changes:  # nobody waits, but a waiter about to subscribe must see
                s.notify.publish(())  # that something changed (notify.published())
        if group.first_invalid:
            log.warning("agents: invalid report(s) refused (%s)", group.first_invalid)
        if released:
            lost = Applied(
                applied.at,
                [ch for ch in applied.changes if ch[0] in released],
                [e for e in applied.events if e[0] in released],
                0,
            )
            log.warning("%d lease(s) agents never received re-queued", len(lost.changes))
            s.metrics.jobs.applied(lost)
            s.wakeups.schedule_round.set()
            s.notify.publish((EVERYTHING,))
        if claimed_ids and not s.notify.idle:
            s.notify.publish({task_key(job.task_id) for jobs in claimed for job in jobs})
        elif claimed_ids:  # as the embedded executor's claims: notify.published() moves
            s.notify.publish(())


def may_hold(agent_id: str, attempt: int, rec: JobRecord | None) -> bool:
    """Whether an attempt the agent lists as held is not to be killed: still its current one,
    or its current one that ended by its own report (acked, or not yet: the agent lists it until
    it is acked). A cancelled one is killed."""
    if lifecycle.still_holds(agent_id, attempt, rec):
        return True
    return (
        rec is not None
        and rec.attempt == attempt
        and rec.executor_id == agent_id
        and rec.terminal
        and not rec.cancelled
    )


def _take(calls: list[Call], claims: bool, budget: int, now: float) -> tuple[list[Call], list[Call]]:
    """The next group and the calls left queued (in their order). Calls carrying reports go
    first, oldest first, then the others: the reports waiting are served before more work is
    handed out. The group is bounded by its work (MAX_GROUP_JOBS: a job's reports count a third
    each, a claim what it may take), so no group waits behind a much larger one; and its claims
    by ``budget`` (CLAIM_WINDOW less the leases no report reached yet): a claim that would
    exceed it waits for a later group (a call with reports is served, its claim capped), for
    CLAIM_HOLD_SECONDS at most, then is served taking nothing. ``claims``: whether claims count
    (something is queued). At least one call is taken."""
    order = [c for c in calls if c.reports] + [c for c in calls if not c.reports]
    group: list[Call] = []
    jobs = 0.0
    for call in order:
        if len(group) >= MAX_GROUP or (group and jobs > MAX_GROUP_JOBS):
            break
        call.cap = None
        if claims and not call.draining and call.free.vcpus > 0 and call.max_jobs > 0:
            ask = min(call.max_jobs, call.free.vcpus)
            held = not call.reports and now - call.queued_at < CLAIM_HOLD_SECONDS
            if held and budget < ask and (group or budget <= 0):
                continue  # it waits for the window (a partial claim only heads a group)
            call.cap = min(ask, budget)
            budget -= call.cap
            jobs += call.cap
        jobs += len(call.reports) / 3
        group.append(call)
    if not group:  # every claim waits for the window: the writer waits for reports, or time
        return [], calls
    if len(group) == len(calls):
        return group, []
    chosen = {id(c) for c in group}
    return group, [c for c in calls if id(c) not in chosen]
