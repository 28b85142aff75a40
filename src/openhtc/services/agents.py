"""The executor protocol for ``htc agent``: register, exchange and logs, served over HTTP.

The route (api/routes/agents.py) only decodes and encodes; the work is the in-process
protocol's (``ExecutorService``: register, report, claim, heartbeat) plus what a remote agent
needs on top of it:

- group commit: every exchange waiting at a moment is served by a writer of this server, in one
  read and one write transaction for them all (services/group_commit.py); an exchange holds no
  thread and no connection while it waits for its group;
- idempotent reports: each carries a per-attempt ``seq``; one at or below the highest applied
  is a duplicate, acknowledged and not applied again (a lost answer makes the agent resend).
  The seqs kept per server process (the writer's ``seqs``) only save a transaction: a duplicate
  reaching another server is applied again and changes nothing (the lifecycle ignores a
  status the attempt has reached), so correctness does not depend on them;
- shared state lives in the database, so an agent may reach any server: its token binding,
  its drain flag (``_draining`` here only wakes this server's long polls at once);
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
import concurrent.futures
import contextlib
import errno
import logging
import random
import threading
import time
from collections import deque
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from openhtc.domain.errors import InsufficientStorage, PermissionDenied, Unavailable, ValidationFailed
from openhtc.domain.lifecycle import JobRecord
from openhtc.domain.models import AttemptReport, Capacity, JobLaunch
from openhtc.services.agent_records import KnownAgents
from openhtc.services.executors import ExecutorService
from openhtc.services.functions import FUNCTION_COMMAND, result_key
from openhtc.services.group_commit import Call, Exchanged, ExchangeWriter
from openhtc.services.notify import EVERYTHING, job_key
from openhtc.services.service_set import ServiceSet
from openhtc.services.shared_logs import DatabaseLogs
from openhtc.store.agent_rows import AgentState, TokenBinding
from openhtc.store.functions import FunctionStore, ReportedResult
from openhtc.store.queue import AgentInfo

log = logging.getLogger("openhtc.agents")
Attempt = tuple[int, int]
BEAT_SECONDS = 1.0  # heartbeats and lease renewals are written this often, coalesced
# An idle fleet's claims find nothing queued: that answer is reused by every claim on this server
# until work is signalled, or for this long at most (a signal from another server may be lost)
IDLE_RECHECK_SECONDS = 1.0
# A long poll whose claim came back full wakes two more only while fewer calls than this wait
# for the writer: claims woken faster than groups serve them only queue there, ahead of reports
WAKE_BACKLOG = 16


class Waiter:
    """An exchange that long-polls for work (on the event loop); woken by ``AgentService``.
    ``woken`` tells a wake-up (work, a drain, the server stopping) from the poll's own timer,
    which sets ``event`` only."""

    __slots__ = ("agent_id", "event", "loop", "queued", "region", "woken")

    def __init__(self, agent_id: str, region: str) -> None:
        self.agent_id = agent_id
        self.region = region
        self.loop = asyncio.get_running_loop()
        self.event = asyncio.Event()
        self.queued = False
        self.woken = False

    def wake(self) -> None:
        self.woken = True
        with contextlib.suppress(RuntimeError):  # its loop is closed: the server has stopped
            self.loop.call_soon_threadsafe(self.event.set)


class LogsRefused(Exception):
    """Log chunks for attempts not leased to the calling agent (HTTP 409); nothing was written."""

    def __init__(self, refused: list[Attempt]) -> None:
        self.refused = refused
        super().__init__(f"not this agent's attempts: {refused[:5]}")


class MustRegister(Exception):
    """The agent must register again before its next exchange (HTTP 409)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


@dataclass(slots=True)
class Registered:
    recovered: int
    kill: list[Attempt]


