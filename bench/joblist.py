"""``python -m bench.joblist``: the dashboard's job list on a task of a million jobs.

Builds one task of N job rows directly in a fresh database (SQLite or a private PostgreSQL):
all SUCCEEDED but 0.05 % FAILED with a failure code spread over the task, and the last 50
RUNNING; 100 groups. Then times the first page and a page from the middle of the list for each
filter the dashboard offers (none, group, failure code, status), through the same store read
the page makes (``JobStore.list_jobs``), and prints each query's plan. Nothing is asserted.

    python -m bench.joblist                     # N=1,000,000 on SQLite and PostgreSQL
    python -m bench.joblist --n 100000 --db sqlite
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from sqlalchemy import text

from bench.common import log
from openhtc.domain.enums import JobStatus
from openhtc.testing.inprocess import StoreHarness, in_process_services
from openhtc.testing.postgres import PostgresCluster

PAGE = 51
CODE = "ErrorNonZeroContainerExitCode"


def fill(services: Any, task: Any, batch_id: int, n: int) -> None:
    """N rows: ids 1..N, group g-(i % 100), FAILED with CODE every 2,000th, the last 50 RUNNING."""
    status = (
        f"CASE WHEN i > {n - 50} THEN {int(JobStatus.RUNNING)} WHEN i % 2000 = 0 THEN {int(JobStatus.FAILED)}"
        f" ELSE {int(JobStatus.SUCCEEDED)} END"
    )
    code = f"CASE WHEN i % 2000 = 0 AND i <= {n - 50} THEN '{CODE}' END"
    columns = (
        "id, batch_id, idx, task_id, project_id, group_name, region, architecture, status, attempt,"
        " failed_attempts, priority, vcpus, memory_mb, created_at, updated_at, failure_code, cancelled"
    )
    values = (
        f"i, {batch_id}, i - 1, '{task.id}', '{task.project_id}', 'g-' || (i % 100), 'r', 'X86', {status},"
        f" 1, 0, 1, 1, 64, 0, 0, {code}, false"
    )
    if services.db.is_sqlite:
        numbers = f"WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < {n})"
        source = f"{numbers} SELECT {values} FROM s"
    else:
        source = f"SELECT {values} FROM generate_series(1, {n}) AS s(i)"
    with services.db.write() as conn:
        conn.execute(text(f"INSERT INTO jobs ({columns}) {source}"))
    with services.db.write() as conn:
        conn.execute(text("ANALYZE"))


def timed(services: Any, task_id: str, after: int, **filters: Any) -> float:
    samples = []
    for _ in range(5):
        start = time.perf_counter()
        with services.db.read() as conn:
            services.jobs.list_jobs(conn, task_id, after_id=after, limit=PAGE, **filters)
        samples.append(1000 * (time.perf_counter() - start))
    return statistics.median(samples)


def plan(services: Any, task_id: str, after: int, **filters: Any) -> str:
    with services.db.read() as conn:
        stmt = services.jobs.list_statement(conn, task_id, after, PAGE, **filters)
        sql = str(stmt.compile(conn, compile_kwargs={"literal_binds": True}))
        if services.db.is_sqlite:
            return "; ".join(str(r[-1]) for r in conn.execute(text("EXPLAIN QUERY PLAN " + sql)))
        return "; ".join(r[0].strip() for r in conn.execute(text("EXPLAIN " + sql)))


def run(db: str, n: int, url: str | None) -> list[tuple[str, float, float, str]]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp, in_process_services(Path(tmp), url) as services:
        harness = StoreHarness(services)
        project = harness.create_project()
        task = harness.create_task(project)
        harness.submit(project, task, harness.job_request(1))  # a batch row for the jobs to point at
        with services.db.write() as conn:
            conn.execute(text("DELETE FROM jobs"))
            batch_id = conn.execute(text("SELECT id FROM batches")).scalar_one()
        log(f"joblist: {n} rows on {db}")
        fill(services, task, batch_id, n)
        cases: list[tuple[str, dict[str, Any]]] = [
            ("no filter", {}),
            ("group", {"group": "g-7"}),
            ("failure code", {"failure_code": CODE}),
            ("status FAILED", {"status": JobStatus.FAILED}),
            ("status RUNNING (the last 50)", {"status": JobStatus.RUNNING}),
        ]
        for label, filters in cases:
            first = timed(services, task.id, 0, **filters)
            middle = timed(services, task.id, n // 2, **filters)
            rows.append((label, first, middle, plan(services, task.id, 0, **filters)))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.joblist", description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--db", choices=("sqlite", "postgres", "both"), default="both")
    args = parser.parse_args(argv)
    for db in ("sqlite", "postgres") if args.db == "both" else (args.db,):
        cluster = None
        url = None
        if db == "postgres":
            cluster = PostgresCluster()
            cluster.start()
            url = cluster.new_database()
        try:
            rows = run(db, args.n, url)
        finally:
            if cluster is not None:
                cluster.stop()
        print(f"\n{db}, one task of {args.n} jobs: a page of 50, median of 5 (ms)")
        print("| filter | first page | from the middle | plan |")
        print("|---|---:|---:|---|")
        for label, first, middle, how in rows:
            print(f"| {label} | {first:.1f} | {middle:.1f} | `{how}` |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
