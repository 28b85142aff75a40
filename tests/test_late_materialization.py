"""Late materialization: a submit larger than ``materialize_chunk`` answers before all of its job
rows exist, and every API read is exact meanwhile (store/materialize.py).

In process on SQLite and PostgreSQL, through the real HTTP routes (FastAPI's TestClient), with
no scheduler thread: the test decides when the missing rows are written. Then a real server
runs such a submit to the end.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from openhtc.api.app import create_app
from openhtc.domain.enums import JobStatus
from openhtc.domain.models import AttemptReport, Capacity
from openhtc.services.executors import ExecutorService
from openhtc.services.service_set import ServiceSet
from openhtc.testing.inprocess import StoreHarness, in_process_services
from openhtc.wiring import build_services

REGION = "AWS_US_EAST_1"
CHUNK = 4


def batch(n: int, name: str = "j") -> dict[str, Any]:
    return StoreHarness.job_request(n, name)


class World:
    """The HTTP routes in process over bootstrapped services; no scheduler or executor threads."""

    def __init__(self, services: ServiceSet) -> None:
        self.services = services
        principal = StoreHarness(services).who  # bootstraps; registers an executor nobody runs
        token, _ = services.tokens.bearer(principal)
        self.http = TestClient(create_app(services), headers={"Authorization": f"Bearer {token}"})
        project = self.http.post("/api/v1/htc/projects", json={"projectName": "lazy", "regions": [REGION]})
        assert project.status_code in (200, 201), project.text
        self.project_id = project.json()["projectId"]
        task = self.http.post(f"/api/v1/htc/projects/{self.project_id}/tasks", json={"taskName": "t"})
        assert task.status_code in (200, 201), task.text
        self.task_id = task.json()["taskId"]
        self.jobs_url = f"/api/v1/htc/projects/{self.project_id}/tasks/{self.task_id}/jobs"

    def submit(self, *batches: dict[str, Any]) -> list[dict[str, Any]]:
        resp = self.http.post(self.jobs_url + "/batch", json=list(batches))
        assert resp.status_code == 200, resp.text
        return list(resp.json())

    def listing(self, **params: Any) -> list[dict[str, Any]]:
        """Every job of the task, following the page cursors."""
        items: list[dict[str, Any]] = []
        query = {"pageSize": 3, **params}
        while True:
            page = self.http.get(self.jobs_url, params=query)
            assert page.status_code == 200, page.text
            body = page.json()
            items += body["items"]
            if not body.get("next"):
                return items
            query["pageIndex"] = httpx.URL(body["next"]).params["pageIndex"]

    def summary(self) -> dict[str, int]:
        resp = self.http.get(
            f"/api/v1/htc/projects/{self.project_id}/tasks/{self.task_id}/group-summary-statistics"
        )
        assert resp.status_code == 200, resp.text
        totals: dict[str, int] = {}
        for group in resp.json()["items"]:
            for status, count in group["jobStatuses"].items():
                totals[status] = totals.get(status, 0) + count
        return {k: v for k, v in totals.items() if v}

    def rows(self) -> int:
        with self.services.db.read() as conn:
            return int(conn.exec_driver_sql("SELECT COUNT(*) FROM jobs").scalar_one())


@pytest.fixture
def world(tmp_path: Path, db_url: str | None) -> Iterator[World]:
    with in_process_services(
        tmp_path / "data", db_url, runtime="process", materialize_chunk=CHUNK
    ) as services:
        yield World(services)


def uuids(items: list[dict[str, Any]]) -> list[str]:
    return [item["jobUUID"] for item in items]


def test_a_large_submit_reads_exactly_before_its_rows_exist(world: World) -> None:
    first, second = world.submit(batch(6, "a"), batch(5, "b"))
    assert world.rows() == CHUNK  # the submit wrote the first CHUNK rows only
    expected = [f"{first['parentJobId']}:{i}" for i in range(6)] + [
        f"{second['parentJobId']}:{i}" for i in range(5)
    ]

    listed = world.listing()
    assert uuids(listed) == expected  # in submit order, across the written/unwritten edge
    assert {job["status"] for job in listed} == {"SUBMITTED_TO_PROVIDER"}
    assert all(job["group"] == first["group"] for job in listed[:6])
    assert world.summary() == {"SUBMITTED_TO_PROVIDER": 11}

    unwritten = world.http.get(f"{world.jobs_url}/{second['parentJobId']}:4")
    assert unwritten.status_code == 200, unwritten.text
    job = unwritten.json()
    assert job["status"] == "SUBMITTED_TO_PROVIDER" and job["maxMemory"] == 64 and job["region"] == REGION
    assert job["createdAt"] == listed[0]["createdAt"]
    events = world.http.get(f"{world.jobs_url}/{second['parentJobId']}:4/events").json()["items"]
    assert [e["status"] for e in events] == ["SUBMITTED_TO_RESCALE", "SUBMITTED_TO_PROVIDER"]
    logs = world.http.get(f"{world.jobs_url}/{second['parentJobId']}:4/logs")
    assert logs.status_code == 200 and logs.json()["items"] == []
    assert world.http.get(f"{world.jobs_url}/{second['parentJobId']}:5").status_code == 404

    by_id = world.listing(jobId=[f"{second['parentJobId']}:3", f"{first['parentJobId']}:1"])
    assert uuids(by_id) == [f"{first['parentJobId']}:1", f"{second['parentJobId']}:3"]
    assert uuids(world.listing(group=second["group"])) == expected[6:]
    assert world.listing(status="RUNNING") == []

    # The same reads once every row is written: nothing a client sees changes.
    with world.services.db.write() as conn:
        world.services.jobs.materializer.finish(conn, world.task_id, None)
    assert world.rows() == 11
    assert world.listing() == listed
    assert world.http.get(f"{world.jobs_url}/{second['parentJobId']}:4").json() == job


def test_jobs_without_rows_are_not_claimed_until_written_then_each_runs_once(world: World) -> None:
    world.submit(batch(10))
    executor = ExecutorService(world.services)
    executor.register("ex-1", "inc-1", REGION, ["X86"], Capacity(64, 1 << 20))
    claimed = executor.claim("ex-1", REGION, ["X86"], Capacity(64, 1 << 20), 100)
    assert len(claimed) == CHUNK
    seen = {job.job_id for job in claimed}
    while world.services.jobs.materialize():
        pass
    more = executor.claim("ex-1", REGION, ["X86"], Capacity(64, 1 << 20), 100)
    assert len(more) == 10 - CHUNK and not seen & {job.job_id for job in more}
    done = JobStatus.SUCCEEDED
    executor.report(
        "ex-1",
        [
            AttemptReport(j.job_id, j.attempt, status, 1.0, exit_code=0 if status is done else None)
            for j in [*claimed, *more]
            for status in (JobStatus.STARTING, JobStatus.RUNNING, JobStatus.SUCCEEDED)
        ],
    )
    assert world.summary() == {"SUCCEEDED": 10}


def test_rows_are_written_as_the_queue_needs_them(world: World) -> None:
    world.submit(batch(30))
    assert world.rows() == CHUNK
    while world.services.jobs.materialize():
        pass
    assert world.rows() == 2 * CHUNK  # a queue of 2 x materialize_chunk jobs with rows is enough
    executor = ExecutorService(world.services)
    executor.register("ex-1", "inc-1", REGION, ["X86"], Capacity(64, 1 << 20))
    claimed = executor.claim("ex-1", REGION, ["X86"], Capacity(64, 1 << 20), 5)
    assert len(claimed) == 5
    while world.services.jobs.materialize():
        pass
    # refilled as jobs left the queue, a chunk at a time, to at least 2 x materialize_chunk
    assert 2 * CHUNK <= world.rows() - 5 < 3 * CHUNK
    assert world.summary() == {"SUBMITTED_TO_PROVIDER": 25, "RUNNABLE": 5}


def test_cancel_reaches_jobs_without_rows(world: World) -> None:
    world.submit(batch(9))
    assert world.rows() == CHUNK
    assert world.http.post(world.jobs_url + "/cancel").status_code == 200
    listed = world.listing()
    assert len(listed) == 9 and {job["status"] for job in listed} == {"FAILED"}
    assert world.summary() == {"FAILED": 9}
    assert world.services.jobs.materialize() == 0  # nothing left to write


def test_rows_still_missing_after_a_restart_are_written_once(world: World, tmp_path: Path) -> None:
    world.submit(batch(7), batch(3))
    assert world.services.jobs.materialize() == CHUNK  # one chunk, then the "crash"
    assert world.rows() == 2 * CHUNK
    settings = world.services.settings
    again = build_services(settings)  # a new process on the same database
    try:
        executor = ExecutorService(again)
        executor.register("ex-1", "inc-1", REGION, ["X86"], Capacity(64, 1 << 20))
        assert len(executor.claim("ex-1", REGION, ["X86"], Capacity(64, 1 << 20), 100)) == 2 * CHUNK
        while again.jobs.materialize():
            pass
        with again.db.read() as conn:
            rows = conn.exec_driver_sql("SELECT batch_id, idx, id FROM jobs ORDER BY id").all()
    finally:
        again.db.dispose()
    assert len(rows) == 10 and len({(r[0], r[1]) for r in rows}) == 10
    ids = [r[2] for r in rows]
    assert ids == list(range(ids[0], ids[0] + 10))  # the ids reserved at submit, in order
    assert uuids(world.listing())[-1].endswith(":2")


def test_concurrent_submits_reserve_disjoint_id_ranges(world: World) -> None:
    def submit_some(_: int) -> None:
        for _ in range(3):
            world.submit(batch(3), batch(6))

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(submit_some, range(4)))
    with world.services.db.write() as conn:
        world.services.jobs.materializer.finish(conn, world.task_id, None)
        rows = conn.exec_driver_sql(
            "SELECT j.id, b.first_job_id + j.idx FROM jobs j JOIN batches b ON b.id = j.batch_id"
        ).all()
    assert len(rows) == 4 * 3 * 9 and len({r[0] for r in rows}) == len(rows)
    assert all(job_id == reserved for job_id, reserved in rows)
    assert world.summary() == {"SUBMITTED_TO_PROVIDER": 4 * 3 * 9}


def test_a_server_runs_every_job_of_a_large_submit_once(
    start_server: Callable[..., Any], tmp_path: Path
) -> None:
    srv = start_server(env={"OPENHTC_MATERIALIZE_CHUNK": "5"})
    api = srv.api()
    pid, tid = api.project_and_task()
    ran = tmp_path / "ran"
    ran.mkdir()
    script = f'echo "$RESCALE_JOB_ID" >> {ran}/"$RESCALE_JOB_ID"'
    requests = [api.job_request(["sh", "-c", script], batch_size=n) for n in (12, 1, 9)]
    parents = [echo["parentJobId"] for echo in api.submit(pid, tid, *requests)]
    jobs = api.wait_terminal(pid, tid, 22)
    expected = [f"{parent}:{i}" for parent, n in zip(parents, (12, 1, 9), strict=True) for i in range(n)]
    assert [job["jobUUID"] for job in jobs] == expected
    assert {job["status"] for job in jobs} == {"SUCCEEDED"}
    runs = {path.name: path.read_text().split() for path in ran.iterdir()}
    assert sorted(runs) == sorted(expected) and all(len(lines) == 1 for lines in runs.values())
