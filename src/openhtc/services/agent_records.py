"""What a server remembers of each agent's record between its exchanges (services/agents.py).

Every exchange must know whether its caller still speaks for the agent: the agent's incarnation,
whether it was marked lost, the token it is bound to, its region. Reading the record each time
was a transaction per exchange: with 1,000 idle agents, most of what an idle exchange cost the
server. A record read once is trusted while the agent keeps calling this server, because none
of what it says can change behind a steady agent's back:

- only the leader's liveness sweep marks an agent lost, and only after it was silent for its
  liveness timeout. While the agent's calls reach this server less than ``liveness - 3 x beat``
  apart (the heartbeats are written in batches ``beat`` apart), it was never that silent.
  A heartbeat write that fails forgets everything (the sweep may not see this server's beats);
- an agent bound to a token is rebound to another only after it was marked lost (silent);
- a new incarnation (the agent restarted) registers, and its calls carry it: another
  incarnation is another entry; a register through this server forgets the old one;
- the drain flag is set by the agent's own exchange (and a claim reads it under lock anyway).

Besides, when a server writes its agents' heartbeats (once a second) it reads their rows back
(``agent_marks``: one read for all of them) and forgets those that changed (lost, another
incarnation, another token), so even an unforeseen change (two live processes under one agent
id, say) is seen within a second of the agent's next call; and a record is read again at least
every ``MAX_AGE_SECONDS`` whatever happens. And whatever the cache says, a claim still checks,
under the agent row's lock, that the agent is neither lost nor draining (store/agent_rows.py
``may_claim``): a lost agent gets no lease.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from openhtc.store.agent_rows import AgentState

MAX_AGE_SECONDS = 600.0


@dataclass(slots=True)
class _Known:
    incarnation: str
    token_hash: str | None
    state: AgentState
    read_at: float  # monotonic
    seen_at: float  # monotonic: the agent's last exchange through this server


class KnownAgents:
    """Agent records (only of agents that need not register again), by agent id; thread-safe."""

    def __init__(self, liveness: float, beat: float) -> None:
        self.gap = liveness - 3 * beat  # the longest silence that cannot hide a lost mark
        self._known: dict[str, _Known] = {}
        self._lock = threading.Lock()

    def get(self, agent_id: str, incarnation: str, token_hash: str | None, now: float) -> AgentState | None:
        """The record, if it may be trusted for a call at ``now`` (monotonic); the call counts as
        seen. None: read it (and ``put`` it)."""
        with self._lock:
            known = self._known.get(agent_id)
            if (
                known is None
                or known.incarnation != incarnation
                or known.token_hash != token_hash
                or now - known.read_at >= MAX_AGE_SECONDS
                or now - known.seen_at >= self.gap
            ):
                return None
            known.seen_at = now
            return known.state

    def put(
        self, agent_id: str, incarnation: str, token_hash: str | None, state: AgentState, now: float
    ) -> None:
        if state.reason is not None or self.gap <= 0:
            return
        with self._lock:
            if len(self._known) > 100000:  # agents come and go: never more than a fleet's worth
                self._known.clear()
            self._known[agent_id] = _Known(incarnation, token_hash, state, now, now)

    def ids(self) -> set[str]:
        with self._lock:
            return set(self._known)

    def refresh(self, marks: dict[str, tuple[str, bool, str | None, bool]], asked: set[str]) -> None:
        """The rows of the agents ``asked`` about, read after their heartbeats were written
        (``agent_marks``): an agent whose row is gone, lost, of another incarnation or bound to
        another token is forgotten (its next call reads it and is answered 409 or 403)."""
        with self._lock:
            for agent_id in asked:
                known = self._known.get(agent_id)
                if known is None:
                    continue
                mark = marks.get(agent_id)
                same = mark is not None and (mark[0], mark[2]) == (known.incarnation, known.state.token_hash)
                if mark is None or mark[1] or not same:
                    del self._known[agent_id]
                elif mark[3] and not known.state.draining:
                    known.state = known.state._replace(draining=True)

    def draining(self, agent_id: str) -> None:
        """The agent said it drains (its row says so now)."""
        with self._lock:
            known = self._known.get(agent_id)
            if known is not None:
                known.state = known.state._replace(draining=True)

    def forget(self, agent_id: str) -> None:
        with self._lock:
            self._known.pop(agent_id, None)

    def clear(self) -> None:
        with self._lock:
            self._known.clear()
