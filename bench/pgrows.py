"""What a job's row writes cost PostgreSQL, by storage variant, in isolation.

``python -m bench.pgrows --n 5000 --rounds 3`` makes the ``jobs`` schema (the migrations) in a
private cluster, queues N job rows, then claims and reports them the way the embedded executor
does on W1 (turns of ``--turn`` jobs: a claim flush of RUNNABLE, then the report flush of the
turn before with STARTING, RUNNING and SUCCEEDED, each a locking ``SELECT`` and the store's
flush statement, ``store/transitions.py``), on one connection, and prints the backend's CPU,
the WAL and the HOT updates per job for each variant of the table's storage:

- ``main``: the schema as the migrations leave it;
- ``fillfactor``, ``fillfactor-70``: ``jobs`` with ``fillfactor = 50`` or 70 (room on the page
  for the row's next version);
- ``hot``: no index that names ``status`` (the queue, executor and failed indexes dropped), so
  the report's update can be HOT: what moving the status indexes off ``jobs`` would buy;
- ``one-event``: the report writes one event row per job instead of three: what folding a
  report's statuses into one event row would buy.

Rounds alternate the variants; the figures are per job, medians over the rounds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any

from bench.common import log
from openhtc.store import transitions as t
from openhtc.store.db import Database
from openhtc.testing.postgres import PostgresCluster

VARIANTS: dict[str, list[str]] = {
    "main": [],
    "fillfactor": ["ALTER TABLE jobs SET (fillfactor = 50)"],
    "fillfactor-70": ["ALTER TABLE jobs SET (fillfactor = 70)"],
    "hot": ["DROP INDEX ix_jobs_queue", "DROP INDEX ix_jobs_executor", "DROP INDEX ix_jobs_failed"],
    "one-event": [],
}
_LOCK = t._STATE_SELECT + "j.id = ANY(%s) ORDER BY j.id FOR UPDATE OF j"
_TASK, _GROUP, _PROJECT = "t" * 22, "g", "p" * 22


def _cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return sum(int(x) for x in fields[11:13]) / os.sysconf("SC_CLK_TCK")


def _setup(conn: Any, n: int, variant: str) -> None:
    for statement in VARIANTS[variant]:
        conn.execute(statement)
    conn.execute("SET session_replication_role = replica")  # no task or project rows needed
    now = time.time()
    conn.execute(
        "INSERT INTO batches (id, parent_job_id, task_id, project_id, workspace_id, group_name, batch_size,"
        " created_by, created_at, region, max_retries, request) VALUES"
        " (1, 'parent', %s, %s, 'w', %s, %s, 'u', %s, 'r', 0, '{}')",
        (_TASK, _PROJECT, _GROUP, n, now),
    )
    conn.execute(
        "INSERT INTO jobs (id, batch_id, idx, task_id, project_id, group_name, region, architecture, status,"
        " attempt, failed_attempts, infra_retries, priority, vcpus, memory_mb, created_at, updated_at,"
        " cancelled)"
        " SELECT i, 1, i - 1, %s, %s, %s, 'r', 'x86_64', 1, 1, 0, 0, 0, 1, 1024, %s, %s, false"
        " FROM generate_series(1, %s) AS i",
        (_TASK, _PROJECT, _GROUP, now, now, n),
    )
    conn.execute("INSERT INTO job_counters VALUES (%s, %s, 1, %s, %s, %s)", (_TASK, _GROUP, _PROJECT, n, n))
    conn.execute("SET session_replication_role = DEFAULT")
    conn.commit()
    conn.autocommit = True
    conn.execute("VACUUM ANALYZE jobs")


def _flush(conn: Any, ids: list[int], rows: list[Any], events: list[Any], counters: list[Any]) -> None:
    conn.execute(_LOCK, (ids,)).fetchall()
    hour = [(int(time.time() // 60), _PROJECT, 0, len(ids))]
    params = tuple(map(t._json, (rows, events, counters, hour)))
    conn.execute(t._FLUSH_PG, params).fetchone()
    conn.commit()


def _run(cluster: PostgresCluster, n: int, turn: int, variant: str) -> dict[str, float]:
    import psycopg

    url = cluster.new_database("pgrows")
    db = Database(url.replace("postgresql://", "postgresql+psycopg://", 1))
    db.migrate()
    db.dispose()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.autocommit = False
        _setup(conn, n, variant)
        pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        lsn0 = conn.execute("SELECT pg_current_wal_lsn()").fetchone()[0]
        conn.autocommit = False
        cpu0, wall0 = _cpu(pid), time.perf_counter()
        chunks = [list(range(i, min(i + turn, n + 1))) for i in range(1, n + 1, turn)]
        for k in range(len(chunks) + 1):
            now = time.time()
            if k < len(chunks):  # claim this turn's jobs
                ids = chunks[k]
                rows = [
                    (2, 1, 0, 0, "e", now + 60, now, None, None, None, None, None, False, i, 1, 1)
                    for i in ids
                ]
                events = [(i, 1, 2, now, None, None, "e", False) for i in ids]
                counters = [(_TASK, _GROUP, 1, _PROJECT, -len(ids), -len(ids)),
                            (_TASK, _GROUP, 2, _PROJECT, len(ids), len(ids))]  # fmt: skip
                _flush(conn, ids, rows, events, counters)
            if k > 0:  # report the turn before's
                ids = chunks[k - 1]
                rows = [(5, 1, 0, 0, "e", None, now, now, now, 0, None, None, False, i, 2, 1) for i in ids]
                statuses = (5,) if variant == "one-event" else (3, 4, 5)
                events = [
                    (i, 1, s, now, None, 0 if s == 5 else None, "e", False) for i in ids for s in statuses
                ]
                counters = [(_TASK, _GROUP, 2, _PROJECT, -len(ids), -len(ids)),
                            (_TASK, _GROUP, 5, _PROJECT, len(ids), len(ids))]  # fmt: skip
                _flush(conn, ids, rows, events, counters)
        cpu1, wall1 = _cpu(pid), time.perf_counter()
        conn.autocommit = True
        wal = conn.execute("SELECT pg_current_wal_lsn() - %s::pg_lsn", (lsn0,)).fetchone()[0]
    time.sleep(0.3)  # the backend flushed its statistics as it exited
    with psycopg.connect(url, autocommit=True) as conn:
        upd, hot = conn.execute(
            "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables WHERE relname = 'jobs'"
        ).fetchone()
    return {
        "cpu_us": 1e6 * (cpu1 - cpu0) / n,
        "wall_us": 1e6 * (wall1 - wall0) / n,
        "wal_b": float(wal) / n,
        "hot": hot / max(upd, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.pgrows", description=__doc__)
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--turn", type=int, default=60, help="jobs per claim and per report flush")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args(argv)
    variants = args.variants.split(",")
    cluster = PostgresCluster()
    cluster.start()
    got: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
    try:
        for r in range(args.rounds):
            for variant in variants if r % 2 == 0 else variants[::-1]:
                got[variant].append(_run(cluster, args.n, args.turn, variant))
                log(f"round {r + 1} {variant}: {got[variant][-1]}")
    finally:
        cluster.stop()
    print(f"# jobs' row writes, N = {args.n}, {args.turn} jobs per flush, medians of {args.rounds} rounds")
    print("\n| variant | backend CPU / job | wall / job | WAL / job | HOT updates |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for variant, runs in got.items():
        med = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
        print(
            f"| {variant} | {med['cpu_us']:.1f} µs | {med['wall_us']:.1f} µs | {med['wal_b']:,.0f} B"
            f" | {med['hot']:.0%} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
