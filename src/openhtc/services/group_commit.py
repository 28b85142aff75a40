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
MAX_GROUP_JOBS = 5000
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


# what a group's transactions did, for its answers: the calls served, those that reported (in
# the order of the group's reports), the group commit (None: nothing to write), the held
# jobs' records, and its time
Served = tuple[list["Call"], list["Call"], Group | None, dict[int, JobRecord], float]


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
                while not self._calls and not self.services.notify.closing:
                    self._cond.wait(1.0)
                # nothing queued (as last seen): the claims take nothing and weigh nothing
                idle = self.agents.idle_known(self.agents.work_seen(), time.monotonic())
                take = _group_size(self._calls, not idle)
                group, self._calls = self._calls[:take], self._calls[take:]
                closing = self.services.notify.closing
            if closing:
                for call in group:
                    call.future.set_exception(Unavailable("the server is stopping"))
                if not group:
                    return
                continue
            self.run(group)

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
        return served, report_of, result, reads.records, now

    def _want(
        self, c: Call, claims: list[ClaimWant], region: str, architectures: tuple[str, ...], row: Any
    ) -> None:
        if c.max_jobs <= 0 or c.free.vcpus <= 0 or not architectures:
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
        claims.append(ClaimWant(c.agent_id, region, architectures, c.free, c.max_jobs, max_timeout))

    def _answer(
        self,
        served: list[Call],
        report_of: list[Call],
        group: Group | None,
        held_records: dict[int, JobRecord],
        now: float,
    ) -> None:
        """After the commit: count, notify, and answer every call of the group."""
        s = self.services
        claimed: list[list[JobState]] = group.claimed if group is not None else []
        released = group.released if group is not None else set()
        if group is not None:
            self._tell(group, report_of, claimed, released, now)
        records = {**held_records, **(group.records if group is not None else {})}
        invalid = group.invalid if group is not None else {}
        changed = group.changed if group is not None else {}
        index = {id(c): i for i, c in enumerate(report_of)}
        launches: dict[int, list[JobLaunch]] = {}
        if any(claimed):
            every = self._launches([job for jobs in claimed for job in jobs])
            at = 0
            for i, jobs in enumerate(claimed):
                launches[i] = every[at : at + len(jobs)]
                at += len(jobs)
        for c in served:
            leases = launches.get(c.claim, []) if c.claim is not None else []
            if c.claim_only:
                s.metrics.jobs.claimed(claimed[c.claim] if c.claim is not None else [], now)
                c.future.set_result(leases)
                continue
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
            if c.claim is not None:
                s.metrics.jobs.claimed(claimed[c.claim], now)
            out.leases = leases
            c.future.set_result(out)

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


def _group_size(calls: list[Call], claims: bool) -> int:
    """How many of the queued calls (oldest first) the next group takes: at least one.
    ``claims``: whether their claims count (they may take jobs)."""
    jobs = 0.0
    for n, call in enumerate(calls):
        if n >= MAX_GROUP:
            return n
        jobs += len(call.reports) / 3
        if claims and not call.draining and call.free.vcpus > 0:
            jobs += min(call.max_jobs, call.free.vcpus)
        if n and jobs > MAX_GROUP_JOBS:
            return n
    return len(calls)
