"""`htc agent`: a real agent process runs the jobs of a real server that has no executor of its own.

What a user of a cluster notices: a sweep runs on the agent; its output shows through the API
while it runs; a SIGTERM lets the running job finish and takes no new one; a server restart
does not disturb the job the agent runs, whose end is reported once the server is back.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from openhtc.testing import agentproc as testing_agent
from openhtc.testing.server import HtcApi, HtcServer, htc_command


class AgentProcess(testing_agent.AgentProcess):
    """A real ``htc agent`` (process runtime, 2 vCPUs) of ``srv``, with its token kept."""

    def __init__(self, srv: HtcServer, work_dir: Path, token: str | None = None) -> None:
        """``token``: the agent token (default: a new one; an agent restarted on a machine
        keeps its token, which its agent id is bound to)."""
        self.token = token or srv.cli("admin", "create-agent-token").stdout.strip()
        super().__init__(htc_command(), srv.url, self.token, work_dir)

    def log(self, chars: int = 1 << 30) -> str:  # the whole log: tests look for lines anywhere
        return super().log(chars)

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)


@pytest.fixture
def cluster(
    start_server: Callable[..., HtcServer], tmp_path: Path
) -> Iterator[tuple[HtcServer, HtcApi, AgentProcess]]:
    srv = start_server(args=("--no-executor",), env={"OPENHTC_MAX_INFRASTRUCTURE_RETRIES": "0"})
    agent = AgentProcess(srv, tmp_path / "agent")
    try:
        yield srv, srv.api(), agent
    finally:
        agent.stop()
        print(agent.log()[-5000:])


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.1)


def gated(marker: Path, line: str) -> list[str]:
    """A job that prints ``line``, then runs until ``marker`` exists."""
    return ["sh", "-c", f"echo {line}; while [ ! -e {marker} ]; do sleep 0.05; done; echo done"]


def test_a_sweep_runs_on_the_agent_with_its_logs(cluster: tuple[HtcServer, HtcApi, AgentProcess]) -> None:
    _, api, _ = cluster
    project_id, task_id = api.project_and_task()
    api.submit(
        project_id,
        task_id,
        api.job_request(["sh", "-c", 'echo "line $AWS_BATCH_JOB_ARRAY_INDEX"'], batch_size=6),
    )
    jobs = api.wait_terminal(project_id, task_id, 6)
    assert {j["status"] for j in jobs} == {"SUCCEEDED"}, [(j["status"], j.get("statusReason")) for j in jobs]
    for job in jobs:
        index = job["jobUUID"].rpartition(":")[2]
        wait_for(
            lambda job=job, index=index: (
                f"line {index}" in api.log_lines(project_id, task_id, job["jobUUID"])
            ),
            f"the log of {job['jobUUID']}",
        )


def test_logs_show_while_the_job_runs_and_sigterm_drains(
    cluster: tuple[HtcServer, HtcApi, AgentProcess], tmp_path: Path
) -> None:
    _, api, agent = cluster
    marker = tmp_path / "go"
    project_id, task_id = api.project_and_task()
    api.submit(project_id, task_id, api.job_request(gated(marker, "hello-from-agent")))
    running = api.wait_jobs(project_id, task_id, lambda js: js[0]["status"] == "RUNNING", what="RUNNING")
    job_id = running[0]["jobUUID"]
    wait_for(
        lambda: "hello-from-agent" in api.log_lines(project_id, task_id, job_id), "the line while it runs"
    )
    assert api.job(project_id, task_id, job_id)["status"] == "RUNNING"
    # SIGTERM: the running job goes on, no new job is taken
    agent.signal(signal.SIGTERM)
    wait_for(lambda: "draining" in agent.log(), "the agent to drain")
    other_project, other_task = api.project_and_task()
    api.submit(other_project, other_task, api.job_request(["true"]))
    api.wait_admitted(other_project, other_task)
    assert agent.proc.poll() is None, "the agent left while its job ran"
    marker.touch()
    done = api.wait_terminal(project_id, task_id, 1)
    assert done[0]["status"] == "SUCCEEDED", done
    agent.proc.wait(timeout=30)
    assert agent.proc.returncode == 0, agent.log()[-3000:]
    (queued,) = api.jobs(other_project, other_task)
    assert queued["status"] == "SUBMITTED_TO_PROVIDER", queued
    assert "done" in api.log_lines(project_id, task_id, job_id)


def test_a_server_restart_leaves_the_agents_job_running(
    cluster: tuple[HtcServer, HtcApi, AgentProcess], tmp_path: Path
) -> None:
    srv, api, agent = cluster
    marker = tmp_path / "go"
    project_id, task_id = api.project_and_task()
    api.submit(project_id, task_id, api.job_request(gated(marker, "before-restart")))
    running = api.wait_jobs(project_id, task_id, lambda js: js[0]["status"] == "RUNNING", what="RUNNING")
    job_id = running[0]["jobUUID"]
    srv.stop()
    marker.touch()  # the job ends while the server is down: its end waits on the agent's disk
    time.sleep(1.0)
    srv.start()
    api = srv.api()
    done = api.wait_terminal(project_id, task_id, 1)
    assert done[0]["status"] == "SUCCEEDED", done
    events = api.events(project_id, task_id, job_id)
    assert all(e["status"] != "FAILED" for e in events), events  # one attempt, never recovered
    assert agent.proc.poll() is None


def test_a_jobs_end_survives_the_agent_crashing_while_the_server_is_down(
    cluster: tuple[HtcServer, HtcApi, AgentProcess], tmp_path: Path
) -> None:
    srv, api, agent = cluster
    marker = tmp_path / "go"
    project_id, task_id = api.project_and_task()
    api.submit(project_id, task_id, api.job_request(gated(marker, "crash")))
    running = api.wait_jobs(project_id, task_id, lambda js: js[0]["status"] == "RUNNING", what="RUNNING")
    job_id = running[0]["jobUUID"]
    srv.stop()
    marker.touch()
    reports = agent.work_dir / "agent" / "reports.jsonl"
    wait_for(lambda: '"status": 5' in reports.read_text(), "the end to be buffered on disk")
    os.killpg(agent.proc.pid, signal.SIGKILL)  # the agent dies with the end not yet delivered
    agent.proc.wait(timeout=10)
    srv.start()
    restarted = AgentProcess(srv, agent.work_dir, agent.token)  # the same machine, work directory and token
    try:
        api = srv.api()
        done = api.wait_terminal(project_id, task_id, 1)
        assert done[0]["status"] == "SUCCEEDED", done
        events = api.events(project_id, task_id, job_id)
        assert all(e["status"] != "FAILED" and e["attempt"] == 1 for e in events), events
    finally:
        restarted.stop()


def test_a_cancel_kills_the_job_on_the_agent(
    cluster: tuple[HtcServer, HtcApi, AgentProcess], tmp_path: Path
) -> None:
    _, api, _ = cluster
    pid_file = tmp_path / "pid"
    project_id, task_id = api.project_and_task()
    api.submit(project_id, task_id, api.job_request(["sh", "-c", f"echo $$ > {pid_file}; exec sleep 300"]))
    wait_for(lambda: pid_file.exists() and pid_file.read_text().strip() != "", "the job to start")
    pid = int(pid_file.read_text())
    api.cancel(project_id, task_id)

    def gone() -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        try:  # it may end between the two looks: /proc/PID is gone then (ESRCH, ENOENT)
            return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z"
        except OSError:
            return True

    wait_for(gone, "the cancelled job's process to be killed")
