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

import random
import threading
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from openhtc.domain import lifecycle
from openhtc.domain.errors import InvalidTransition, PermissionDenied, ValidationFailed
from openhtc.domain.models import AttemptReport, Capacity, JobLaunch
from openhtc.services.executors import ExecutorService
from openhtc.services.notify import EVERYTHING, Key
from openhtc.services.service_set import ServiceSet
from openhtc.store.queue import AgentInfo

AGENT_WORK: Key = ("agent-work", None)  # jobs became claimable: waiting exchanges claim again
Attempt = tuple[int, int]


def agent_key(agent_id: str) -> Key:
    """One agent's own wake-up: its draining call ends the long poll it has open."""
    return ("agent", agent_id)


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
        # jobs became claimable: wake the exchanges that wait (long polls)
        services.wakeups.on_executor_work(lambda: services.notify.publish((AGENT_WORK,)))

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
        reason, region, architectures = s.queue.agent_beat(
            agent_id, incarnation, s.settings.lease_seconds, now
        )
        if reason is not None:
            raise MustRegister(reason)
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
        changed: set[int] = set()
        if fresh:
            try:
                applied = self.executors.report(agent_id, [r for _, r in fresh])
            except InvalidTransition as exc:  # nothing was applied (one transaction)
                raise ValidationFailed(exc.message, "reports") from None
            changed = {change[0] for change in applied.changes}
        records = s.queue.records({j for j, _ in held} | {r.job_id for _, r in fresh})
        kill: set[Attempt] = set()
        with self._lock:
            for seq, r in fresh:
                key = (r.job_id, r.attempt)
                rec = records.get(r.job_id)
                mine = rec is not None and rec.attempt == r.attempt and rec.executor_id == agent_id
                if mine or r.job_id in changed:
                    out.acked.append((r.job_id, r.attempt, seq))
                    seqs[key] = max(seq, seqs.get(key, 0))
                else:
                    out.refused.append(key)
                    kill.add(key)
            # what the agent holds no more needs no memory of its seqs
            keep = set(held) | {(r.job_id, r.attempt) for _, r in reports}
            for key in [k for k in seqs if k not in keep]:
                del seqs[key]
        kill.update(k for k in held if not lifecycle.still_holds(agent_id, k[1], records.get(k[0])))
        out.kill = sorted(kill)
        if not draining:
            out.leases = self.claim(agent_id, region, architectures, free, max_jobs)
        return out

    def drain(self, agent_id: str) -> None:
        """The agent stops: it gets no new job, and the long poll it may have open answers now."""
        with self._lock:
            self._draining.add(agent_id)
        self.services.notify.publish((agent_key(agent_id),))

    def draining(self, agent_id: str) -> bool:
        return agent_id in self._draining

    def claim(
        self, agent_id: str, region: str, architectures: Sequence[str], free: Capacity, max_jobs: int
    ) -> list[JobLaunch]:
        if max_jobs <= 0 or free.vcpus <= 0:
            return []
        return self.executors.claim(agent_id, region, architectures, free, max_jobs)

    def check_liveness(self) -> int:
        """Mark lost the agents silent past their liveness (unless the server suspects itself);
        returns how many jobs that recovered."""
        s = self.services
        now = s.clock.now()
        with self._lock:
            quiet = now - self._last_heard
            if now < self._grace_until or self.liveness < quiet < 3 * self.liveness:
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
