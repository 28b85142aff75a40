"""openhtc's submit-and-wait: ``POST /openhtc/v1/…/jobs/run`` submits one job and answers it once
it has ended (issue 19, W5: one request instead of the submit and the job's wait), and
``Task.run`` in openhtc.client, which falls back to the Rescale routes elsewhere."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from openhtc.client import Connection, ServerError, Session, Task
from openhtc.testing.server import HtcApi, HtcServer

HOUR = 3600.0  # a poll interval no test could sit through: the waits below must be pushed


def run_url(server: HtcServer, project_id: str, task_id: str) -> str:
    return f"{server.url}/openhtc/v1/projects/{project_id}/tasks/{task_id}/jobs/run"


def test_run_answers_the_job_once_it_has_ended(api: HtcApi, module_server: HtcServer) -> None:
    p, t = api.project_and_task()
    url = run_url(module_server, p, t)
    # Answered at its timeout (60 s) with the job still running, had the end not been pushed.
    body = api.post(url, [api.job_request(["sleep", "0.3"])], timeout=60, group="runs")
    assert body["status"] == "SUCCEEDED" and body["group"] == "runs"
    assert body == api.job(p, t, body["jobUUID"])  # exactly as GET …/jobs/{id}
    failed = api.post(url, [api.job_request(["sh", "-c", "exit 3"])], timeout=60)
    assert failed["status"] == "FAILED" and failed["container"]["exitCode"] == 3
    assert failed == api.job(p, t, failed["jobUUID"])
    assert len(api.jobs(p, t)) == 2


def test_run_at_its_timeout_answers_the_job_as_it_is(api: HtcApi, module_server: HtcServer) -> None:
    p, t = api.project_and_task()
    body = api.post(run_url(module_server, p, t), [api.job_request(["sleep", "300"])], timeout=0.3)
    assert body["status"] not in ("SUCCEEDED", "FAILED")
    assert [j["jobUUID"] for j in api.jobs(p, t)] == [body["jobUUID"]]  # submitted all the same
    api.cancel(p, t)


def test_run_refuses_bad_input_and_stores_nothing(api: HtcApi, module_server: HtcServer) -> None:
    p, t = api.project_and_task()
    url = run_url(module_server, p, t)
    one = api.job_request(["true"])
    bad: list[tuple[Any, dict[str, Any], str]] = [
        ([one, one], {}, "body"),  # two jobs
        ([], {}, "body"),
        (one, {}, "body"),  # not an array
        ([api.job_request(["true"], batch_size=2)], {}, "[0].batchSize"),
        ([{"batchSize": 1}], {}, "htcJobDefinition"),  # no job definition
        ([one], {"timeout": "-1"}, "timeout"),
        ([one], {"timeout": "soon"}, "timeout"),
        ([one], {"timeout": "61"}, "timeout"),
    ]
    for payload, params, field in bad:
        answer = api.request("POST", url, json=payload, params=params, expect=400)
        assert field in answer.text, (payload, params, answer.text)
    api.request("POST", run_url(module_server, p, "no-such-task"), json=[one], expect=404)
    assert api.jobs(p, t) == []


def test_task_run_in_the_client(api: HtcApi, module_server: HtcServer) -> None:
    p, t = api.project_and_task()
    with Session(connection=Connection(module_server.url, api_key=module_server.api_key)) as htc:
        task = htc.task(p, t)
        job = task.run("busybox:latest", ["sh", "-c", "exit 4"], timeout=120, poll=HOUR)
        assert job.status == "FAILED" and job.exit_code == 4
        assert htc.connection.live_supported
        htc.connection.live_supported = False  # as on a server without the routes: submit, then poll
        polled = task.run("busybox:latest", ["true"], timeout=120, poll=0.05)
        assert polled.status == "SUCCEEDED"
    assert len(api.jobs(p, t)) == 2


def test_task_run_falls_back_where_the_route_is_missing() -> None:
    calls: list[tuple[str, str]] = []

    def server(request: httpx.Request) -> httpx.Response:
        calls.append((request.method, request.url.path))
        if request.url.path.startswith("/openhtc/"):
            return httpx.Response(404, json={"detail": "Not Found"})  # a route it does not have
        if request.url.path.endswith("/jobs/batch"):
            return httpx.Response(200, json=[{"parentJobId": "b", "batchSize": 1}])
        if request.url.path.endswith("/jobs/b:0"):
            return httpx.Response(200, json={"jobUUID": "b:0", "status": "SUCCEEDED"})
        return httpx.Response(500)

    conn = Connection("http://htc.example", bearer_token="t", transport=httpx.MockTransport(server))
    with Session(connection=conn) as htc:
        job = Task(htc, {"taskId": "t", "projectId": "p"}).run("busybox:latest", ["true"], timeout=10)
    assert job.status == "SUCCEEDED" and job.id == "b:0"
    assert calls[0] == ("POST", "/openhtc/v1/projects/p/tasks/t/jobs/run")
    assert any(
        method == "POST" and path.endswith("/htc/projects/p/tasks/t/jobs/batch") for method, path in calls
    )
    assert not conn.live_supported


def test_a_busy_server_submits_the_run_once_and_answers_it_at_once(
    start_server: Callable[..., HtcServer],
) -> None:
    """Past max_live_subscriptions open waits the run is still submitted, answered as it is
    (never a 503 after which a client could not know whether the job was stored), and Task.run
    waits for it by polling: one job, run once."""
    server = start_server(env={"OPENHTC_MAX_LIVE_SUBSCRIPTIONS": "1"})
    api = server.api()
    p, t = api.project_and_task()
    sleeper = api.submit_one(p, t, api.job_request(["sleep", "300"]))["parentJobId"] + ":0"
    held = threading.Thread(  # the one open wait the server allows
        target=lambda: api.get(f"/openhtc/v1/projects/{p}/tasks/{t}/jobs/{sleeper}/wait", timeout=60)
    )
    held.start()
    try:
        deadline = time.monotonic() + 30
        while api.get("/openhtc/v1/live")["subscriptions"] < 1:
            assert time.monotonic() < deadline, "the held wait never opened"
            time.sleep(0.05)
        body = api.post(run_url(server, p, t), [api.job_request(["sleep", "0.3"])], timeout=60)
        assert body["status"] not in ("SUCCEEDED", "FAILED")  # answered at once, not waited for
        with Session(connection=Connection(server.url, api_key=server.api_key)) as htc:
            job = htc.task(p, t).run("busybox:latest", ["true"], timeout=120, poll=0.05)
        assert job.status == "SUCCEEDED"
        ids = [j["jobUUID"] for j in api.jobs(p, t)]
        assert len(ids) == 3 and job.id in ids and body["jobUUID"] in ids  # each submitted once
    finally:
        api.cancel(p, t)
        held.join(60)


def test_task_run_never_submits_again_after_an_error_of_the_route() -> None:
    """A 503 (or any error) of the run route may come after the job was stored: Task.run raises
    it and does not submit the job a second time through the Rescale routes."""
    calls: list[tuple[str, str]] = []

    def server(request: httpx.Request) -> httpx.Response:
        calls.append((request.method, request.url.path))
        if request.url.path.endswith("/jobs/run"):
            return httpx.Response(503, json={"detail": "database unavailable"})
        if request.url.path.endswith("/jobs/batch"):
            return httpx.Response(200, json=[{"parentJobId": "b", "batchSize": 1}])
        return httpx.Response(500)

    conn = Connection("http://htc.example", bearer_token="t", transport=httpx.MockTransport(server))
    with Session(connection=conn) as htc, pytest.raises(ServerError):
        Task(htc, {"taskId": "t", "projectId": "p"}).run("busybox:latest", ["true"], timeout=10)
    assert [path for _, path in calls if path.endswith("/jobs/batch")] == []
