"""Allocation queues and their pilots (tables ``alloc_queues``, ``pilots``), and the facts the
allocator decides on: each region's queued vCPUs and what its live agents hold."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, func, select, update

from openhtc.domain.allocation import ENDS_AT_LABEL
from openhtc.domain.enums import ACTIVE_STATUSES, JobStatus
from openhtc.store.db import Database
from openhtc.store.tables import alloc_queues, batches, executors, jobs, pilots

PILOT_LABEL = "openhtc.pilot"  # the agent label naming its pilot (the pilot script sets it)
SLURM_JOB_LABEL = "slurm.job"  # the agent label carrying its Slurm job id


@dataclass(frozen=True, slots=True)
class QueueRow:
    id: str
    kind: str
    region: str
    time_limit_s: int
    max_pilots: int
    backlog: int
    pilot_vcpus: int
    idle_timeout_s: int
    extra_args: list[str]
    state: str
    pause_reason: str | None
    failed_submissions: int
    failed_starts: int
    created_at: float


@dataclass(frozen=True, slots=True)
class PilotRow:
    id: str
    queue_id: str
    batch_job_id: str
    state: str
    submitted_at: float
    started_at: float | None
    ends_at: float | None
    ended_at: float | None
    agent_id: str | None
    last_busy_at: float | None
    detail: str | None


@dataclass(frozen=True, slots=True)
class AgentHolding:
    """A live agent: its pilot (from its labels), capacity, and the vCPUs of the jobs it holds."""

    agent_id: str
    region: str
    pilot_id: str | None
    vcpus: int
    held_jobs: int
    held_vcpus: int


class AllocStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    # -- queues ---------------------------------------------------------------------------------

    def add_queue(self, row: QueueRow) -> None:
        with self.db.write() as conn:
            conn.execute(alloc_queues.insert().values(**_fields(row)))

    def queues(self) -> list[QueueRow]:
        with self.db.read() as conn:
            rows = conn.execute(select(alloc_queues).order_by(alloc_queues.c.created_at)).all()
        return [QueueRow(**{**r._mapping, "extra_args": list(r.extra_args)}) for r in rows]

    def queue(self, queue_id: str) -> QueueRow | None:
        return next((q for q in self.queues() if q.id == queue_id), None)

    def set_state(self, queue_id: str, state: str, reason: str | None, reset: bool = False) -> bool:
        values: dict[str, Any] = {"state": state, "pause_reason": reason}
        if reset:
            values.update(failed_submissions=0, failed_starts=0)
        with self.db.write() as conn:
            done = conn.execute(update(alloc_queues).where(alloc_queues.c.id == queue_id).values(**values))
        return bool(done.rowcount)

    def set_health(self, queue_id: str, failed_submissions: int, failed_starts: int) -> None:
        with self.db.write() as conn:
            conn.execute(
                update(alloc_queues)
                .where(alloc_queues.c.id == queue_id)
                .values(failed_submissions=failed_submissions, failed_starts=failed_starts)
            )

    def remove_queue(self, queue_id: str) -> bool:
        with self.db.write() as conn:
            done = conn.execute(delete(alloc_queues).where(alloc_queues.c.id == queue_id))
            conn.execute(delete(pilots).where(pilots.c.queue_id == queue_id))
        return bool(done.rowcount)

    # -- pilots ---------------------------------------------------------------------------------

    def add_pilot(self, row: PilotRow) -> None:
        with self.db.write() as conn:
            conn.execute(pilots.insert().values(**_fields(row)))

    def pilots(self, queue_id: str | None = None, alive_only: bool = False) -> list[PilotRow]:
        query = select(pilots).order_by(pilots.c.submitted_at)
        if queue_id is not None:
            query = query.where(pilots.c.queue_id == queue_id)
        if alive_only:
            query = query.where(pilots.c.state != "ended")
        with self.db.read() as conn:
            return [PilotRow(**r._mapping) for r in conn.execute(query).all()]

    def remove_pilot(self, pilot_id: str) -> None:
        with self.db.write() as conn:
            conn.execute(delete(pilots).where(pilots.c.id == pilot_id))

    def answer_pilot(self, pilot_id: str, batch_job_id: str) -> bool:
        """Record sbatch's answer on the row written before it; False when the row is gone or
        ended meanwhile (another leader gave up on it)."""
        with self.db.write() as conn:
            done = conn.execute(
                update(pilots)
                .where(pilots.c.id == pilot_id, pilots.c.batch_job_id == "", pilots.c.state != "ended")
                .values(batch_job_id=batch_job_id)
            )
        return bool(done.rowcount)

    def update_pilot(self, pilot_id: str, **values: Any) -> None:
        with self.db.write() as conn:
            conn.execute(update(pilots).where(pilots.c.id == pilot_id).values(**values))

    # -- what the allocator decides on ----------------------------------------------------------

    def queued_vcpus(self, region: str, max_timeout_s: int | None) -> int:
        """Queued (admitted, not claimed) vCPUs of a region whose jobs' execTimeoutSeconds is at
        most ``max_timeout_s`` (or unset): the work a fresh pilot could take."""
        query = select(func.sum(jobs.c.vcpus)).where(
            jobs.c.status == int(JobStatus.SUBMITTED_TO_PROVIDER), jobs.c.region == region
        )
        if max_timeout_s is not None:
            timeout = batches.c.request[("htcJobDefinition", "execTimeoutSeconds")].as_integer()
            fitting = select(batches.c.id).where(func.coalesce(timeout, 0) <= max_timeout_s)
            query = query.where(jobs.c.batch_id.in_(fitting))
        with self.db.read() as conn:
            return int(conn.execute(query).scalar() or 0)

    def queue_depth(self, region: str) -> tuple[int, int, int, int]:
        """A region's (queued jobs, queued vCPUs, active jobs, active vCPUs): the autoscaler's metric."""

        def count(statuses: list[int]) -> tuple[int, int]:
            query = select(func.count(), func.sum(jobs.c.vcpus)).where(
                jobs.c.status.in_(statuses), jobs.c.region == region
            )
            row = conn.execute(query).one()
            return int(row[0] or 0), int(row[1] or 0)

        with self.db.read() as conn:
            queued = count([int(JobStatus.SUBMITTED_TO_PROVIDER)])
            active = count([int(s) for s in ACTIVE_STATUSES])
        return (*queued, *active)

    def agents(self, heard_since: float) -> list[AgentHolding]:
        """The agents heard from since ``heard_since`` (and not lost), with what they hold."""
        held = (
            select(jobs.c.executor_id, func.count(), func.sum(jobs.c.vcpus))
            .where(jobs.c.executor_id.is_not(None), jobs.c.status.in_([int(s) for s in ACTIVE_STATUSES]))
            .group_by(jobs.c.executor_id)
        )
        query = select(executors.c.id, executors.c.region, executors.c.vcpus, executors.c.labels).where(
            executors.c.kind == "agent",
            executors.c.lost_at.is_(None),
            executors.c.last_heartbeat >= heard_since,
        )
        with self.db.read() as conn:
            holding = {r[0]: (int(r[1]), int(r[2] or 0)) for r in conn.execute(held).all()}
            rows = conn.execute(query).all()
        out = []
        for r in rows:
            n, v = holding.get(r.id, (0, 0))
            labels = r.labels or {}
            out.append(AgentHolding(r.id, r.region, labels.get(PILOT_LABEL), int(r.vcpus), n, v))
        return out

    def agent_ids_of(self, pilot_ids: Sequence[str]) -> dict[str, str]:
        """pilot id -> the id of the agent (ever) registered with its label, lost ones included."""
        wanted = set(pilot_ids)
        query = select(executors.c.id, executors.c.labels).where(executors.c.kind == "agent")
        with self.db.read() as conn:
            rows = conn.execute(query).all()
        return {pilot: r.id for r in rows if (pilot := (r.labels or {}).get(PILOT_LABEL)) in wanted and pilot}

    def pilot_end(self, agent_id: str, now: float) -> tuple[bool, float | None]:
        """(whether ``agent_id``'s allocation ends, when): a pilot's walltime, or the end an agent
        started with ``--time-limit`` advertises (its label). Before squeue has shown a pilot's
        end, it is estimated from the pilot's start (or now) and its queue's time limit."""
        with self.db.read() as conn:
            labels = conn.execute(select(executors.c.labels).where(executors.c.id == agent_id)).scalar()
            pilot_id = (labels or {}).get(PILOT_LABEL)
            if not pilot_id:
                try:
                    return True, float((labels or {})[ENDS_AT_LABEL])
                except (KeyError, TypeError, ValueError):
                    return False, None
            row = conn.execute(
                select(pilots.c.ends_at, pilots.c.started_at, alloc_queues.c.time_limit_s)
                .join(alloc_queues, alloc_queues.c.id == pilots.c.queue_id)
                .where(pilots.c.id == pilot_id)
            ).first()
        if row is None:  # its queue was removed: it ends soon
            return True, now
        if row.ends_at is not None:
            return True, float(row.ends_at)
        return True, (row.started_at or now) + row.time_limit_s


def _fields(row: Any) -> dict[str, Any]:
    return {name: getattr(row, name) for name in row.__slots__}
