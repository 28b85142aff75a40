"""The store reads the metrics make at scrape time."""

from __future__ import annotations

from sqlalchemy import case, func, select

from openhtc.store.db import Database
from openhtc.store.tables import executors


def executors_by_state(db: Database, heard_since: float) -> list[tuple[str, int, int]]:
    """(state, executors, vCPUs) for 'online' (heard from since ``heard_since``) and 'lost'."""
    state = case((executors.c.last_heartbeat >= heard_since, "online"), else_="lost")
    stmt = select(state, func.count(), func.coalesce(func.sum(executors.c.vcpus), 0)).group_by(state)
    with db.read() as conn:
        return [(str(s), int(n), int(cpu)) for s, n, cpu in conn.execute(stmt)]
