"""Function tasks: the calls of a function batch (services/functions.py).

A call is a job of its batch (same id, index, statuses); ``function_calls`` adds what a job has
not: its event (JSON text, written with the batch) and its result or error (written by the
executor just before it reports the job's end, so a terminal job always has them).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection

from openhtc.domain.enums import JobStatus
from openhtc.store.db import BulkStatement, Database, json_rows

_RESULT_COLUMNS = (
    ("result", "text"),
    ("error", "text"),
    ("result_key", "text"),
    ("attempt", "int"),
    ("batch_id", "bigint"),
    ("idx", "int"),
)
# A call's result, only where its job is still at that attempt, held by that executor and not
# ended (the embedded executor's report; an agent's goes through _SAVE_FENCED).
_CURRENT = (
    f"j.attempt = v.attempt AND j.executor_id = v.executor_id AND j.status < {int(JobStatus.SUCCEEDED)}"
)
_SAVE_CURRENT = BulkStatement(
    sqlite="UPDATE function_calls SET result = ?1, error = ?2, result_key = ?3, attempt = ?4"
    " WHERE batch_id = ?5 AND idx = ?6 AND EXISTS (SELECT 1 FROM jobs j WHERE j.batch_id = ?5"
    f" AND j.idx = ?6 AND j.attempt = ?4 AND j.executor_id = ?7 AND j.status < {int(JobStatus.SUCCEEDED)})",
    postgres="UPDATE function_calls f SET result = v.result, error = v.error, result_key = v.result_key,"
    f" attempt = v.attempt FROM {json_rows((*_RESULT_COLUMNS, ('executor_id', 'text')))}, jobs j"
    " WHERE f.batch_id = v.batch_id AND f.idx = v.idx AND j.batch_id = v.batch_id AND j.idx = v.idx"
    f" AND {_CURRENT}",
)
_TERMINAL_SQL = f"{int(JobStatus.SUCCEEDED)},{int(JobStatus.FAILED)}"
_OK, _FAILED = int(JobStatus.SUCCEEDED), int(JobStatus.FAILED)
# SQLite: a page of ended calls as the API's JSON items, in index order (the subquery's order,
# which SQLite's aggregate keeps: its rows come off the (batch_id, idx) index; 3.44 would let the
# aggregate say ORDER BY itself), with what tells whether it can stand in for
# FunctionStore.page_and_counts: the rows' count and first and last index, and whether a result is kept in
# storage (a call in the range that has not ended is left out: a gap, so not this page). The
# same fields as services/functions.py ``_item``: an error is the handler's when
# written by the call's last attempt, else the platform's failure.
_PAGE_JSON = (
    "SELECT COUNT(*), MIN(idx), MAX(idx), MAX(stored), json_group_array(json(item)) FROM ("
    "SELECT j.idx AS idx, f.result_key IS NOT NULL AS stored, json_object('index', j.idx,"
    f" 'status', CASE j.status WHEN {_OK} THEN 'SUCCEEDED' ELSE 'FAILED' END,"
    f" 'result', CASE WHEN j.status = {_OK} THEN json(f.result) END,"
    f" 'error', CASE WHEN j.status = {_FAILED} THEN CASE WHEN f.error IS NOT NULL AND f.attempt = j.attempt"
    " THEN json(f.error) ELSE json_object('type', COALESCE(j.failure_code, 'ErrorUnknownFailure'),"
    " 'message', COALESCE(j.status_reason, ''), 'traceback', '') END END,"
    " 'attempt', j.attempt, 'failureCode', j.failure_code) AS item"
    " FROM jobs j JOIN function_calls f ON f.batch_id = j.batch_id AND f.idx = j.idx"
    f" WHERE j.batch_id = ? AND j.idx >= ? AND j.idx < ? AND j.status IN ({_OK}, {_FAILED}) ORDER BY j.idx)"
)
# An agent's result: written only while the attempt is still that agent's and has not ended
# (a stale attempt's result is refused; a duplicate, after the end, changes nothing).
_SAVE_FENCED = (
    "UPDATE function_calls SET result = ?, error = ?, result_key = ?, attempt = ? FROM jobs"
    " WHERE jobs.id = ? AND jobs.attempt = ? AND jobs.executor_id = ?"
    f" AND jobs.status < {int(JobStatus.SUCCEEDED)}"
    " AND function_calls.batch_id = jobs.batch_id AND function_calls.idx = jobs.idx"
)


def save_in(db: Database, conn: Connection, results: Sequence[CallResult], executor_id: str) -> None:
    """Record call results in the caller's transaction (the embedded executor's report: a
    call's result is committed with its end status, never after it), each only while its
    attempt is ``executor_id``'s current one and has not ended, as an agent's (a report
    retried after a long outage must not overwrite a later attempt's result)."""
    if not results:
        return
    rows: list[tuple[Any, ...]] = [
        (r.result, r.error, r.result_key, r.attempt, r.batch_id, r.idx) for r in results
    ]
    db.run_bulk(db.cursor(conn), _SAVE_CURRENT, [(*row, executor_id) for row in rows])


@dataclass(frozen=True, slots=True)
class CallResult:
    """What an executor saves for one call attempt (exactly one of result, error, result_key)."""

    batch_id: int
    idx: int
    attempt: int
    result: str | None  # JSON text
    error: str | None  # JSON text: {"type", "message", "traceback"}
    result_key: str | None = None  # task storage key of a large result


@dataclass(frozen=True, slots=True)
class ReportedResult:
    """A call's result as an agent reports it, by job and attempt (one of result, error, key)."""

    job_id: int
    attempt: int
    result: str | None
    error: str | None
    result_key: str | None = None


@dataclass(frozen=True, slots=True)
class JsonPage:
    items: str  # a JSON array of result items (services/functions.py ``_item``'s shape)
    count: int


@dataclass(frozen=True, slots=True)
class CallRow:
    idx: int
    status: int
    attempt: int
    failure_code: str | None
    status_reason: str | None
    result: str | None
    error: str | None
    result_key: str | None
    result_attempt: int | None


class FunctionStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    def insert_events(self, conn: Connection, batch_id: int, events_json: str) -> None:
        """A batch's events, from the JSON array of them, as one statement: the database splits
        the array (no Python tuple per event)."""
        cur = self.db.cursor(conn)
        if self.db.is_sqlite:
            # json_each gives SQL values; a value's JSON text is rebuilt from its type.
            cur.execute(
                "INSERT INTO function_calls (batch_id, idx, event) SELECT ?, key, CASE type"
                " WHEN 'object' THEN value WHEN 'array' THEN value WHEN 'text' THEN json_quote(value)"
                " WHEN 'true' THEN 'true' WHEN 'false' THEN 'false' WHEN 'null' THEN 'null'"
                " ELSE CAST(value AS TEXT) END FROM json_each(?)",
                (batch_id, events_json),
            )
        else:
            cur.execute(
                "INSERT INTO function_calls (batch_id, idx, event) SELECT %s, n - 1, v::text"
                " FROM json_array_elements(%s::json) WITH ORDINALITY AS t(v, n)",
                (batch_id, events_json),
            )

    def events(self, batch_id: int, start: int, stop: int) -> dict[int, str]:
        """The events of calls ``start <= idx < stop`` of a batch."""
        with self.db.read() as conn:
            cur = self.db.cursor(conn)
            cur.execute(
                self.db.sql(
                    "SELECT idx, event FROM function_calls WHERE batch_id = ? AND idx >= ? AND idx < ?"
                ),
                (batch_id, start, stop),
            )
            return {int(idx): str(event) for idx, event in cur.fetchall()}

    def events_at(self, batch_id: int, indices: Sequence[int]) -> dict[int, str]:
        """The events of these calls of a batch (the calls leased to an agent)."""
        out: dict[int, str] = {}
        with self.db.read() as conn:
            cur = self.db.cursor(conn)
            for at in range(0, len(indices), 500):
                part = list(indices[at : at + 500])
                marks = ",".join("?" * len(part))
                cur.execute(
                    self.db.sql(
                        f"SELECT idx, event FROM function_calls WHERE batch_id = ? AND idx IN ({marks})"
                    ),
                    (batch_id, *part),
                )
                out.update((int(idx), str(event)) for idx, event in cur.fetchall())
        return out

    def save_reported(self, agent_id: str, results: Sequence[ReportedResult]) -> None:
        """Record the results an agent reported, in one transaction, each only if its attempt
        is still the agent's current one and has not ended."""
        if not results:
            return
        rows = [(r.result, r.error, r.result_key, r.attempt, r.job_id, r.attempt, agent_id) for r in results]
        with self.db.write() as conn:
            self.db.cursor(conn).executemany(self.db.sql(_SAVE_FENCED), rows)

    def page_and_counts(
        self, conn: Connection, batch: Any, start: int, limit: int
    ) -> tuple[list[CallRow], tuple[int, int]]:
        """The calls ``start <= idx < start + limit`` of ``batch`` that have job rows, by index,
        up to the first that has not ended (a reader polling a running batch reads what it
        gets, not ``limit`` rows each time), and the batch's :meth:`counts`.

        Range reads of one table each, on their (batch_id, idx) indexes, merged here: the
        join of both tables was planned as a nested loop over a scan on PostgreSQL right after
        a batch's insert (no statistics yet), seconds per page. PostgreSQL: all in one round
        trip (a lone call's answer waits on this read), each read bounded by the first call
        that has not ended, found by the same statement; the reads are in that order, so the
        results read last are those of the jobs read first or later (a call's result commits
        with its end)."""
        cur, other, third = self.db.cursor(conn), self.db.cursor(conn), self.db.cursor(conn)
        batch_id, stop = batch.id, start + limit
        if self.db.is_sqlite:
            stop = self._ended_until(cur, batch_id, start, stop)
            if stop <= start:
                return [], self.counts(conn, batch)
            bound = "?"
            bounds: tuple[Any, ...] = (stop,)
        else:
            bound = (
                "COALESCE((SELECT idx FROM jobs WHERE batch_id = ? AND idx >= ? AND idx < ?"
                f" AND status NOT IN ({_TERMINAL_SQL}) ORDER BY idx LIMIT 1), ?)"
            )
            bounds = (batch_id, start, stop, stop)
        with self.db.pipelined(conn):  # PostgreSQL: one round trip
            cur.execute(
                self.db.sql(
                    "SELECT idx, status, attempt, failure_code, status_reason FROM jobs"
                    f" WHERE batch_id = ? AND idx >= ? AND idx < {bound} ORDER BY idx"
                ),
                (batch_id, start, *bounds),
            )
            other.execute(
                self.db.sql(
                    "SELECT idx, result, error, result_key, attempt FROM function_calls"
                    f" WHERE batch_id = ? AND idx >= ? AND idx < {bound} ORDER BY idx"
                ),
                (batch_id, start, *bounds),
            )
            third.execute(*self._counts_query(batch))
        jobs = cur.fetchall()
        calls = {int(row[0]): row for row in other.fetchall()}
        rows: list[CallRow] = []
        for idx, status, attempt, failure_code, reason in jobs:
            call = calls.get(int(idx))
            if call is not None:
                rows.append(CallRow(idx, status, attempt, failure_code, reason, *call[1:]))
        return rows, self._counted(third)

    def page_json(self, conn: Connection, batch_id: int, start: int, limit: int) -> JsonPage | None:
        """SQLite: the page :meth:`page_and_counts` reads, as the JSON array of result items the API
        answers, built by the database in one statement (no Python object per call: at
        10,000 calls a second the page's rows, objects and encoding were a sixth of the
        server's time). None where it cannot: on PostgreSQL, or when a call's result is kept
        in storage or a row in the range is missing (then :meth:`page_and_counts`)."""
        if not self.db.is_sqlite:
            return None
        cur = self.db.cursor(conn)
        stop = self._ended_until(cur, batch_id, start, start + limit)
        if stop <= start:
            return JsonPage("[]", 0)
        try:
            cur.execute(_PAGE_JSON, (batch_id, start, stop))
        except (sqlite3.DataError, sqlite3.OperationalError):  # over SQLite's 1 GB string, or a
            return None  # stored text that is not JSON (an agent's): row by row, as it always was
        count, first, last, stored, items = cur.fetchone()
        if count and (stored or first != start or last != start + count - 1):
            return None  # a result in storage, or a gap: rows not written yet (the reader's stop)
        return JsonPage(items or "[]", int(count))

    def _ended_until(self, cur: Any, batch_id: int, start: int, stop: int) -> int:
        """The first call in ``start <= idx < stop`` that has not ended, else ``stop``."""
        cur.execute(
            self.db.sql(
                "SELECT idx FROM jobs WHERE batch_id = ? AND idx >= ? AND idx < ?"
                f" AND status NOT IN ({_TERMINAL_SQL}) ORDER BY idx LIMIT 1"
            ),
            (batch_id, start, stop),
        )
        first = cur.fetchone()
        return stop if first is None else int(first[0])

    def counts(self, conn: Connection, batch: Any) -> tuple[int, int]:
        """(ended, failed) calls of a batch: from the task's counters when the batch is alone in
        its group (the default group is the batch's own), else by reading its jobs."""
        cur = self.db.cursor(conn)
        cur.execute(*self._counts_query(batch))
        return self._counted(cur)

    def _counts_query(self, batch: Any) -> tuple[str, tuple[Any, ...]]:
        if batch.group_name == batch.parent_job_id:
            return self.db.sql(
                "SELECT status, count FROM job_counters WHERE task_id = ? AND group_name = ?"
                f" AND status IN ({_TERMINAL_SQL})"
            ), (batch.task_id, batch.group_name)
        return self.db.sql(
            f"SELECT status, COUNT(*) FROM jobs WHERE batch_id = ? AND status IN ({_TERMINAL_SQL})"
            " GROUP BY status"
        ), (batch.id,)

    @staticmethod
    def _counted(cur: Any) -> tuple[int, int]:
        counts = {int(status): int(n) for status, n in cur.fetchall()}
        failed = counts.get(int(JobStatus.FAILED), 0)
        return counts.get(int(JobStatus.SUCCEEDED), 0) + failed, failed

    def is_function_batch(self, conn: Connection, batch_id: int) -> bool:
        cur = self.db.cursor(conn)
        cur.execute(self.db.sql("SELECT 1 FROM function_calls WHERE batch_id = ? AND idx = 0"), (batch_id,))
        return cur.fetchone() is not None
