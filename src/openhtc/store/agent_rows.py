"""The agents' rows beyond the claim/report hot path: token binding, drain flag, lost leases.

- Token binding: an agent token speaks for the agent ids that registered with it, and at most
  ``agents`` of them live at once (the token's ``agents`` claim, 1 unless minted for a fleet;
  a token minted before binding has no such claim and serves any number, as it did).
  The check runs at the top of the register transaction, before anything is written, under a
  transaction lock on PostgreSQL so two registers with one token cannot both take its last slot.
  An agent id bound to another token is taken over only once that agent is marked lost (its
  jobs recovered), and a lost agent holds no slot of its token.
- The drain flag lives on the agent's row (any server the agent reaches sees it): a claim for
  an agent that drains, or that was marked lost, takes nothing, checked in the claim's own
  transaction with the agent's row locked, so the lost sweep and a claim never interleave.
- Lost lease answers: the leases the server granted an agent and that the agent does not list
  as held in two later exchanges in a row never reached it; they go back to the queue free
  (the attempt was never handed over: no retry spent).
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection
from typing import NamedTuple

from sqlalchemy import Connection, and_, func, or_, select

from openhtc.domain.enums import JobStatus
from openhtc.domain.errors import PermissionDenied
from openhtc.store.db import Database
from openhtc.store.tables import executors, jobs
from openhtc.store.transitions import Applied, StatusWrites

# pg_advisory_xact_lock key around agent registers: "openhtc\x05" read as an integer
_REGISTER_LOCK_KEY = int.from_bytes(b"openhtc\x05", "big")
_CLAIMED = int(JobStatus.RUNNABLE)  # leased to an executor, no report of it yet


def token_hash(token: str) -> str:
    """What the store keeps of an agent token: its sha256 (never the token)."""
    return hashlib.sha256(token.encode()).hexdigest()


class TokenBinding(NamedTuple):
    token_hash: str
    agents: int | None  # how many live (not lost) agents the token may speak for at once (None: any)


class AgentState(NamedTuple):
    reason: str | None  # why the agent must register again (None: it need not)
    region: str
    architectures: list[str]
    token_hash: str | None  # the token it is bound to
    draining: bool


def check_binding(db: Database, conn: Connection, agent_id: str, binding: TokenBinding) -> None:
    """Refuse (PermissionDenied) a register the token may not make; writes nothing."""
    if not db.is_sqlite:  # SQLite's write transactions are serial already (BEGIN IMMEDIATE)
        conn.exec_driver_sql("SELECT pg_advisory_xact_lock(%s)", (_REGISTER_LOCK_KEY,))
    live = executors.c.lost_at.is_(None)  # a silent agent is live until the sweep marks it lost
    row = conn.execute(select(executors.c.token_hash).where(and_(executors.c.id == agent_id, live))).first()
    if row is not None and row.token_hash is not None and row.token_hash != binding.token_hash:
        raise PermissionDenied(
            f"agent {agent_id} is live and bound to another agent token; an agent token speaks "
            "only for the agents that registered with it"
        )
    if binding.agents is None:  # a fleet token from before binding: no limit on its agents
        return
    others = and_(executors.c.token_hash == binding.token_hash, executors.c.id != agent_id, live)
    taken = conn.execute(select(func.count()).select_from(executors).where(others)).scalar() or 0
    if taken >= binding.agents:
        first = conn.execute(select(func.min(executors.c.id)).where(others)).scalar()
        raise PermissionDenied(
            f"this agent token is bound to agent {first}"
            + (f" and {taken - 1} other(s)" if taken > 1 else "")
            + f" (it serves {binding.agents} live agent(s)); mint a token per agent "
            "(htc admin create-agent-token) or one for a fleet (--agents N)"
        )


class AgentRows:
    """Mixed into QueueStore (store/queue.py): ``db`` and ``_writes`` are its (the dashboard's last
    hour is tallied by ``StatusWrites.flush`` itself)."""

    db: Database

    def _writes(self, conn: Connection, now: float, executor_id: str | None = None) -> StatusWrites:
        raise NotImplementedError

    def set_draining(self, agent_id: str, incarnation: str) -> None:
        """The agent stops: no server gives it a new job until it registers again."""
        with self.db.write() as conn:
            conn.execute(
                executors.update()
                .where(
                    and_(
                        executors.c.id == agent_id,
                        executors.c.incarnation == incarnation,
                        or_(executors.c.draining.is_(None), executors.c.draining.is_(False)),
                    )
                )
                .values(draining=True)
            )

    def agent_marks(self, agent_ids: Collection[str]) -> dict[str, tuple[str, bool, str | None, bool]]:
        """What may change in these agents' rows behind a server's back: agent id -> (its
        incarnation, whether it is lost, its token's hash, whether it drains). One read."""
        if not agent_ids:
            return {}
        query = select(
            executors.c.id, executors.c.incarnation, executors.c.lost_at, executors.c.token_hash,
            executors.c.draining,
        ).where(executors.c.id.in_(sorted(agent_ids)))  # fmt: skip
        with self.db.read() as conn:
            rows = conn.execute(query).all()
        return {r.id: (r.incarnation, r.lost_at is not None, r.token_hash, bool(r.draining)) for r in rows}

    def may_claim(self, conn: Connection, agent_id: str) -> bool:
        """In a claim's write transaction: whether the agent is live and not draining. Locks
        its row on PostgreSQL: the lost sweep (which updates it) waits for this claim to commit
        and then recovers what it claimed, or has committed and this claim takes nothing."""
        lock = "" if self.db.is_sqlite else " FOR UPDATE"
        row = conn.exec_driver_sql(
            self.db.sql(f"SELECT lost_at, draining, kind FROM executors WHERE id = ?{lock}"), (agent_id,)
        ).first()
        if row is None or row.kind != "agent":
            return True  # not an agent (an embedded executor): nothing to check
        return row.lost_at is None and not row.draining

    def release_unheld(
        self,
        agent_id: str,
        held: Collection[tuple[int, int]],
        now: float,
        suspected: Collection[tuple[int, int]],
    ) -> tuple[Applied, set[tuple[int, int]]]:
        """The agent's claimed-but-unreported leases it does not hold: their answer was lost on
        the way. Each goes back to the queue free (never handed over), but only if it was
        ``suspected`` already: missing from the agent's previous exchange too, so granted before
        it, and missed twice (a lease on its way through the agent, between two of its lists,
        is not taken for lost). Returns what changed and the leases missing now (to suspect at
        the next exchange)."""
        with self.db.read() as conn:  # the common case: every lease arrived, nothing to write
            rows = conn.execute(
                select(jobs.c.id, jobs.c.attempt).where(
                    and_(jobs.c.executor_id == agent_id, jobs.c.status == _CLAIMED)
                )
            ).all()
        keep = set(held)
        missing = {(r.id, r.attempt) for r in rows} - keep
        lost = missing.intersection(suspected)
        if not lost:
            return Applied(now, [], [], 0), missing
        with self.db.write() as conn:
            writes = self._writes(conn, now)
            for job in writes.load_ids([job_id for job_id, _ in lost]):
                # re-read under lock: still claimed by this agent, on the attempt it missed twice
                if job.executor_id == agent_id and job.status == _CLAIMED and (job.id, job.attempt) in lost:
                    writes.lose_executor(job, "the agent never received its lease", False)
            writes.flush()
        return writes.applied(), missing - lost
