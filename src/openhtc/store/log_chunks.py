"""Job logs in the database (table ``log_chunks``): what ``log_store = "database"`` keeps.

A log is keyed as its file is: (task id, parent job id, array index), then attempt; each row
holds a chunk of whole lines at its byte offset in the attempt's log. Chunks of one attempt
never overlap: a writer appends only at the attempt's end (``ends``), and two servers racing
on the same offset keep the first (``ON CONFLICT DO NOTHING``).
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import ColumnElement, and_, delete, func, select, tuple_

from openhtc.store.db import Database
from openhtc.store.tables import log_chunks as t

LogKey = tuple[str, str, int]  # (task id, parent job id, array index)
AttemptKey = tuple[str, str, int, int]  # LogKey + attempt
Chunk = tuple[int, bytes]  # (byte offset, data)


class LogChunkStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    def ends(self, attempts: Sequence[AttemptKey]) -> dict[AttemptKey, int]:
        """Where each attempt's log ends so far (0 when it has none)."""
        if not attempts:
            return {}
        cols = (t.c.task_id, t.c.parent_job_id, t.c.idx, t.c.attempt)
        query = (
            select(*cols, func.max(t.c.end_offset))
            .where(tuple_(*cols).in_([tuple(a) for a in attempts]))
            .group_by(*cols)
        )
        with self.db.read() as conn:
            found = {(r[0], r[1], int(r[2]), int(r[3])): int(r[4]) for r in conn.execute(query)}
        return {a: found.get(a, 0) for a in attempts}

    def insert(self, rows: Sequence[tuple[AttemptKey, int, bytes]]) -> int:
        """Add chunks (attempt, offset, data) in one statement; returns how many were new."""
        if not rows:
            return 0
        values = [
            {
                "task_id": a[0],
                "parent_job_id": a[1],
                "idx": a[2],
                "attempt": a[3],
                "byte_offset": offset,
                "end_offset": offset + len(data),
                "data": data,
            }
            for a, offset, data in rows
        ]
        stmt = self.db.upsert(t).values(values).on_conflict_do_nothing()
        with self.db.write() as conn:
            return int(conn.execute(stmt).rowcount or 0)

    def forward(self, key: LogKey, attempt: int, position: int, limit: int) -> list[Chunk]:
        """Up to ``limit`` chunks of an attempt that end after ``position``, oldest first."""
        query = (
            select(t.c.byte_offset, t.c.data)
            .where(_is(key, attempt), t.c.end_offset > position)
            .order_by(t.c.byte_offset)
            .limit(limit)
        )
        with self.db.read() as conn:
            return [(int(r[0]), bytes(r[1])) for r in conn.execute(query)]

    def backward(self, key: LogKey, attempt: int, end: int | None, limit: int) -> list[Chunk]:
        """Up to ``limit`` chunks of an attempt that start before ``end`` (None: all), newest first."""
        query = select(t.c.byte_offset, t.c.data).where(_is(key, attempt))
        if end is not None:
            query = query.where(t.c.byte_offset < end)
        query = query.order_by(t.c.byte_offset.desc()).limit(limit)
        with self.db.read() as conn:
            return [(int(r[0]), bytes(r[1])) for r in conn.execute(query)]

    def delete_task(self, task_id: str) -> int:
        with self.db.write() as conn:
            return int(conn.execute(delete(t).where(t.c.task_id == task_id)).rowcount or 0)

    def delete_tasks(self, task_ids: Sequence[str]) -> int:
        """Delete the chunks of these tasks; a few hundred ids per statement (each an index probe)."""
        deleted = 0
        for start in range(0, len(task_ids), 500):
            part = list(task_ids[start : start + 500])
            with self.db.write() as conn:
                deleted += int(conn.execute(delete(t).where(t.c.task_id.in_(part))).rowcount or 0)
        return deleted


def _is(key: LogKey, attempt: int) -> ColumnElement[bool]:
    return and_(t.c.task_id == key[0], t.c.parent_job_id == key[1], t.c.idx == key[2], t.c.attempt == attempt)
