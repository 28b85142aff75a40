"""What PostgreSQL does per job: statements, round trips, row and index writes, WAL, CPU.

``python -m bench.pgstats --workload e2e --n 5000`` runs one openhtc workload (W1 ``e2e``, or
CP ``control-plane``, FN ``functions``) on a private cluster with ``pg_stat_statements`` loaded, then prints,
per job of the run: each statement's calls and time, transactions, the ``jobs`` table's row
updates and how many of them were HOT, index tuples written per index, WAL bytes, and the
CPU the PostgreSQL processes used. The server's own start-up and the 20 warm-up jobs are in
the counts too (a few dozen statements against thousands of jobs).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import cpu_seconds, log
from bench.context import Context
from openhtc.testing.postgres import PostgresCluster


def _pg_cpu(cluster: PostgresCluster) -> float:
    """CPU seconds of the postmaster, its live children and its reaped ones."""
    pid = int((cluster.data / "postmaster.pid").read_text().split()[0])
    total = cpu_seconds(pid) or 0.0
    for task in Path("/proc").iterdir():
        if not task.name.isdigit():
            continue
        try:
            fields = (task / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[1]) == pid:  # field 4, the parent
            total += sum(int(x) for x in fields[11:13]) / os.sysconf("SC_CLK_TCK")
    return total


def _start(cluster: PostgresCluster, explain_ms: float | None) -> None:
    import psycopg

    cluster.start()
    with psycopg.connect(host="127.0.0.1", port=cluster.port, user=cluster.user, autocommit=True) as conn:
        if explain_ms is None:
            conn.execute("ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'")
        else:  # also log the plans of statements slower than that, with their actual rows and times
            conn.execute("ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements', 'auto_explain'")
    cluster.pause()
    cluster.resume()
    if explain_ms is not None:  # known once the library is loaded
        with psycopg.connect(host="127.0.0.1", port=cluster.port, user=cluster.user, autocommit=True) as conn:
            conn.execute(f"ALTER SYSTEM SET auto_explain.log_min_duration = '{explain_ms}ms'")
            conn.execute("ALTER SYSTEM SET auto_explain.log_analyze = on")
            conn.execute("SELECT pg_reload_conf()")


def _stats(url: str) -> dict[str, Any]:
    import psycopg

    with psycopg.connect(url.replace("postgresql://", "postgresql://", 1), autocommit=True) as conn:
        statements = conn.execute(
            "SELECT calls, rows, total_exec_time, query, wal_bytes, shared_blks_dirtied"
            " FROM pg_stat_statements"
            " WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())"
            " ORDER BY calls DESC"
        ).fetchall()
        xacts = conn.execute(
            "SELECT xact_commit, xact_rollback FROM pg_stat_database WHERE datname = current_database()"
        ).fetchone()
        tables = conn.execute(
            "SELECT relname, n_tup_ins, n_tup_upd, n_tup_hot_upd, n_tup_del FROM pg_stat_user_tables"
            " ORDER BY relname"
        ).fetchall()
        indexes = conn.execute(
            "SELECT s.indexrelname, pg_relation_size(s.indexrelid) FROM pg_stat_user_indexes s"
            " WHERE s.relname IN ('jobs', 'job_events', 'job_counters') ORDER BY 1"
        ).fetchall()
        wal = conn.execute("SELECT wal_records, wal_bytes, wal_fpi FROM pg_stat_wal").fetchone()
    return {"statements": statements, "xacts": xacts, "tables": tables, "indexes": indexes, "wal": wal}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.pgstats", description=__doc__)
    parser.add_argument("--workload", default="e2e", choices=("e2e", "control-plane", "functions"))
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--top", type=int, default=25, help="statements shown")
    parser.add_argument("--explain-ms", type=float, help="print the plans of statements slower than this")
    args = parser.parse_args(argv)

    from bench.functions import openhtc_functions
    from bench.systems.openhtc import control_plane, e2e

    ctx = Context(Path(tempfile.mkdtemp(prefix="pgstats-")), time.strftime("%Y%m%d-%H%M%S"))
    cluster = PostgresCluster()
    _start(cluster, args.explain_ms)
    ctx._pg = cluster
    try:
        url = cluster.new_database()
        import psycopg

        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CREATE EXTENSION pg_stat_statements")
            conn.execute("SELECT pg_stat_statements_reset()")
            conn.execute("SELECT pg_stat_reset_shared('wal')")
        cpu0 = _pg_cpu(cluster)
        run = {"e2e": e2e, "control-plane": control_plane, "functions": openhtc_functions}[args.workload]
        result = run(ctx, "postgres", args.n, url)
        time.sleep(0.7)  # the statistics collector's interval (PostgreSQL 14 and older)
        cpu1 = _pg_cpu(cluster)
        stats = _stats(url)
        if args.explain_ms is not None:
            print(cluster.log.read_text(errors="replace")[-20000:])
    finally:
        cluster.stop()
    n = args.n
    rate = result.metrics.get("jobs_per_s") or result.metrics.get("calls_per_s") or 0
    print(f"# {args.workload}, N = {n}: {rate:,.0f} {result.unit}")
    calls = sum(s[0] for s in stats["statements"])
    print(f"statements per job: {calls / n:.2f}; transactions per job: {stats['xacts'][0] / n:.3f}")
    server_ms = result.metrics.get("server_cpu_ms_per_job")
    if server_ms is None and result.metrics.get("server_cpu_s") is not None:  # functions
        server_ms = 1000 * result.metrics["server_cpu_s"] / n
    if server_ms is None and result.metrics.get("cpu_s") is not None:  # control-plane: one process
        server_ms = 1000 * result.metrics["cpu_s"] / n
    executed = sum(s[2] for s in stats["statements"])
    print(
        f"PostgreSQL CPU per job: {1000 * (cpu1 - cpu0) / n:.3f} ms"
        f" (statements executing: {executed / n:.3f} ms);"
        f" openhtc process CPU per job: {server_ms or 0:.3f} ms"
    )
    print(
        f"WAL per job: {stats['wal'][0] / n:.1f} records, {int(stats['wal'][1]) / n:,.0f} bytes,"
        f" {stats['wal'][2] / n:.2f} full-page images"
    )
    print("\n| table | inserts/job | updates/job | HOT updates | deletes/job |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, ins, upd, hot, dele in stats["tables"]:
        if ins or upd or dele:
            print(f"| {name} | {ins / n:.2f} | {upd / n:.2f} | {hot / max(upd, 1):.0%} | {dele / n:.2f} |")
    print("\n| index | size |\n| --- | ---: |")
    for name, size in stats["indexes"]:
        print(f"| {name} | {size / 1024:,.0f} KiB |")
    print(
        "\n| calls/job | rows/call | ms/call | ms/job | WAL B/job | blocks dirtied/job | statement |"
        "\n| ---: | ---: | ---: | ---: | ---: | ---: | --- |"
    )
    for count, rows, total, query, wal_bytes, dirtied in stats["statements"][: args.top]:
        text = " ".join(query.split())
        text = text if len(text) <= 110 else text[:107] + "..."
        per_call = f"{rows / max(count, 1):.1f} | {total / max(count, 1):.3f}"
        writes = f"{int(wal_bytes) / n:,.0f} | {dirtied / n:.2f}"
        print(f"| {count / n:.3f} | {per_call} | {total / n:.4f} | {writes} | `{text}` |")
    log("done")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
