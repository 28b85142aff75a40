"""PostgreSQL's planner statistics follow a burst of jobs (store/planner_stats.py).

The symptom it fixes: plans made while ``jobs`` was small (a prepared statement's cached generic
plan) kept scanning the whole table after a large submit, until autovacuum analysed it a
minute or more later; the reports' and claims' lookups by id cost 0.1 ms per row.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import psycopg

from openhtc.services.periodic import StatisticsRefresher
from openhtc.store.leader_lock import psycopg_params
from openhtc.store.planner_stats import PlannerStatistics
from openhtc.testing.inprocess import StoreHarness, in_process_services

BURST = 20_000
BATCH = 1000  # the API's largest batchSize


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

        deadline = time.monotonic() + 30  # the inserting backend reports its changes within ~10 s
        while "jobs" not in statistics.stale():
            assert time.monotonic() < deadline, "the burst never showed as changes since the analysis"
            time.sleep(0.2)
        assert "jobs" in statistics.refresh()
        plan = _plan(conn, ids)
        assert "Seq Scan on jobs" not in plan and "Index" in plan, plan
        tuples = conn.execute("SELECT reltuples FROM pg_class WHERE relname = 'jobs'").fetchone()
        assert tuples is not None and tuples[0] >= BURST
        assert "jobs" not in statistics.stale()  # analysed: quiet until it changes again


def test_the_leader_refreshes_the_statistics_on_its_own(
    pg_url_factory: Callable[[], str], tmp_path: Path
) -> None:
    url = pg_url_factory()
    with in_process_services(
        tmp_path / "data", url, materialize_chunk=BURST, planner_statistics_seconds=0.2
    ) as services:
        harness = StoreHarness(services)
        project = harness.create_project()
        _burst(harness, project, harness.create_task(project))
        services.leadership.start()  # the only server: it leads at once
        loop = StatisticsRefresher(services)
        loop.start()
        try:
            deadline = time.monotonic() + 30
            while True:
                rows = harness.sql("SELECT reltuples FROM pg_class WHERE relname = 'jobs'")
                if rows[0][0] >= BURST:
                    break
                assert time.monotonic() < deadline, f"jobs never analysed: reltuples {rows[0][0]}"
                time.sleep(0.2)
        finally:
            loop.stop()
            services.leadership.stop()


def test_sqlite_has_nothing_to_analyse(tmp_path: Path) -> None:
    with in_process_services(tmp_path / "data", None) as services:
        assert PlannerStatistics(services.db).refresh() == []
