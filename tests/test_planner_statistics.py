"""PostgreSQL's planner statistics follow a burst of jobs (store/planner_stats.py).

The symptom it fixes: plans made while ``jobs`` was small (a prepared statement's cached generic
plan) kept scanning the whole table after a large submit, until autovacuum analysed it a
minute or more later; the reports' and claims' lookups by id cost 0.1 ms per row.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import psycopg

from openhtc.services.periodic import StatisticsRefresher
from openhtc.store.leader_lock import psycopg_params
from openhtc.store.planner_stats import HOT_TABLES, PlannerStatistics
from openhtc.testing.inprocess import StoreHarness, in_process_services

BURST = 20_000
BATCH = 1000  # the API's largest batchSize


def _no_autovacuum(conn: psycopg.Connection[tuple[object, ...]]) -> None:
    """Autovacuum stays off these tables: its own analysis would race the one under test."""
    for table in HOT_TABLES:
        conn.execute(f"ALTER TABLE {table} SET (autovacuum_enabled = off)")


def _manual_analyses(conn: psycopg.Connection[tuple[object, ...]]) -> int:
    """How many times ``jobs`` was analysed by a statement (autovacuum's are counted apart)."""
    row = conn.execute(
        "SELECT analyze_count FROM pg_stat_all_tables WHERE relid = 'jobs'::regclass"
    ).fetchone()
    return int(row[0]) if row else 0


def _wait_stale(statistics: PlannerStatistics) -> None:
    deadline = time.monotonic() + 30  # the inserting backend reports its changes within ~10 s
    while "jobs" not in statistics.stale():
        assert time.monotonic() < deadline, "the burst never showed as changes since the analysis"
        time.sleep(0.2)


def _burst(harness: StoreHarness, project: object, task: object) -> None:
    for _ in range(BURST // BATCH):
        harness.submit(project, task, harness.job_request(BATCH))


def _execute(ids: list[int]) -> str:
    """EXECUTE takes no bound parameters: the ids as an array literal (integers only)."""
    return f"EXECUTE by_id('{{{','.join(str(int(i)) for i in ids)}}}')"


def _plan(conn: psycopg.Connection[tuple[str]], ids: list[int]) -> str:
    return "\n".join(str(row[0]) for row in conn.execute("EXPLAIN " + _execute(ids)).fetchall())


def test_a_burst_of_jobs_is_analysed_and_cached_plans_use_the_index_again(
    pg_url_factory: Callable[[], str], tmp_path: Path
) -> None:
    url = pg_url_factory()
    with (
        in_process_services(tmp_path / "data", url, materialize_chunk=BURST) as services,
        psycopg.connect(**psycopg_params(url), autocommit=True) as conn,
    ):
        _no_autovacuum(conn)
        harness = StoreHarness(services)
        project = harness.create_project()
        task = harness.create_task(project)
        harness.submit(project, task, harness.job_request(5))
        conn.execute("ANALYZE jobs")  # as autovacuum does on a fresh installation's small table
        # A statement prepared and run while the table is small gets a generic plan it keeps.
        conn.execute("PREPARE by_id(bigint[]) AS SELECT id, status FROM jobs WHERE id = ANY($1)")
        small = [row[0] for row in conn.execute("SELECT id FROM jobs").fetchall()]
        for _ in range(6):
            conn.execute(_execute(small))
        statistics = PlannerStatistics(services.db)
        assert statistics.stale() == []

        _burst(harness, project, task)
        ids = [row[0] for row in conn.execute("SELECT id FROM jobs ORDER BY id DESC LIMIT 100").fetchall()]
        assert "Seq Scan on jobs" in _plan(conn, ids)  # the stale plan this is about

        _wait_stale(statistics)
        analysed = _manual_analyses(conn)
        assert "jobs" in statistics.refresh()
        assert _manual_analyses(conn) == analysed + 1
        plan = _plan(conn, ids)
        assert "Seq Scan on jobs" not in plan and "Index" in plan, plan
        tuples = conn.execute("SELECT reltuples FROM pg_class WHERE relname = 'jobs'").fetchone()
        assert tuples is not None and tuples[0] >= BURST
        assert "jobs" not in statistics.stale()  # analysed: quiet until it changes again


def test_the_leader_refreshes_the_statistics_on_its_own(
    pg_url_factory: Callable[[], str], tmp_path: Path
) -> None:
    url = pg_url_factory()
    with (
        in_process_services(
            tmp_path / "data", url, materialize_chunk=BURST, planner_statistics_seconds=0.2
        ) as services,
        psycopg.connect(**psycopg_params(url), autocommit=True) as conn,
    ):
        _no_autovacuum(conn)
        harness = StoreHarness(services)
        project = harness.create_project()
        analysed = _manual_analyses(conn)
        _burst(harness, project, harness.create_task(project))
        services.leadership.start()  # the only server: it leads at once
        loop = StatisticsRefresher(services)
        loop.start()
        try:
            deadline = time.monotonic() + 30
            while _manual_analyses(conn) == analysed:
                assert time.monotonic() < deadline, "the leader never analysed jobs"
                time.sleep(0.2)
        finally:
            loop.stop()
            services.leadership.stop()
        row = conn.execute("SELECT reltuples FROM pg_class WHERE relname = 'jobs'").fetchone()
        assert row is not None and row[0] >= BURST


def test_a_table_locked_by_maintenance_is_skipped_without_waiting(
    pg_url_factory: Callable[[], str], tmp_path: Path
) -> None:
    """ANALYZE waiting behind autovacuum would cancel it; a VACUUM or an index build in progress
    must not stall the round either: a locked table is left for the next round."""
    url = pg_url_factory()
    with (
        in_process_services(tmp_path / "data", url, materialize_chunk=BURST) as services,
        psycopg.connect(**psycopg_params(url), autocommit=True) as conn,
        psycopg.connect(**psycopg_params(url)) as holder,
    ):
        _no_autovacuum(conn)
        harness = StoreHarness(services)
        project = harness.create_project()
        _burst(harness, project, harness.create_task(project))
        statistics = PlannerStatistics(services.db)
        _wait_stale(statistics)
        analysed = _manual_analyses(conn)
        holder.execute("LOCK TABLE jobs IN SHARE UPDATE EXCLUSIVE MODE")  # as a VACUUM holds it
        finished: list[list[str]] = []
        worker = threading.Thread(target=lambda: finished.append(statistics.refresh()), daemon=True)
        worker.start()
        worker.join(20)  # a wait for the lock would last until it is released (or 30 s)
        assert finished, "the refresh waited for the locked table"
        assert "jobs" not in finished[0] and _manual_analyses(conn) == analysed
        holder.rollback()  # the lock is gone: the next round analyses it
        assert "jobs" in statistics.refresh()
        assert _manual_analyses(conn) == analysed + 1


def test_sqlite_has_nothing_to_analyse(tmp_path: Path) -> None:
    with in_process_services(tmp_path / "data", None) as services:
        assert PlannerStatistics(services.db).refresh() == []