class AgentService:
    def __init__(self, services: ServiceSet, executors: ExecutorService) -> None:
        self.services = services
        self.executors = executors
        self._lock = threading.Lock()
        self.writer = ExchangeWriter(self)  # the group commit of the exchanges (seqs, lost leases)
        self._log_paths: dict[int, tuple[str, str, int]] = {}  # job id -> (task, parent job, index)
        # agents that said they stop through this server: its long polls for them answer now
        # (the flag that counts is on the agent's row: store/agent_rows.py)
        self._draining: set[str] = set()
        now = services.clock.now()
        self._last_heard = now  # the last exchange of any agent (or this service's start)
        self._grace_until = now + self.liveness
        # Long polls wait in a FIFO per region; new work wakes one per region, and each woken
        # one that claimed something wakes the next: one claim's worth at a time, not a herd.
        self._waiters: dict[str, deque[Waiter]] = {}
        self._work = 0  # work signals so far: a claim that raced one claims again
        self._closed = False  # the server stops: every long poll answers now (close)
        self._idle_seen: tuple[int, float] | None = None  # (work mark, monotonic): nothing queued
        self._idle_rechecking = float("-inf")  # when an idle exchange last went to read again
        services.wakeups.on_executor_work(self.work_arrived)
        # Heartbeats (liveness, lease renewals) are kept here and written once per BEAT_SECONDS
        # in one statement: an agent's liveness then lags by at most that much.
        self._beats: dict[str, float] = {}  # agent -> first exchange heard since the last write
        self._beat_lock = threading.Lock()  # one writer at a time
        self._beat_thread: threading.Thread | None = None
        # the agents' records as last read, trusted while they keep calling (agent_records.py)
        self._known = KnownAgents(self.liveness, BEAT_SECONDS)

    @property
    def liveness(self) -> float:
        return self.services.settings.agent_liveness_seconds

    def next_call_seconds(self) -> float:
        """When an agent holding work calls again at the latest: well within its liveness, with
        jitter so a fleet started together spreads out."""
        base = min(self.services.settings.heartbeat_seconds, self.liveness / 3)
        return base * random.uniform(0.8, 1.0)

    def heard(self, now: float) -> None:
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
        token: TokenBinding | None = None,
    ) -> Registered:
        """``token``: the caller's agent token (its hash and how many agents it serves): the
        agent is bound to it, or refused (PermissionDenied) with nothing written.
        ``may_have_started``: ``EveryAttempt`` when the agent's journal cannot say."""
        s = self.services
        now = s.clock.now()
        self.heard(now)
        applied, kill = s.queue.register_agent(
            agent, now, s.settings.lease_seconds, running, may_have_started, token
        )
        self._known.forget(agent.agent_id)
        with self._lock:
            self._draining.discard(agent.agent_id)
        self.writer.forget(agent.agent_id)
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
        token_hash: str | None = None,
        exchange_seq: int | None = None,
        results: dict[Attempt, ReportedResult] | None = None,
    ) -> concurrent.futures.Future[Exchanged]:
        """Heartbeat, reports and claim in one call, served in a group (services/group_commit.py);
        the future's result is the answer (or MustRegister, PermissionDenied, ...).
        ``reports``: (seq, report) pairs. ``token_region``: the region the caller's agent token
        allows ("*": any); ``token_hash``: the token's hash (None: in-process, not checked).
        ``exchange_seq``: the agent's count of its exchanges, sent by agents that reconcile their
        leases (``held`` is then complete: a claimed lease it does not list in two exchanges in a
        row never reached it and goes back to the queue).
        ``results``: function calls' results, by attempt, sent with their terminal reports."""
        call = Call(
            agent_id, incarnation, held, reports, free, max_jobs, draining, token_region, token_hash,
            exchange_seq, results,
        )  # fmt: skip
        future: concurrent.futures.Future[Exchanged] = self.writer.submit(call)
        return future

    async def exchange_async(self, *args: Any, **kwargs: Any) -> Exchanged:
        """``exchange``, awaited on the event loop (no thread of the pool waits for it)."""
        return await asyncio.wrap_future(self.exchange(*args, **kwargs))

    async def claim_async(
        self, agent_id: str, region: str, architectures: Sequence[str], free: Capacity, max_jobs: int
    ) -> list[JobLaunch]:
        """A woken long poll's claim, in the next group (with every other claim waiting then)."""
        if max_jobs <= 0 or free.vcpus <= 0:
            return []
        call = Call(
            agent_id, free=free, max_jobs=max_jobs, claim_only=True, region=region,
            architectures=tuple(architectures),
        )  # fmt: skip
        future: concurrent.futures.Future[list[JobLaunch]] = self.writer.submit(call)
        return await asyncio.wrap_future(future)

    def exchange_idle(
        self,
        agent_id: str,
        incarnation: str,
        free: Capacity,
        max_jobs: int,
        token_region: str,
        token_hash: str | None,
    ) -> Exchanged | None:
        """``exchange`` for an agent that reports and holds nothing, when it needs no database:
        its record is known (agent_records.py) and nothing is queued (or it claims nothing).
        In memory only, so it runs on the event loop; None: call ``exchange``. An idle fleet's
        exchanges are nearly all of this kind. (Agents that send ``exchange_seq`` are not: their
        claimed leases are reconciled from the database.)"""
        if max_jobs > 0 and free.vcpus > 0 and not self._nothing_queued():
            return None
        state = self._known.get(agent_id, incarnation, token_hash, time.monotonic())
        if state is None or state.token_hash != token_hash or token_region not in ("*", state.region):
            return None  # read it (and answer 403 or 409 if it says so)
        now = self.services.clock.now()
        self.heard(now)
        self.beat(agent_id, now)
        self.writer.seqs.pop(agent_id, None)  # it holds nothing: no attempt's seqs to keep
        return Exchanged(state.region, state.architectures)

    def _nothing_queued(self) -> bool:
        """Whether a claim on this server found nothing queued, and no work was signalled since
        (at most IDLE_RECHECK_SECONDS ago: a signal from another server may be lost). Once that
        answer is older, one exchange claims (reads) again and the others keep it meanwhile, for
        another IDLE_RECHECK_SECONDS at most: not a herd of reads at every expiry."""
        now = time.monotonic()
        with self._lock:
            mark, seen = self._work, self._idle_seen
            if seen is None or seen[0] != mark:
                return False
            if now - seen[1] < IDLE_RECHECK_SECONDS:
                return True
            if now - self._idle_rechecking < IDLE_RECHECK_SECONDS:
                return now - seen[1] < 2 * IDLE_RECHECK_SECONDS
            self._idle_rechecking = now  # this one reads
            return False

    def check_result_keys(
        self,
        agent_id: str,
        incarnation: str,
        keyed: Sequence[tuple[int, int, int, str]],
        token_region: str = "*",
        token_hash: str | None = None,
    ) -> None:
        """ValidationFailed (400) naming the first report, of ``keyed`` (its index in the
        exchange, job id, attempt, large result's key), whose key is not its own call's, where
        the executor would have put it (another call's, or another task's). The caller must
        speak for the agent (``check``: MustRegister, PermissionDenied), and only attempts leased
        to it are checked: another's report changes nothing (refused), nor does its result,
        and the answer says nothing of other jobs."""
        self.check(agent_id, incarnation, token_region, token_hash)
        records = self.services.queue.records({job_id for _, job_id, _, _ in keyed})
        mine = [k for k in keyed if _leased_to(agent_id, k[2], records.get(k[1]))]
        paths = self._paths({job_id for _, job_id, _, _ in mine}) if mine else {}
        for i, job_id, _, key in mine:
            where = paths.get(job_id)
            if where is not None and key != result_key(where[1], where[2]):
                raise ValidationFailed(
                    f"is not the key of job {job_id}'s result in its task's storage",
                    f"reports.{i}.result.result_key",
                )

    def save_results(
        self,
        agent_id: str,
        fresh: Sequence[tuple[int, AttemptReport]],
        results: dict[Attempt, ReportedResult],
    ) -> None:
        """Store the results of the fresh terminal reports, fenced by attempt (store/functions.py).
        A large result's key must be where its call's result belongs."""
        rows = [
            found
            for _, r in fresh
            if r.status.terminal and (found := results.get((r.job_id, r.attempt))) is not None
        ]
        keyed = self._paths({r.job_id for r in rows if r.result_key is not None})
        for i, row in enumerate(rows):
            where = keyed.get(row.job_id)
            if row.result_key is not None and (
                where is None or row.result_key != result_key(where[1], where[2])
            ):
                error = (
                    '{"type": "ResultTooLarge", "message": "the agent named another key", "traceback": ""}'
                )
                rows[i] = ReportedResult(row.job_id, row.attempt, None, error)
        FunctionStore(self.services.db).save_reported(agent_id, rows)

    def events_for(self, leases: Sequence[JobLaunch]) -> dict[int, str]:
        """The events of the function calls among ``leases``, by job id (they go with the leases)."""
        calls: dict[int, dict[int, int]] = {}  # batch -> index -> job
        for launch in leases:
            if launch.commands[:1] == (FUNCTION_COMMAND,):
                calls.setdefault(launch.batch_id, {})[launch.array_index] = launch.job_id
        out: dict[int, str] = {}
        store = FunctionStore(self.services.db)
        for batch_id, jobs in calls.items():
            for idx, event in store.events_at(batch_id, sorted(jobs)).items():
                out[jobs[idx]] = event
        return out

    def check(
        self, agent_id: str, incarnation: str, token_region: str = "*", token_hash: str | None = None
    ) -> tuple[str, list[str]]:
        """Whether the caller speaks for this agent, before anything is written: MustRegister
        (409) if the agent must register (again), PermissionDenied (403) if the caller's token
        is not the one the agent registered with or is for another region. Returns the agent's
        region and architectures."""
        state = self._check(agent_id, incarnation, token_region, token_hash)
        return state.region, state.architectures

    def _check(
        self, agent_id: str, incarnation: str, token_region: str, token_hash: str | None
    ) -> AgentState:
        now = time.monotonic()
        known = self._known.get(agent_id, incarnation, token_hash, now)
        state = self.services.queue.agent_state(agent_id, incarnation) if known is None else known
        try:
            self.check_state(agent_id, state, token_region, token_hash)
        except Exception:
            self._known.forget(agent_id)  # whatever was remembered of it is not true any more
            raise
        if known is None:
            self._known.put(agent_id, incarnation, token_hash, state, now)
        return state

    def forget(self, agent_id: str) -> None:
        """A read of the agent's row refused a caller (lost, another incarnation or token): no
        record of it is to be trusted by the next call."""
        self._known.forget(agent_id)

    def remember(
        self, agent_id: str, incarnation: str, token_hash: str | None, state: AgentState, read_at: float
    ) -> None:
        """A caller passed ``check_state`` of its agent's row as read at ``read_at`` (monotonic,
        before the read): its next exchanges may trust it (agent_records.py)."""
        self._known.put(agent_id, incarnation, token_hash, state, read_at)

    def check_state(
        self, agent_id: str, state: AgentState, token_region: str, token_hash: str | None
    ) -> AgentState:
        """``check`` of an agent's state as read (the group commit reads a group's at once)."""
        if token_hash is not None and state.token_hash is not None and state.token_hash != token_hash:
            raise PermissionDenied(
                f"agent {agent_id} registered with another agent token: this one does not speak for it"
            )
        if token_region not in ("*", state.region) and state.region:
            raise PermissionDenied(f"this agent token is for region {token_region}, not {state.region}")
        if state.reason is not None:
            raise MustRegister(state.reason)
        if token_hash is not None and state.token_hash is None:  # registered before tokens were bound
            raise MustRegister("unknown agent")
        return state

    def drain(self, agent_id: str) -> None:
        """The agent stops: it gets no new job (its row says so: exchange), and the long poll it
        may have open on this server answers now. The set here only wakes local long polls."""
        self._known.draining(agent_id)
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
            if self._work != seen or agent_id in self._draining or self._closed:
                waiter.woken = True  # work came while it claimed: claim again at once
                waiter.event.set()
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

    def pass_on(self, region: str, count: int = 1) -> None:
        """A woken long poll claimed (there may be more work), or will not claim: wake the next
        ``count``. A claim that came back full wakes two: their claims share the next group's
        transaction (services/group_commit.py), so the claiming doubles while the queue lasts (and
        the writer keeps up: WAKE_BACKLOG) and stops at the first claim that finds it short.
        (Before the group commit, concurrent claims were transactions racing each other: a
        quarter less throughput; performance.md.)"""
        if count > 1 and self.writer.backlog() >= WAKE_BACKLOG:  # the writer has enough to do
            count = 1
        with self._lock:
            woken = [w for _ in range(count) if (w := self._pop(region)) is not None]
        for waiter in woken:
            waiter.wake()

    def work_arrived(self) -> None:
        """Jobs became claimable (any thread): wake the first long poll of each region."""
        with self._lock:
            self._work += 1
            woken = [w for region in list(self._waiters) if (w := self._pop(region)) is not None]
        for waiter in woken:
            waiter.wake()

    def close(self) -> None:
        """The server stops: every long poll answers now, and those that come later at once.
        (A long poll waits on its event alone, with no timer slices: 1,000 idle agents' polls
        woken every second to look at the server's state cost more than their exchanges.)"""
        with self._lock:
            self._closed = True
            woken = [w for queue in self._waiters.values() for w in queue]
            self._waiters.clear()
            for waiter in woken:
                waiter.queued = False
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

    def beat(self, agent_id: str, now: float) -> None:
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
        self.close()  # the server stops: its long polls answer within a beat

    def flush_beats(self) -> None:
        """Write the heartbeats heard since the last write: one statement for them all."""
        with self._beat_lock:
            with self._lock:
                beats, self._beats = self._beats, {}
            if not beats:
                return
            try:
                self.services.queue.agent_beats(beats.keys(), min(beats.values()))
                # what another server or the leader changed in the rows of the agents trusted here
                asked = beats.keys() & self._known.ids()
                if asked:
                    self._known.refresh(self.services.queue.agent_marks(asked), asked)
            except Exception:
                # the sweep may not see this server's heartbeats: trust no record read before
                self._known.clear()
                with self._lock:  # kept for the next write
                    for agent_id, heard in beats.items():
                        self._beats[agent_id] = min(heard, self._beats.get(agent_id, heard))
                raise

    def draining(self, agent_id: str) -> bool:
        return agent_id in self._draining

    def idle_known(self, mark: int, began: float) -> bool:
        """Whether a claim may skip its read: one found nothing queued since work mark ``mark``
        was signalled, less than IDLE_RECHECK_SECONDS before ``began`` (time.monotonic()). With
        nothing queued, 1,000 idle agents' exchanges then cost the database about one read a
        second per server, not one each."""
        with self._lock:
            seen = self._idle_seen
        return seen is not None and seen[0] == mark and began - seen[1] < IDLE_RECHECK_SECONDS

    def idle_seen(self, mark: int, began: float) -> None:
        """A read begun at ``began`` after work mark ``mark`` found nothing queued."""
        with self._lock:
            if self._work == mark:  # work signalled since voids it
                self._idle_seen = (mark, began)

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
            self.heard(heard)
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
                for agent_id in lost:  # it registers again before it is served
                    self._known.forget(agent_id)
                    self._draining.discard(agent_id)
            for agent_id in lost:
                self.writer.forget(agent_id)
        if applied.changes:
            s.metrics.jobs.applied(applied)
            s.wakeups.schedule_round.set()
            s.notify.publish((EVERYTHING,))
        return len(applied.changes)

    # -- logs -----------------------------------------------------------------------------------

    def append_logs(
        self,
        agent_id: str,
        chunks: Sequence[tuple[int, int, int, str]],
        incarnation: str | None = None,
        token_region: str = "*",
        token_hash: str | None = None,
    ) -> list[tuple[int, int, int]]:
        """Write (job, attempt, offset, data) chunks into the attempts' logs; idempotent by
        offset. Returns (job, attempt, next offset) for each attempt: where the agent goes on
        from (a chunk past the end written so far is not written: the agent resends from there).
        The caller must speak for the agent (``check``, when ``incarnation`` is given), and every
        chunk must be for an attempt leased to it, of a task not deleted: otherwise LogsRefused, and
        nothing is written.
        A disk that fails is InsufficientStorage (full) or Unavailable: the agent sends again."""
        s = self.services
        if incarnation is not None:
            self.check(agent_id, incarnation, token_region, token_hash)
        records = s.queue.records({c[0] for c in chunks})
        paths = self._paths({c[0] for c in chunks})
        # a cancelled or ended attempt's last lines are written, unless its task was deleted:
        # its logs went with it, and what came late would stay behind for good
        ended = {paths[j][0] for j, r in records.items() if (r.cancelled or r.terminal) and j in paths}
        gone = s.projects.deleted_tasks(ended) if ended else set()
        refused = sorted(
            {
                (job_id, attempt)
                for job_id, attempt, _, _ in chunks
                if not _leased_to(agent_id, attempt, records.get(job_id))
                or job_id not in paths
                or paths[job_id][0] in gone
            }
        )
        if refused:
            raise LogsRefused(refused)
        ends: dict[Attempt, int] = {}
        shared: list[tuple[tuple[str, str, int, int], int, bytes]] = []  # log_store = database
        for job_id, attempt, offset, data in chunks:
            where = paths[job_id]
            if isinstance(s.logs, DatabaseLogs):
                shared.append(((where[0], where[1], where[2], attempt), offset, data.encode()))
                continue
            path = s.logs.path(where[0], where[1], where[2], attempt)
            try:
                ends[(job_id, attempt)] = _write_at(path, offset, data.encode())
            except OSError as exc:
                log.warning("agent %s: cannot write the log of job %d: %s", agent_id, job_id, exc)
                if exc.errno == errno.ENOSPC:
                    raise InsufficientStorage(
                        "the server's disk is full: the log chunk was not written"
                    ) from None
                raise Unavailable(
                    f"the server cannot write the job's log now ({exc.strerror or exc})"
                ) from None
        if shared and isinstance(s.logs, DatabaseLogs):  # one insert; readers on every server woken
            jobs = {(w[0], w[1], w[2]): j for j, w in paths.items()}
            for (task, parent, idx, attempt), end in s.logs.append(shared).items():
                ends[(jobs[(task, parent, idx)], attempt)] = end
            s.notify.publish(job_key(jobs[a[:3]]) for a, _, _ in shared)
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


def _leased_to(agent_id: str, attempt: int, rec: JobRecord | None) -> bool:
    """Whether the attempt is the job's current one, leased to this agent (running or ended)."""
    return rec is not None and rec.attempt == attempt and rec.executor_id == agent_id


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
