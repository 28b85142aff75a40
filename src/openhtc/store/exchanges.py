"""The agents' exchanges, many at once: one transaction for a whole group.

``services/group_commit.py`` folds every exchange waiting at a moment into a group. The store
serves the group in one write transaction, whatever its size (``exchange_group``: the reads, the
service's plan, the writes), or, for a group that likely writes nothing (idle long polls), a
read transaction and a write one only if needed:

- the reads (``exchange_reads``, ``_reads``): the agents' rows (is each known, of this
  incarnation, bound to this token?), the records of the jobs they hold, the leases granted them
  that no report has reached yet (lost-lease reconciliation), and whether anything is queued;
- the writes (``group_commit``, ``_group_in``; the flush commits in the same round trip): every
  group member's reports, the re-queued lost leases, and one claim for all the agents that want
  work: the queue is read once per project for their summed capacity (``FOR UPDATE SKIP
  LOCKED``: rows another server's group took are skipped, so no job goes to two agents), then
  split between them in arrival order, each by ``dispatch`` on its own free capacity.

The group's agents' rows are locked (``FOR UPDATE``, in id order) before its job rows: the lost
sweep, which updates them first, waits for the group and then recovers what it claimed, or
committed first and those agents take nothing (as a single claim does: agent_rows.py).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from sqlalchemy import Connection, select

from openhtc.domain import lifecycle
from openhtc.domain import scheduling as policy
from openhtc.domain.enums import ACTIVE_STATUSES, JobStatus
from openhtc.domain.errors import InvalidTransition
from openhtc.domain.lifecycle import JobRecord
from openhtc.domain.models import AttemptReport, Capacity
from openhtc.store.agent_rows import AgentState
from openhtc.store.db import Database
from openhtc.store.tables import executors
from openhtc.store.transitions import Applied, JobState, StatusWrites

Attempt = tuple[int, int]
_QUEUED = JobStatus.SUBMITTED_TO_PROVIDER
_CLAIMED = int(JobStatus.RUNNABLE)  # leased, no report of it yet


class ClaimWant(NamedTuple):
    """One agent's claim in a group."""

    agent_id: str
    region: str
    architectures: tuple[str, ...]
    free: Capacity
    max_jobs: int
    max_timeout_s: int | None  # a Slurm pilot's walltime left (None: any job)


@dataclass(slots=True)
class Work:
    """What a group writes: ``reports`` (agent, its fresh reports in the order sent),
    ``releases`` (agent, its leases missed twice: re-queued free if still RUNNABLE on that
    attempt), ``claims``, and the ``draining`` flags to set (agent, incarnation)."""

    reports: list[tuple[str, list[AttemptReport]]] = field(default_factory=list)
    releases: list[tuple[str, set[Attempt]]] = field(default_factory=list)
    claims: list[ClaimWant] = field(default_factory=list)
    draining: list[tuple[str, str]] = field(default_factory=list)

    def any(self) -> bool:
        return bool(self.reports or self.releases or self.claims or self.draining)


@dataclass(slots=True)
class Reads:
    states: dict[str, AgentState]  # by agent id (an unknown agent is absent)
    records: dict[int, JobRecord]  # the held jobs' records, as committed
    unreported: dict[str, set[Attempt]]  # agent -> its leases no report reached (RUNNABLE)
    queued: bool  # whether any job was queued for executors (when asked)


@dataclass(slots=True)
class Group:
    """What a group commit did: its Applied (every change, one flush), the reported jobs'
    records after it, the reports refused as invalid transitions (by the group member's index:
    the positions of its reports), the jobs each claim took (in the order of ``claims``) and the
    lost leases re-queued."""

    applied: Applied
    records: dict[int, JobRecord] = field(default_factory=dict)
    invalid: dict[int, set[int]] = field(default_factory=dict)
    changed: dict[int, set[int]] = field(default_factory=dict)  # member index -> jobs its reports changed
    first_invalid: str = ""
    claimed: list[list[JobState]] = field(default_factory=list)
    released: set[int] = field(default_factory=set)


