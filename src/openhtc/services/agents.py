"""The executor protocol for ``htc agent``: register, exchange and logs, served over HTTP.

The route (api/routes/agents.py) only decodes and encodes; the work is the in-process
protocol's (``ExecutorService``: register, report, claim, heartbeat) plus what a remote agent
needs on top of it:

- idempotent reports: each carries a per-attempt ``seq``; one at or below the highest applied
  is a duplicate, acknowledged and not applied again (a lost answer makes the agent resend);
- fencing answers: a report for an attempt that is not the agent's current one is refused and
  the attempt is in ``kill``, as is every held attempt the agent no longer owns;
- a liveness clock of its own (``agent_liveness_seconds``), separate from job leases: an agent
  not heard from that long is marked lost and its attempts recovered through the lifecycle
  (an infrastructure retry); it must register again before it is served;
- server suspicion: when no agent at all has called for longer than the liveness timeout (the
  server was down or cut off), no agent is marked lost until a liveness timeout after the
  first exchange heard again (or, if none ever comes, after three: the fleet is really gone).
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from collections import deque
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from openhtc.domain import lifecycle
from openhtc.domain.errors import InvalidTransition, PermissionDenied
from openhtc.domain.lifecycle import JobRecord
from openhtc.domain.models import AttemptReport, Capacity, JobLaunch
from openhtc.services.executors import ExecutorService
from openhtc.services.notify import EVERYTHING
from openhtc.services.service_set import ServiceSet
from openhtc.store.queue import AgentInfo

log = logging.getLogger("openhtc.agents")
Attempt = tuple[int, int]
BEAT_SECONDS = 1.0  # heartbeats and lease renewals are written this often, coalesced
# An idle fleet's claims find nothing queued: that answer is reused by every claim on this server
# until work is signalled, or for this long at most (a signal from another server may be lost)
IDLE_RECHECK_SECONDS = 1.0


class Waiter:
    """An exchange that long-polls for work (on the event loop); woken by ``AgentService``."""

    __slots__ = ("agent_id", "event", "loop", "queued", "region")

    def __init__(self, agent_id: str, region: str) -> None:
        self.agent_id = agent_id
        self.region = region
        self.loop = asyncio.get_running_loop()
        self.event = asyncio.Event()
        self.queued = False

    def wake(self) -> None:
        self.loop.call_soon_threadsafe(self.event.set)


class MustRegister(Exception):
    """The agent must register again before its next exchange (HTTP 409)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


@dataclass(slots=True)
class Registered:
    recovered: int
    kill: list[Attempt]


@dataclass(slots=True)
class Exchanged:
    region: str
    architectures: list[str]
    acked: list[tuple[int, int, int]] = field(default_factory=list)
    refused: list[Attempt] = field(default_factory=list)
    leases: list[JobLaunch] = field(default_factory=list)
    kill: list[Attempt] = field(default_factory=list)


