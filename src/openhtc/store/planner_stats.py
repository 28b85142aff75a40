"""PostgreSQL's planner statistics kept in step with bursts of rows.

A batch of 100,000 jobs or function calls can grow ``jobs`` tenfold in a second. Until the
table is analysed again the planner still sees the old size, and plans it made then (a cached
generic plan of a prepared statement, say) stay: the reports' ``WHERE id = ANY(…)`` update and
the report's row load ran as sequential scans of the whole table, 0.1 ms per row, the
database's main cost per function call (docs/performance.md, "FN: the planner's stale
statistics"). Autovacuum analyses a table once its changes pass 10 % of its rows, but looks
only once a minute (``autovacuum_naptime``) and is sometimes off. The leader runs
:meth:`PlannerStatistics.refresh` every few seconds instead: one catalog read, and ``ANALYZE``
of a hot table only when it changed by more than ``ROWS + FRACTION x`` its rows since the last
analysis (the same rule as autovacuum's, run sooner). ANALYZE reads a bounded sample (30,000
rows at the default statistics target) and invalidates the cached plans of the table it
analysed. SQLite has no such statistics to go stale here: nothing to do.
"""

from __future__ import annotations

from openhtc.store.db import Database

# The tables whose size changes with the work and whose plans depend on it.
HOT_TABLES = ("jobs", "function_calls", "job_events", "batches", "log_chunks")
ROWS = 1000  # changed rows below which a table is never analysed again (small tables plan fine)
FRACTION = 0.2  # ... plus this share of the rows it had at its last analysis


class PlannerStatistics:
    def __init__(self, db: Database) -> None:
        self.db = db

    def stale(self) -> list[str]:
        """The hot tables changed enough since their last analysis to be analysed again."""
        if self.db.is_sqlite:
            return []
        with self.db.read() as conn:
            cur = self.db.cursor(conn)
            cur.execute(
                "SELECT s.relname, s.n_mod_since_analyze, GREATEST(c.reltuples, 0)"
                " FROM pg_stat_user_tables s JOIN pg_class c ON c.oid = s.relid"
                " WHERE s.schemaname = current_schema() AND s.relname = ANY(%s)",
                (list(HOT_TABLES),),
            )
            rows = cur.fetchall()
        return sorted(name for name, changed, tuples in rows if changed > ROWS + FRACTION * tuples)

    def refresh(self) -> list[str]:
        """Analyse each stale hot table; returns their names."""
        tables = self.stale()
        for table in tables:  # one statement each: a slow one does not hold the others' plans back
            with self.db.read() as conn:
                self.db.cursor(conn).execute(f"ANALYZE {table}")
        return tables
