"""The client side of the pushed waits: openhtc.client, `htc submit --wait` and `htc logs -f` use
the /openhtc/v1 routes of a real server, and fall back to polling on a server without them."""

from __future__ import annotations

import json
import os
import subprocess
from typing import Any

import httpx
import pytest

from openhtc.client import Connection, Job, Session, Task
from openhtc.testing.server import HtcApi, HtcServer, htc_command

HOUR = 3600.0  # a poll interval no test could sit through: the waits below must be pushed


def session_for(server: HtcServer) -> Session:
    return Session(connection=Connection(server.url, api_key=server.api_key))


def test_job_and_task_waits_are_pushed(api: HtcApi, module_server: HtcServer) -> None:
    p, t = api.project_and_task()
    with session_for(module_server) as htc:
        task = htc.task(p, t)
        batch = task.submit("busybox:latest", ["sleep", "0.3"], batch_size=3, group="g")
        # A polled wait would sleep for an hour before its second look.
        job = batch.job(0).wait(poll=HOUR, timeout=120)
        assert job.status == "SUCCEEDED"
        progress: list[dict[str, int]] = []
        counts = batch.wait(poll=HOUR, timeout=120, on_progress=lambda c: progress.append(dict(c)))
        assert counts.succeeded == 3 and counts.done
        assert progress and progress[-1]["SUCCEEDED"] == 3
        assert task.wait(poll=HOUR, timeout=120).succeeded == 3  # without progress: a long poll
        assert htc.connection.live_supported


def test_a_server_without_the_routes_is_polled() -> None:
    job = {"jobUUID": "b:0", "status": "RUNNING"}
    calls: list[str] = []

    def server(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        if request.url.path.startswith("/openhtc/"):
            return httpx.Response(404, json={"detail": "Not Found"})  # a route it does not have
        if request.url.path.endswith("/jobs/b:0"):
            body = dict(job)
            job["status"] = "SUCCEEDED"  # the second look sees it ended
            return httpx.Response(200, json=body)
        return httpx.Response(500)

    conn = Connection("http://htc.example", bearer_token="t", transport=httpx.MockTransport(server))
    with Session(connection=conn) as htc:
        handle = Task(htc, {"taskId": "t", "projectId": "p"})
        waited = Job(handle, "b:0").wait(poll=0.01, timeout=10)
    assert waited.status == "SUCCEEDED"
    assert calls[0].startswith("/openhtc/v1/projects/p/tasks/t/jobs/b:0/wait")
    assert not conn.live_supported
    assert all(not c.startswith("/openhtc/") for c in calls[1:])  # asked once, then polled


def htc(server: HtcServer, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENHTC_")}
    env.update(OPENHTC_URL=server.url, OPENHTC_API_KEY=server.api_key)
    return subprocess.run(
        [*htc_command(), *args], capture_output=True, text=True, timeout=120, env=env, check=False
    )


def test_submit_wait_and_logs_follow_are_pushed(api: HtcApi, module_server: HtcServer) -> None:
    p, t = api.project_and_task()
    script = "for i in 1 2 3; do echo step$i; sleep 0.2; done"
    done = htc(
        module_server, "submit", "--project", p, "--task", t, "--wait", "--poll", str(HOUR),
        "--image", "busybox:latest", "--memory", "256", "--json", "--", "sh", "-c", script,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    out: Any = json.loads(done.stdout)
    text = json.dumps(out)
    assert "SUCCEEDED" in text, out
    job = api.jobs(p, t)[0]["jobUUID"]
    follow = htc(module_server, "logs", job, "--project", p, "--task", t, "-f", "--poll", str(HOUR))
    assert follow.returncode == 0, follow.stderr
    assert follow.stdout.split() == ["step1", "step2", "step3"]
    tail = htc(module_server, "logs", job, "--project", p, "--task", t, "-f", "-n", "1")
    assert tail.stdout.split() == ["step3"]
    # a running job: -f prints its lines as they come and returns when it ends
    running = api.submit_one(p, t, api.job_request(["sh", "-c", "echo first; sleep 1; echo last"]))
    live_job = running["parentJobId"] + ":0"
    follow = htc(module_server, "logs", live_job, "--project", p, "--task", t, "-f", "--poll", str(HOUR))
    assert follow.stdout.split() == ["first", "last"], follow.stderr


def test_pushed_waits_give_up_at_their_timeout(api: HtcApi, module_server: HtcServer) -> None:
    p, t = api.project_and_task()
    with session_for(module_server) as htc:
        task = htc.task(p, t)
        batch = task.submit("busybox:latest", ["sleep", "300"], batch_size=1)
        with pytest.raises(TimeoutError):
            batch.job(0).wait(timeout=0.5, poll=HOUR)
        with pytest.raises(TimeoutError):
            task.wait(timeout=0.5, poll=HOUR)  # the long poll
        with pytest.raises(TimeoutError):
            task.wait(timeout=0.5, poll=HOUR, on_progress=lambda counts: None)  # the stream
        task.cancel()
        assert batch.job(0).wait(poll=HOUR, timeout=60).status == "FAILED"


def test_streams_of_a_server_without_them_say_so_once() -> None:
    from openhtc.client import live

    calls: list[str] = []

    def server(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        return httpx.Response(404, json={"detail": "Not Found"})

    conn = Connection("http://htc.example", bearer_token="t", transport=httpx.MockTransport(server))
    with pytest.raises(live.Unsupported):
        list(live.follow_log(conn, "p", "t", "b:0"))
    assert not conn.live_supported and calls == ["/openhtc/v1/projects/p/tasks/t/jobs/b:0/logs/stream"]
    with pytest.raises(live.Unsupported):  # known now: not asked again
        list(live.follow_counts(conn, "p", "t"))
    assert len(calls) == 1


def test_a_missing_job_is_not_mistaken_for_a_missing_route(api: HtcApi, module_server: HtcServer) -> None:
    from openhtc.client import NotFound, live

    p, t = api.project_and_task()
    conn = Connection(module_server.url, api_key=module_server.api_key)
    with pytest.raises(NotFound):
        live.wait_job(conn, p, t, "no-such-batch:0", timeout=1)
    assert conn.live_supported