def state_of(row: Any, incarnation: str) -> AgentState:
    """An agent's exchange state from its executors row (None: unknown)."""
    if row is None or row.kind != "agent":
        return AgentState("unknown agent", "", [], None, False)
    bound, draining = row.token_hash, bool(row.draining)
    if row.lost_at is not None:
        return AgentState("agent lost", row.region, [], bound, draining)
    if row.incarnation != incarnation:
        return AgentState("stale incarnation", row.region, [], bound, draining)
    return AgentState(None, row.region, list(row.architectures), bound, draining)


class ExchangeRows:
    """Mixed into QueueStore (store/queue.py), whose helpers these stubs name."""

    db: Database

    def _writes(self, conn: Connection, now: float, executor_id: str | None = None) -> StatusWrites:
        raise NotImplementedError

    def _projects_with(self, conn: Connection, status: JobStatus) -> list[str]:
        raise NotImplementedError

    def _vcpus_by_project(self, conn: Connection, statuses: Sequence[JobStatus]) -> dict[str, int]:
        raise NotImplementedError

    def _queued(
        self,
        conn: Connection,
        status: JobStatus,
        project_ids: Sequence[str],
        limit: int,
        extra: str = "",
        params: Sequence[Any] = (),
    ) -> list[policy.QueuedJob]:
        raise NotImplementedError

    def _timeout_sql(self, max_timeout_s: int | None) -> str:
        raise NotImplementedError

    def _in(self, column: str, values: Collection[Any]) -> tuple[str, Any]:
        """``column`` matched against a list of values, as one parameter."""
        if self.db.is_sqlite:
            return f"{column} IN (SELECT value FROM json_each(?))", json.dumps(list(values))
        return f"{column} = ANY(?)", list(values)

    def exchange_reads(
        self,
        agents: Collection[str],
        held_jobs: Collection[int],
        reconciling: Collection[str],
        want_queue: bool,
    ) -> tuple[dict[str, Any], Reads]:
        """One read transaction for a group: the rows of ``agents`` (returned raw, by id: their
        state depends on the incarnation each exchange names, ``state_of``), the records of
        ``held_jobs``, the unreported leases of the ``reconciling`` agents, and (``want_queue``)
        whether any job is queued."""
        if not (agents or held_jobs or reconciling or want_queue):
            return {}, Reads({}, {}, {}, False)
        with self.db.read() as conn:
            return self._reads(conn, agents, held_jobs, reconciling, want_queue)

    def _reads(
        self,
        conn: Connection,
        agents: Collection[str],
        held_jobs: Collection[int],
        reconciling: Collection[str],
        want_queue: bool,
    ) -> tuple[dict[str, Any], Reads]:
        out = Reads({}, {}, {}, False)
        rows: dict[str, Any] = {}
        cur = conn.exec_driver_sql
        if agents:  # compiled: the JSON column decoded as on either database
            query = select(
                executors.c.id,
                executors.c.incarnation,
                executors.c.lost_at,
                executors.c.region,
                executors.c.architectures,
                executors.c.kind,
                executors.c.token_hash,
                executors.c.draining,
                executors.c.labels,
            ).where(executors.c.id.in_(sorted(agents)))
            rows = {row.id: row for row in conn.execute(query)}
        if held_jobs:
            where, param = self._in("id", held_jobs)
            for r in cur(
                self.db.sql(f"SELECT id, attempt, status, executor_id, cancelled FROM jobs WHERE {where}"),
                (param,),
            ):
                out.records[r.id] = JobRecord(
                    r.id,
                    r.status,
                    r.attempt,
                    executor_id=r.executor_id,
                    cancelled=bool(r.cancelled),
                )
        if reconciling:
            where, param = self._in("executor_id", reconciling)
            for r in cur(
                self.db.sql(f"SELECT executor_id, id, attempt FROM jobs WHERE {where} AND status = ?"),
                (param, _CLAIMED),
            ):
                out.unreported.setdefault(r.executor_id, set()).add((r.id, r.attempt))
        if want_queue:
            out.queued = bool(self._projects_with(conn, _QUEUED))
        return rows, out

    def exchange_group(
        self,
        agents: Collection[str],
        held_jobs: Collection[int],
        reconciling: Collection[str],
        want_queue: bool,
        plan: Callable[[dict[str, Any], Reads], Work],
        now: float,
        lease_seconds: float,
    ) -> tuple[dict[str, Any], Reads, Group | None]:
        """A group's reads, then ``plan`` (what to write, from what was read), then its write,
        all in one write transaction: a group with reports or claims saves the read
        transaction's round trips (its connection checkout, BEGIN and COMMIT)."""
        with self.db.write() as conn:
            rows, reads = self._reads(conn, agents, held_jobs, reconciling, want_queue)
            work = plan(rows, reads)
            if not work.any():
                return rows, reads, None
            group, writes = self._group_in(conn, now, lease_seconds, work)
        group.applied = writes.applied()
        return rows, reads, group

    def group_commit(self, now: float, lease_seconds: float, work: Work) -> Group:
        """One write transaction for a group's ``work``."""
        with self.db.write() as conn:
            group, writes = self._group_in(conn, now, lease_seconds, work)
        group.applied = writes.applied()
        return group

    def _group_in(
        self, conn: Connection, now: float, lease_seconds: float, work: Work
    ) -> tuple[Group, StatusWrites]:
        """A group's writes in the caller's transaction, committed by the last (its flush).
        A report that breaks the lifecycle is refused alone (``Group.invalid``): the others of its
        job are applied one at a time, as separate transactions would have."""
        reports, releases, claims, draining = (
            work.reports,
            work.releases,
            work.claims,
            work.draining,
        )
        # Lock order, as every writer of these rows keeps it: the agents' rows (by id), then
        # job rows (by id), then the counter rows (by key). The coalesced heartbeats and the
        # lost sweep also update an agent's row before its jobs': they wait for the group
        # here, rather than holding job rows the group wants while it holds theirs.
        agent_ids = (
            {a for a, _ in reports} | {a for a, _ in releases} | {c.agent_id for c in claims}
            | {a for a, _ in draining}
        )  # fmt: skip
        lock = "" if self.db.is_sqlite else " ORDER BY id FOR UPDATE"
        where, param = self._in("id", agent_ids)
        may = {
            row.id
            for row in conn.exec_driver_sql(
                self.db.sql(f"SELECT id, lost_at, draining, kind FROM executors WHERE {where}{lock}"),
                (param,),
            )
            if row.kind != "agent" or (row.lost_at is None and not row.draining)
        }
        for agent_id, incarnation in draining:
            conn.exec_driver_sql(
                self.db.sql(
                    "UPDATE executors SET draining = ? WHERE id = ? AND incarnation = ?"
                    " AND (draining IS NULL OR NOT draining)"
                ),
                (True, agent_id, incarnation),
            )
        writes = self._writes(conn, now)
        group = Group(writes.applied(), claimed=[[] for _ in claims])
        ids = {r.job_id for _, rs in reports for r in rs} | {j for _, ks in releases for j, _ in ks}
        loaded = {job.id: job for job in writes.load_ids(sorted(ids))}
        for index, (agent_id, rs) in enumerate(reports):
            self._report(writes, group, index, agent_id, rs, loaded)
        group.records = {
            job_id: writes.record(job)
            for job_id in {r.job_id for _, rs in reports for r in rs}
            if (job := loaded.get(job_id)) is not None
        }
        for agent_id, keys in releases:
            for job_id, attempt in keys:
                job = loaded.get(job_id)
                if job is None:
                    continue
                rec = writes.record(job)  # as locked (and as this group's reports left it)
                if rec.executor_id == agent_id and rec.status == _CLAIMED and rec.attempt == attempt:
                    writes.lose_executor(job, "the agent never received its lease", False)
                    group.released.add(job_id)
        if claims:  # nothing for an agent lost or draining (its row is locked: agent_rows.py)
            self._claim(conn, writes, group, claims, may, now, lease_seconds)
        writes.flush(commit=True)
        return group, writes

    def _report(
        self,
        writes: StatusWrites,
        group: Group,
        index: int,
        agent_id: str,
        rs: Sequence[AttemptReport],
        loaded: dict[int, JobState],
    ) -> None:
        by_job: dict[int, list[tuple[int, AttemptReport]]] = defaultdict(list)
        for position, r in enumerate(rs):
            by_job[r.job_id].append((position, r))
        for job_id, items in by_job.items():
            job = loaded.get(job_id)
            if job is None:  # no such job: changes nothing (refused by the caller)
                continue
            changed = False
            try:
                changed = writes.report(job, [r for _, r in items], agent_id)
            except InvalidTransition:  # nothing of this job's recorded: one at a time
                for position, r in items:
                    try:
                        changed = writes.report(job, [r], agent_id) or changed
                    except InvalidTransition as exc:
                        group.invalid.setdefault(index, set()).add(position)
                        group.first_invalid = group.first_invalid or exc.message
            if changed:
                group.changed.setdefault(index, set()).add(job_id)

    def _claim(
        self,
        conn: Connection,
        writes: StatusWrites,
        group: Group,
        claims: Sequence[ClaimWant],
        may: set[str],
        now: float,
        lease_seconds: float,
    ) -> None:
        """One claim for every claimant: the queue read once per project and group of alike
        claimants (region, architectures, walltime), for their summed capacity, then split.
        ``may``: the claimants that may claim (live, not draining)."""
        wanted = [
            i for i, c in enumerate(claims) if c.agent_id in may and c.max_jobs > 0 and c.free.vcpus > 0
        ]
        if not wanted:
            return
        queued_projects = self._projects_with(conn, _QUEUED)
        if not queued_projects:
            return
        running = self._vcpus_by_project(conn, ACTIVE_STATUSES)
        alike: dict[tuple[str, tuple[str, ...], int | None], list[int]] = defaultdict(list)
        for i in wanted:
            c = claims[i]
            alike[(c.region, c.architectures, c.max_timeout_s)].append(i)
        chosen: dict[int, list[int]] = {}  # claim index -> job ids, in dispatch's order
        for (region, architectures, max_timeout), members in alike.items():
            if not architectures:
                continue
            limit = sum(min(claims[i].max_jobs, claims[i].free.vcpus) for i in members)
            arch_sql = ",".join("?" * len(architectures))
            extra = f" AND region = ? AND architecture IN ({arch_sql}){self._timeout_sql(max_timeout)}"
            params = (region, *architectures) + (() if max_timeout is None else (max_timeout,))
            queues = {p: self._queued(conn, _QUEUED, [p], limit, extra, params) for p in queued_projects}
            for i in members:
                if not any(queues.values()):
                    break
                picked = policy.dispatch(queues, running, claims[i].free, claims[i].max_jobs)
                if not picked:
                    continue
                chosen[i] = [j.job_id for j in picked]
                by_project: dict[str, int] = defaultdict(int)
                for job in picked:
                    running[job.project_id] = running.get(job.project_id, 0) + job.vcpus
                    by_project[job.project_id] += 1
                for project, count in by_project.items():
                    queues[project] = _without(queues[project], set(chosen[i]), count)
        if not chosen:
            return
        jobs = {job.id: job for job in writes.load_ids(sorted(j for ids in chosen.values() for j in ids))}
        lease = lifecycle.lease_until(now, lease_seconds)
        for i, ids in chosen.items():
            # the executor starts them in this order: keep the one dispatch chose
            mine = [jobs[j] for j in ids if j in jobs]
            writes.claim(mine, claims[i].agent_id, lease)
            group.claimed[i] = mine


def _without(queue: list[policy.QueuedJob], taken: set[int], count: int) -> list[policy.QueuedJob]:
    """``queue`` less the ``count`` jobs of it in ``taken``: a prefix of it, in the common case
    (dispatch takes a project's jobs from its head, unless one does not fit)."""
    head = 0
    while head < len(queue) and queue[head].job_id in taken:
        head += 1
    if head == count:
        return queue[head:]
    return [j for j in queue if j.job_id not in taken]
