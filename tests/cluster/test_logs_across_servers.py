"""A job's whole log through any server: two servers on one PostgreSQL, each on its own data
directory, ``log_store = database``, and an ``htc agent`` behind a round-robin proxy, so its
calls (its log chunks too) alternate between the servers.

What a user notices: ``GET …/logs`` (both orders, paged by the cursor), the SSE log stream
(what ``htc logs -f`` and the dashboard's job page follow) show every line, in order, through
either server, while the job runs and after. With ``log_store = files`` each server would show
only the chunks it received.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from tests.test_dashboard import sign_in

from openhtc.testing.postgres import PostgresCluster
from openhtc.testing.roundrobin import RoundRobinProxy
from openhtc.testing.server import HtcServer, htc_command

LINES = 40
# a line every 50 ms: the agent ships a chunk every 0.3 s, so the log arrives in many calls
JOB = f'for i in $(seq 1 {LINES}); do echo "line $i"; sleep 0.05; done'


def start_two(pg_cluster: PostgresCluster, tmp_path: Path, started: list[HtcServer], executor: bool) -> None:
    url = pg_cluster.new_database()
    env = {"OPENHTC_LOG_STORE": "database", "OPENHTC_MAX_INFRASTRUCTURE_RETRIES": "0"}
    for n in range(2):
        data_dir = tmp_path / f"server{n}"
        data_dir.mkdir()
        if started:  # the first server on a database writes the admin key
            (data_dir / "admin-api-key").write_text(started[0].api_key + "\n")
        srv = HtcServer(data_dir, url, env=env, args=() if executor else ("--no-executor",))
        started.append(srv)
        srv.start()


@pytest.fixture
def two_servers(pg_cluster: PostgresCluster, tmp_path: Path) -> Iterator[tuple[HtcServer, HtcServer]]:
    started: list[HtcServer] = []
    try:
        start_two(pg_cluster, tmp_path, started, executor=False)
        yield started[0], started[1]
    finally:
        for srv in started:
            srv.stop()


def follow(srv: HtcServer, token: str, project_id: str, task_id: str, job_id: str) -> list[str]:
    """The SSE log stream until its ``end`` event: the messages of its ``line`` events."""
    path = f"/openhtc/v1/projects/{project_id}/tasks/{task_id}/jobs/{job_id}/logs/stream"
    lines: list[str] = []
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.stream("GET", srv.url + path, headers=headers, timeout=60) as resp:
        assert resp.status_code == 200, resp.read()
        kind = ""
        for raw in resp.iter_lines():
            if raw.startswith("event: "):
                kind = raw[7:]
            elif raw.startswith("data: ") and kind == "line":
                lines.append(json.loads(raw[6:])["message"])
            elif raw.startswith("data: ") and kind == "end":
                return lines
    pytest.fail(f"the stream ended without an end event after {len(lines)} lines")


def test_a_log_shipped_through_two_servers_reads_whole_through_either(
    two_servers: tuple[HtcServer, HtcServer], tmp_path: Path
) -> None:
    a, b = two_servers
    proxy = RoundRobinProxy([a.url, b.url]).start()
    token = a.cli("admin", "create-agent-token").stdout.strip()
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENHTC_")}
    env.update({"OPENHTC_AGENT_TOKEN": token, "OPENHTC_AGENT_SERVER": proxy.url})
    work = tmp_path / "agent"
    work.mkdir()
    cmd = [*htc_command(), "agent", "--runtime", "process", "--vcpus", "2", "--work-dir", str(work)]
    with open(work / "agent.log", "ab") as log:
        agent = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        api = a.api()
        project_id, task_id = api.project_and_task()
        job = api.submit_one(project_id, task_id, api.job_request(["sh", "-c", JOB]))
        job_id = f"{job['parentJobId']}:0"
        api.wait_jobs(project_id, task_id, lambda js: js[0]["status"] == "RUNNING", what="RUNNING")
        expected = [f"line {i}" for i in range(1, LINES + 1)]
        # followed live through the server that did not take the submit, to the job's end
        # (the agent ships an attempt's last lines before it reports its end)
        assert follow(b, b.token(), project_id, task_id, job_id) == expected
        api.wait_terminal(project_id, task_id, 1)
        for srv in (a, b):
            other = srv.api()
            assert other.log_lines(project_id, task_id, job_id) == expected
            # every page of 6 lines, each next page from the cursor, in both orders
            oldest_first = other.logs(project_id, task_id, job_id, sort="asc", pageSize=6)
            assert [e["message"] for e in oldest_first] == expected
            newest_first = other.logs(project_id, task_id, job_id, sort="desc", pageSize=6)
            assert [e["message"] for e in newest_first] == expected[::-1]
            assert follow(srv, srv.token(), project_id, task_id, job_id) == expected
            browser = sign_in(srv)  # the dashboard's job page reads the same log
            page = browser.get(f"/ui/projects/{project_id}/tasks/{task_id}/jobs/{job_id}/log")
            browser.close()
            assert page.status_code == 200, page.text
            assert [f"line {i}<" in page.text for i in range(1, LINES + 1)] == [True] * LINES
        assert min(proxy.counts) > 5, proxy.counts  # the agent's calls went through both
    finally:
        agent.terminate()
        try:
            agent.wait(timeout=30)
        except subprocess.TimeoutExpired:
            agent.kill()
        proxy.stop()
        print((work / "agent.log").read_text(errors="replace")[-3000:])


def test_a_log_an_embedded_executor_wrote_reads_whole_through_the_other_server(
    pg_cluster: PostgresCluster, tmp_path: Path
) -> None:
    """Servers that run their embedded executors: the executor writes files, and the server
    copies them to the database, so the other server shows the whole log too."""
    started: list[HtcServer] = []
    try:
        start_two(pg_cluster, tmp_path, started, executor=True)
        api = started[0].api()
        project_id, task_id = api.project_and_task()
        request = api.job_request(["sh", "-c", JOB], batch_size=2)
        parent = api.submit(project_id, task_id, request)
        expected = [f"line {i}" for i in range(1, LINES + 1)]
        api.wait_terminal(project_id, task_id, 2)
        for job in api.jobs(project_id, task_id):
            for srv in started:
                assert srv.api().log_lines(project_id, task_id, job["jobUUID"]) == expected, (srv, parent)
                assert follow(srv, srv.token(), project_id, task_id, job["jobUUID"]) == expected
    finally:
        for srv in started:
            srv.stop()
