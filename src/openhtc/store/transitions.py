"""Applies job state changes: compare-and-set row updates, events and counters in one go.

Every status write in openhtc goes through :func:`apply`, inside the caller's transaction, so
the per (task, group, status) counters can never drift from the job rows.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, and_, bindparam, update

from openhtc.domain.enums import JobStatus
from openhtc.domain.errors import OpenHTCError
from openhtc.domain.states import check_transition
from openhtc.store.db import Database
from openhtc.store.tables import job_counters, job_events, jobs

# Columns a caller must select for the rows it hands to apply().
STATE_COLUMNS = (
    jobs.c.id,
    jobs.c.status,
    jobs.c.attempt,
    jobs.c.task_id,
    jobs.c.group_name,
    jobs.c.project_id,
    jobs.c.vcpus,
    jobs.c.executor_id,
)


class StoreConsistencyError(OpenHTCError):
    """A compare-and-set write found a row in an unexpected state."""


@dataclass(slots=True)
class Change:
    """Move one job from the status in ``row`` through ``events`` to ``final`` with ``values``."""

    row: Any  # a Row with STATE_COLUMNS
    final: JobStatus
    values: dict[str, Any] = field(default_factory=dict)
    # (status, attempt, at, reason, exit_code, cancelled) for each step, oldest first
    events: list[tuple[JobStatus, int, float, str | None, int | None, bool]] = field(default_factory=list)


def bump_counters(db: Database, conn: Connection, deltas: dict[tuple[str, str, int, str], list[int]]) -> None:
    """Add (count, vCPU) deltas keyed by (task, group, status, project)."""
    rows = [
        {"task_id": t, "group_name": g, "status": s, "project_id": p, "count": d[0], "vcpus": d[1]}
        for (t, g, s, p), d in deltas.items()
        if d[0] or d[1]
    ]
    if not rows:
        return
    stmt = db.upsert(job_counters)
    stmt = stmt.on_conflict_do_update(
        index_elements=["task_id", "group_name", "status"],
        set_={
            "count": job_counters.c.count + stmt.excluded.count,
            "vcpus": job_counters.c.vcpus + stmt.excluded.vcpus,
        },
    )
    conn.execute(stmt, rows)


def apply(
    db: Database, conn: Connection, changes: Sequence[Change], now: float, executor_id: str | None = None
) -> None:
    """Write ``changes``: one CAS update per job, one event per step, counters by delta."""
    if not changes:
        return
    deltas: dict[tuple[str, str, int, str], list[int]] = defaultdict(lambda: [0, 0])
    event_rows: list[dict[str, Any]] = []
    by_columns: dict[tuple[str, ...], list[dict[str, Any]]] = defaultdict(list)
    for change in changes:
        row = change.row
        src = JobStatus(row.status)
        step_from = src
        for status, attempt, at, reason, exit_code, cancelled in change.events:
            if status != JobStatus.SUBMITTED_TO_RESCALE or step_from != JobStatus.FAILED:
                check_transition(row.id, step_from, status)
            step_from = status
            event_rows.append(
                {
                    "job_id": row.id,
                    "attempt": attempt,
                    "status": int(status),
                    "at": at,
                    "reason": reason,
                    "exit_code": exit_code,
                    "executor_id": executor_id or row.executor_id,
                    "cancelled": cancelled,
                }
            )
        if change.final != src:
            key_from = (row.task_id, row.group_name, int(src), row.project_id)
            key_to = (row.task_id, row.group_name, int(change.final), row.project_id)
            deltas[key_from][0] -= 1
            deltas[key_from][1] -= row.vcpus
            deltas[key_to][0] += 1
            deltas[key_to][1] += row.vcpus
        values = {"status": int(change.final), "updated_at": now, **change.values}
        params = {f"v_{k}": v for k, v in values.items()}
        params.update(b_id=row.id, b_status=row.status, b_attempt=row.attempt)
        by_columns[tuple(sorted(values))].append(params)
    for columns, params_list in by_columns.items():
        stmt = (
            update(jobs)
            .where(
                and_(
                    jobs.c.id == bindparam("b_id"),
                    jobs.c.status == bindparam("b_status"),
                    jobs.c.attempt == bindparam("b_attempt"),
                )
            )
            .values({c: bindparam(f"v_{c}") for c in columns})
        )
        result = conn.execute(stmt, params_list)
        if result.rowcount not in (-1, len(params_list)):
            raise StoreConsistencyError(f"{len(params_list) - result.rowcount} job rows changed under us")
    if event_rows:
        conn.execute(job_events.insert(), event_rows)
    bump_counters(db, conn, deltas)


def chunks(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