class AgentService:
    def __init__(self, services: ServiceSet, executors: ExecutorService) -> None:
        self.services = services
        self.executors = executors
        self._lock = threading.Lock()
        self._seqs: dict[str, dict[Attempt, int]] = {}  # agent -> highest seq applied per attempt
        self._log_paths: dict[int, tuple[str, str, int]] = {}  # job id -> (task, parent job, index)
        self._draining: set[str] = set()  # agents that said they stop: their long polls answer
        now = services.clock.now()
        self._last_heard = now  # the last exchange of any agent (or this service's start)
        self._grace_until = now + self.liveness
        # Long polls wait in a FIFO per region; new work wakes one per region, and each woken
        # one that claimed something wakes the next: one claim's worth at a time, not a herd.
        self._waiters: dict[str, deque[Waiter]] = {}
        self._work = 0  # work signals so far: a claim that raced one claims again
        self._idle_seen: tuple[int, float] | None = None  # (work mark, monotonic): nothing queued
        services.wakeups.on_executor_work(self.work_arrived)
        # Heartbeats (liveness, lease renewals) are kept here and written once per BEAT_SECONDS
        # in one statement: an agent's liveness then lags by at most that much.
        self._beats: dict[str, float] = {}  # agent -> first exchange heard since the last write
        self._beat_lock = threading.Lock()  # one writer at a time
        self._beat_thread: threading.Thread | None = None

    @property
    def liveness(self) -> float:
        return self.services.settings.agent_liveness_seconds

    def next_call_seconds(self) -> float:
        """When an agent holding work calls again at the latest: well within its liveness, with
        jitter so a fleet started together spreads out."""
        base = min(self.services.settings.heartbeat_seconds, self.liveness / 3)
        return base * random.uniform(0.8, 1.0)

    def _heard(self, now: float) -> None:
        with self._lock:
            if now - self._last_heard > self.liveness:  # after a gap: the server suspects itself
                self._grace_until = now + self.liveness
            self._last_heard = now

    # -- the protocol ---------------------------------------------------------------------------

    def register(
        self,
        agent: AgentInfo,
        running: Collection[Attempt],
        may_have_started: Collection[Attempt],
    ) -> Registered:
        s = self.services
        now = s.clock.now()
        self._heard(now)
        applied, kill = s.queue.register_agent(
            agent, now, s.settings.lease_seconds, running, may_have_started
        )
        with self._lock:
            self._seqs.pop(agent.agent_id, None)
            self._draining.discard(agent.agent_id)
        if applied.changes:
            s.metrics.jobs.applied(applied)
            s.wakeups.schedule_round.set()
            s.notify.publish((EVERYTHING,))
        return Registered(len(applied.changes), kill)

    def exchange(
        self,
        agent_id: str,
        incarnation: str,
        held: Sequence[Attempt],
        reports: Sequence[tuple[int, AttemptReport]],
        free: Capacity,
        max_jobs: int,
        draining: bool,
        token_region: str = "*",
    ) -> Exchanged:
        """Heartbeat, reports and claim in one call. ``reports``: (seq, report) pairs.
        ``token_region``: the region the caller's agent token allows ("*": any)."""
        s = self.services
        now = s.clock.now()
        self._heard(now)
        reason, region, architectures = s.queue.agent_state(agent_id, incarnation)
        if reason is not None:
            raise MustRegister(reason)
        self._beat(agent_id, now)
        if token_region not in ("*", region):
            raise PermissionDenied(f"this agent token is for region {token_region}, not {region}")
        out = Exchanged(region, architectures)
        with self._lock:
            seqs = self._seqs.setdefault(agent_id, {})
            fresh = []
            for seq, report in reports:
                if seq <= seqs.get((report.job_id, report.attempt), 0):
                    out.acked.append((report.job_id, report.attempt, seq))  # a duplicate
                else:
                    fresh.append((seq, report))
        invalid: set[tuple[int, Attempt]] = set()  # (seq, attempt) of reports that broke a rule
        changed = self._apply(agent_id, fresh, invalid) if fresh else set()
        records = s.queue.records({j for j, _ in held} | {r.job_id for _, r in fresh})
        kill: set[Attempt] = set()
        with self._lock:
            for seq, r in fresh:
                key = (r.job_id, r.attempt)
                rec = records.get(r.job_id)
                mine = rec is not None and rec.attempt == r.attempt and rec.executor_id == agent_id
                if (seq, key) in invalid:  # refused; its attempt killed unless it is still the agent's
                    out.refused.append(key)
                    if not _may_hold(agent_id, r.attempt, rec):
                        kill.add(key)
                elif mine or r.job_id in changed:
                    out.acked.append((r.job_id, r.attempt, seq))
                    seqs[key] = max(seq, seqs.get(key, 0))
                else:
                    out.refused.append(key)
                    kill.add(key)
            # what the agent holds no more needs no memory of its seqs
            keep = set(held) | {(r.job_id, r.attempt) for _, r in reports}
            for key in [k for k in seqs if k not in keep]:
                del seqs[key]
        kill.update(k for k in held if not _may_hold(agent_id, k[1], records.get(k[0])))
        out.kill = sorted(kill)
        if not draining:
            out.leases = self.claim(agent_id, region, architectures, free, max_jobs)
        return out

    def _apply(
        self, agent_id: str, fresh: Sequence[tuple[int, AttemptReport]], invalid: set[tuple[int, Attempt]]
    ) -> set[int]:
        """Apply the reports; returns the jobs they changed. An invalid transition fails its
        whole transaction: then they are applied one at a time, and the invalid ones (added to
        ``invalid``) refused, so one bad report costs the agent none of its others."""
        try:
            applied = self.executors.report(agent_id, [r for _, r in fresh])
            return {change[0] for change in applied.changes}
        except InvalidTransition:
            pass  # nothing was applied (one transaction)
        changed: set[int] = set()
        first = ""
        for seq, r in fresh:
            try:
                applied = self.executors.report(agent_id, [r])
            except InvalidTransition as exc:
                invalid.add((seq, (r.job_id, r.attempt)))
                first = first or exc.message
                continue
            changed.update(change[0] for change in applied.changes)
        log.warning("agent %s: %d invalid report(s) refused (%s)", agent_id, len(invalid), first)
        return changed

    def drain(self, agent_id: str) -> None:
        """The agent stops: it gets no new job, and the long poll it may have open answers now."""
        with self._lock:
            self._draining.add(agent_id)
            mine = [w for q in self._waiters.values() for w in q if w.agent_id == agent_id]
        for waiter in mine:
            waiter.wake()

    # -- long polls -----------------------------------------------------------------------------

    def work_seen(self) -> int:
        """A mark to pass to ``wait``: work signalled after it wakes the waiter at once."""
        return self._work

    def wait(self, agent_id: str, region: str, seen: int) -> Waiter:
        """Queue a long poll (on the event loop) at the end of its region's FIFO."""
        waiter = Waiter(agent_id, region)
        with self._lock:
            if self._work != seen or agent_id in self._draining:
                waiter.event.set()  # work came while it claimed: claim again at once
            else:
                waiter.queued = True
                self._waiters.setdefault(region, deque()).append(waiter)
        return waiter

    def done_waiting(self, waiter: Waiter) -> None:
        with self._lock:
            if waiter.queued:
                waiter.queued = False
                queue = self._waiters.get(waiter.region)
                if queue is not None:
                    queue.remove(waiter)

    def pass_on(self, region: str) -> None:
        """A woken long poll claimed (there may be more work), or will not claim: wake the next.
        (Waking two when a claim came back full, up to 4 claiming at once, was tried: a quarter
        less throughput and 4-8x the round trips at 1,000 agents; performance.md.)"""
        with self._lock:
            waiter = self._pop(region)
        if waiter is not None:
            waiter.wake()

    def work_arrived(self) -> None:
        """Jobs became claimable (any thread): wake the first long poll of each region."""
        with self._lock:
            self._work += 1
            woken = [w for region in list(self._waiters) if (w := self._pop(region)) is not None]
        for waiter in woken:
            waiter.wake()

    def _pop(self, region: str) -> Waiter | None:
        queue = self._waiters.get(region)
        if not queue:
            return None
        waiter = queue.popleft()
        waiter.queued = False
        if not queue:
            del self._waiters[region]
        return waiter

    # -- heartbeats -----------------------------------------------------------------------------

    def _beat(self, agent_id: str, now: float) -> None:
        with self._lock:
            self._beats.setdefault(agent_id, now)
            start = self._beat_thread is None
            if start:
                self._beat_thread = threading.Thread(target=self._beat_loop, name="agent-beats", daemon=True)
        if start and self._beat_thread is not None:
            self._beat_thread.start()

    def _beat_loop(self) -> None:
        while not self.services.notify.closing:
            time.sleep(BEAT_SECONDS)
            try:
                self.flush_beats()
            except Exception:  # the database is away: the next round writes them
                log.warning("agents: could not write the heartbeats", exc_info=True)

    def flush_beats(self) -> None:
        """Write the heartbeats heard since the last write: one statement for them all."""
        with self._beat_lock:
            with self._lock:
                beats, self._beats = self._beats, {}
            if not beats:
                return
            try:
                self.services.queue.agent_beats(
                    beats.keys(), min(beats.values()), self.services.settings.lease_seconds
                )
            except Exception:
                with self._lock:  # kept for the next write
                    for agent_id, heard in beats.items():
                        self._beats[agent_id] = min(heard, self._beats.get(agent_id, heard))
                raise

    def draining(self, agent_id: str) -> bool:
        return agent_id in self._draining

    def claim(
        self, agent_id: str, region: str, architectures: Sequence[str], free: Capacity, max_jobs: int
    ) -> list[JobLaunch]:
        if max_jobs <= 0 or free.vcpus <= 0:
            return []
        # a Slurm pilot's agent takes only jobs whose timeout fits its walltime left (issue 17)
        allocation = self.services.allocation
        max_timeout = allocation.max_timeout(agent_id) if allocation is not None else None
        if max_timeout is not None and max_timeout < 0:
            return []
        # With nothing queued, one claim's read answers every claim on this server until work is
        # signalled (or IDLE_RECHECK_SECONDS pass): 1,000 idle agents' exchanges then cost the
        # database about one read a second, not one each.
        with self._lock:
            mark, seen = self._work, self._idle_seen
        began = time.monotonic()
        if seen is not None and seen[0] == mark and began - seen[1] < IDLE_RECHECK_SECONDS:
            return []
        leases = self.executors.claim(agent_id, region, architectures, free, max_jobs, max_timeout)
        if not leases and self.services.queue.nothing_queued_at >= began:
            with self._lock:  # the mark was taken before that read: work signalled since voids it
                self._idle_seen = (mark, began)
        return leases

    def check_liveness(self) -> int:
        """Mark lost the agents silent past their liveness (unless the server suspects itself);
        returns how many jobs that recovered."""
        s = self.services
        now = s.clock.now()
        # With several servers the agents' exchanges reach any of them: what any server heard
        # counts, from the agents' records (this runs on the leader only).
        self.flush_beats()  # this server's own, before it judges anyone silent
        heard = s.queue.last_agent_heartbeat()
        if heard is not None and heard > self._last_heard:
            self._heard(heard)
        with self._lock:
            quiet = now - self._last_heard
            # Agents call at staggered times: when the server is cut off, the first of them look
            # silent for a liveness timeout before the fleet as a whole does. An agent is lost only
            # while others are heard (quiet < half the timeout; agents with work call every
            # third of it at most), or once the whole fleet has been silent three timeouts.
            if now < self._grace_until or self.liveness / 2 < quiet < 3 * self.liveness:
                return 0
        applied, lost = s.queue.lose_agents(now - self.liveness, now)
        if lost:
            with self._lock:
                for agent_id in lost:
                    self._seqs.pop(agent_id, None)
        if applied.changes:
            s.metrics.jobs.applied(applied)
            s.wakeups.schedule_round.set()
            s.notify.publish((EVERYTHING,))
        return len(applied.changes)

    # -- logs -----------------------------------------------------------------------------------

    def append_logs(
        self, agent_id: str, chunks: Sequence[tuple[int, int, int, str]]
    ) -> list[tuple[int, int, int]]:
        """Write (job, attempt, offset, data) chunks into the attempts' logs; idempotent by
        offset. Returns (job, attempt, next offset) for each attempt: where the agent goes on
        from (a chunk past the end written so far is not written: the agent resends from there).
        Chunks for attempts that are not this agent's are dropped (and acknowledged)."""
        s = self.services
        records = s.queue.records({c[0] for c in chunks})
        paths = self._paths({c[0] for c in chunks})
        ends: dict[Attempt, int] = {}
        for job_id, attempt, offset, data in chunks:
            key = (job_id, attempt)
            rec = records.get(job_id)
            where = paths.get(job_id)
            if rec is None or where is None or rec.attempt != attempt or rec.executor_id != agent_id:
                ends[key] = offset + len(data.encode())
                continue
            path = s.logs.path(where[0], where[1], where[2], attempt)
            ends[key] = _write_at(path, offset, data.encode())
        return [(job, attempt, end) for (job, attempt), end in ends.items()]

    def _paths(self, job_ids: set[int]) -> dict[int, tuple[str, str, int]]:
        with self._lock:
            found = {j: p for j in job_ids if (p := self._log_paths.get(j)) is not None}
        missing = job_ids - found.keys()
        if missing:
            rows = self.services.queue.log_keys(missing)
            with self._lock:
                if len(self._log_paths) > 100000:
                    self._log_paths.clear()
                self._log_paths.update(rows)
            found.update(rows)
        return found


def _may_hold(agent_id: str, attempt: int, rec: JobRecord | None) -> bool:
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


def _write_at(path: Path, offset: int, data: bytes) -> int:
    """Write ``data`` at ``offset`` of the file unless it is there already; the file's end after."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab") as fh:
        size = fh.tell()
        if offset > size:  # a gap: the agent resends from what the server has
            return size
        if offset + len(data) > size:
            fh.write(data[size - offset :])
        return fh.tell()
