"""PostgreSQL's connection pool checks a connection at checkout without a round trip
(store/db.py): a connection the database server closed is replaced there, as SQLAlchemy's ping
replaced it, so a restart of PostgreSQL fails no request once it is back."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from openhtc.testing.postgres import PostgresCluster, running_cluster


@pytest.fixture
def private_pg() -> Iterator[PostgresCluster]:
    """A PostgreSQL cluster of this test's own, to stop and start without disturbing others."""
    with running_cluster() as cluster:
        yield cluster


@pytest.mark.one_db
def test_after_a_postgresql_restart_no_request_fails(
    private_pg: PostgresCluster, start_server: Callable[..., Any]
) -> None:
    server = start_server(db_url=private_pg.new_database())
    api = server.api()
    pid, tid = api.project_and_task()
    request = api.job_request(["true"])
    first = api.submit_one(pid, tid, request)
    api.wait_terminal(pid, tid, 1)

    def reads(_: int) -> int:
        helper = server.api()  # a client each: requests at once hold several pooled connections
        for _ in range(5):
            helper.jobs(pid, tid)
        return len(helper.jobs(pid, tid))

    with ThreadPoolExecutor(6) as pool:
        assert list(pool.map(reads, range(6))) == [1] * 6

    private_pg.pause()  # every pooled connection is closed by the server
    private_pg.resume()
    log_start = server.log_path.stat().st_size  # the loops that ran meanwhile may have said so

    # The pooled connections are all dead now; none of these may fail (503) for it.
    with ThreadPoolExecutor(6) as pool:
        assert list(pool.map(reads, range(6))) == [1] * 6
    job = api.submit_one(pid, tid, request)
    assert api.job(pid, tid, first["parentJobId"] + ":0")["status"] == "SUCCEEDED"
    done = api.wait_terminal(pid, tid, 2)
    assert {j["jobUUID"]: j["status"] for j in done}[job["parentJobId"] + ":0"] == "SUCCEEDED"
    with open(server.log_path, "rb") as fh:
        fh.seek(log_start)
        after = fh.read().decode(errors="replace")
    # the executor's and the loops' transactions found live connections too
    assert "unavailable" not in after.lower() and "Traceback" not in after, after[-3000:]
