"""The dashboard's last hour (completions and failures per minute, queue waits) lives in the
database: every server shows the same figures, and a restart keeps them.

Real servers: two `htc server` processes on one PostgreSQL (only one runs jobs), and one SQLite
server restarted. Each was empty, or showed only its own share, while the hour was kept in the
memory of the server process that ran the jobs. In process: the retention sweep deletes the
minutes that left the hour, and only those.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.test_metrics import HandClock

from openhtc.services.retention import RetentionSweeper
from openhtc.testing.inprocess import StoreHarness, in_process_services
from openhtc.testing.postgres import PostgresCluster
from openhtc.testing.server import HtcApi, HtcServer

OVERVIEW = "/openhtc/v1/overview"
OK, FAILING = 4, 2


def run_batch(api: HtcApi) -> None:
    """OK jobs that succeed and FAILING that fail, in one task, waited for."""
    pid, tid = api.project_and_task()
    api.submit_one(pid, tid, api.job_request(["true"], batch_size=OK))
    api.submit_one(pid, tid, api.job_request(["sh", "-c", "exit 3"], batch_size=FAILING, max_retries=0))
    api.wait_terminal(pid, tid, OK + FAILING)


def last_hour(srv: HtcServer) -> dict[str, Any]:
    """The overview's last hour, without the minutes' places (a minute may turn between reads)."""
    hour = srv.api(prefix="").get(OVERVIEW)["lastHour"]
    return {
        "succeeded": [n for n in hour["succeededPerMinute"] if n],
        "failed": [n for n in hour["failedPerMinute"] if n],
        "started": hour["started"],
        "p50": hour["queueWaitP50"],
        "p95": hour["queueWaitP95"],
    }


def check_counts(hour: dict[str, Any]) -> None:
    assert sum(hour["succeeded"]) == OK and sum(hour["failed"]) == FAILING, hour
    assert hour["started"] == OK + FAILING and hour["p50"] is not None and hour["p95"] is not None, hour


@pytest.fixture
def servers() -> Iterator[list[HtcServer]]:
    started: list[HtcServer] = []
    yield started
    for srv in started:
        srv.stop()


def test_every_server_on_postgresql_shows_the_same_last_hour_and_a_restart_keeps_it(
    pg_cluster: PostgresCluster, servers: list[HtcServer], tmp_path: Path
) -> None:
    url = pg_cluster.new_database()
    runner = HtcServer(tmp_path / "runner", url, env={"OPENHTC_MAX_INFRASTRUCTURE_RETRIES": "0"})
    servers.append(runner)
    runner.start()
    (tmp_path / "viewer").mkdir()  # the second server shares the first one's admin key
    (tmp_path / "viewer" / "admin-api-key").write_text(runner.api_key + "\n")
    viewer = HtcServer(tmp_path / "viewer", url, args=("--no-executor",))
    servers.append(viewer)
    viewer.start()
    run_batch(runner.api())
    seen = last_hour(runner)
    check_counts(seen)
    assert last_hour(viewer) == seen  # it ran none of the jobs
    runner.restart()
    assert last_hour(runner) == seen


@pytest.mark.one_db
def test_the_last_hour_survives_a_restart(start_server: Callable[..., HtcServer]) -> None:
    srv = start_server(env={"OPENHTC_MAX_INFRASTRUCTURE_RETRIES": "0"})
    run_batch(srv.api())
    seen = last_hour(srv)
    check_counts(seen)
    srv.restart()
    assert last_hour(srv) == seen


def test_the_retention_sweep_deletes_the_minutes_that_left_the_hour(
    db_kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    clock = HandClock(1_800_000_000.0)
    url = request.getfixturevalue("pg_url_factory")() if db_kind == "postgres" else None
    with in_process_services(tmp_path / "data", url, clock) as services:
        store = StoreHarness(services)
        project = store.create_project()
        task = store.create_task(project)
        store.submit(project, task, store.job_request(3))
        store.succeed(store.claim(3))
        assert sum(services.queue.hour(clock.now(), [project.id]).succeeded) == 3
        rows = "SELECT count(*) FROM throughput_minutes"
        clock.at += 59 * 60  # still within the hour: the sweep keeps the rows
        RetentionSweeper(services).sweep()
        assert store.sql(rows)[0][0] > 0
        assert sum(services.queue.hour(clock.now(), [project.id]).succeeded) == 3
        clock.at += 60
        assert sum(services.queue.hour(clock.now(), [project.id]).succeeded) == 0
        RetentionSweeper(services).sweep()
        assert store.sql(rows)[0][0] == 0
