"""PostgreSQL's planner statistics kept in step with bursts of rows.

A batch of 100,000 jobs or function calls can grow ``jobs`` tenfold in a second. Until the
table is analysed again, plans made while it was small stay (a prepared statement's cached
generic plan): the reports' ``WHERE id = ANY(…)`` update and the row load ran as sequential
scans of the whole table, 0.1 ms per row, the database's main cost per function call
(docs/performance.md, "FN: the planner's stale statistics"). Autovacuum analyses a table once
its changes pass 50 rows + 10 % of it, but looks only once a minute (``autovacuum_naptime``).
The leader runs :meth:`PlannerStatistics.refresh` every few seconds instead: one catalog read,
and ``ANALYZE`` of a hot table only when it changed by more than ``ROWS + FRACTION x`` its
rows since its last analysis. ANALYZE reads a bounded sample (30,000 rows at the default
statistics target) and invalidates the cached plans of the table it analysed.

It never waits for a lock and never stands in maintenance's way: a table that a VACUUM or
ANALYZE is working on is left for the next round, and so is one locked meanwhile (its lock is
taken with NOWAIT: waiting behind autovacuum for a second would cancel it, and analysing this
often could then keep autovacuum from ever finishing); a timeout bounds the rest. SQLite
has no such statistics to go stale here: nothing to do.
"""

from __future__ import annotations

import logging

from openhtc.domain.errors import Unavailable
from openhtc.store.db import Database

log = logging.getLogger("openhtc.statistics")

# The tables whose size changes with the work and whose plans depend on it.
HOT_TABLES = ("jobs", "function_calls", "job_events", "batches", "log_chunks")
ROWS = 1000  # changed rows below which a table is never analysed again (small tables plan fine)
FRACTION = 0.2  # ... plus this share of the rows it had at its last analysis
TIMEOUT_MS = 30_000  # an ANALYZE that takes longer (a huge table on a slow disk) gives up
LOCK_NOT_AVAILABLE = "55P03"


class PlannerStatistics:
    def __init__(self, db: Database) -> None:
        self.db = db

    def stale(self) -> list[str]:
        """The hot tables changed enough since their last analysis to be analysed again (not
        those a VACUUM or ANALYZE is working on now). Tables are found as the server's own
        statements find them (``to_regclass``: the search path), in whatever schema."""
        if self.db.is_sqlite:
            return []
        with self.db.read() as conn:
            cur = self.db.cursor(conn)
            cur.execute(
                "SELECT t.name, s.n_mod_since_analyze, GREATEST(c.reltuples, 0)"
                " FROM unnest(%s::text[]) AS t(name)"
                " JOIN pg_class c ON c.oid = to_regclass(t.name)"
                " JOIN pg_stat_all_tables s ON s.relid = c.oid"
                " WHERE c.oid NOT IN (SELECT relid FROM pg_stat_progress_vacuum)"
                " AND c.oid NOT IN (SELECT relid FROM pg_stat_progress_analyze)",
                (list(HOT_TABLES),),
            )
            rows = cur.fetchall()
        return sorted(name for name, changed, tuples in rows if changed > ROWS + FRACTION * tuples)

    def refresh(self) -> list[str]:
        """Analyse each stale hot table; returns the names of those it analysed. A table that
        fails (a timeout; a lock taken meanwhile is skipped without one) is left for the next
        round, and the others are still analysed; with the database away, the round ends."""
        done: list[str] = []
        try:
            for table in self.stale():  # one each: a slow one does not hold the others' back
                try:
                    with self.db.write() as conn:
                        cur = self.db.cursor(conn)
                        cur.execute(f"SET LOCAL statement_timeout = {TIMEOUT_MS}")
                        # ANALYZE's own lock, taken without waiting: held by maintenance, the
                        # table waits for the next round (ANALYZE (SKIP_LOCKED) would skip it
                        # too, saying so only in a warning)
                        cur.execute(f"LOCK TABLE {table} IN SHARE UPDATE EXCLUSIVE MODE NOWAIT")
                        cur.execute(f"ANALYZE {table}")
                    done.append(table)
                except Unavailable:
                    raise
                except Exception as exc:  # this table only (locked, a timeout): the next round
                    if getattr(exc, "sqlstate", None) == LOCK_NOT_AVAILABLE:
                        log.debug("%s is locked by maintenance: analysed later", table)
                    else:
                        log.warning("analysing %s failed: %s", table, exc)
        except Unavailable:  # the leader steps down meanwhile; nothing to say every round
            log.debug("the database is away: no statistics refreshed")
        return done
