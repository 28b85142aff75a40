"""``htc agent --time-limit --idle-timeout``: an agent that no allocation queue started (say, by
hand in an sbatch script) knows its allocation's end and leaves when idle, like a pilot.

No Slurm needed: the agent runs as a plain process against a server with no executor."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from openhtc.testing.server import HtcServer, htc_command

pytestmark = [pytest.mark.timeout(180), pytest.mark.one_db]


@pytest.fixture
def agent_with_limits(
    start_server: Callable[..., HtcServer], tmp_path: Path
) -> Iterator[tuple[HtcServer, subprocess.Popen[bytes], Path]]:
    srv = start_server(args=("--no-executor",), env={"OPENHTC_AGENT_POLL_SECONDS": "1"})
    token = srv.cli("admin", "create-agent-token").stdout.strip()
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENHTC_")}
    # the flags' variables, as an sbatch script would set them
    env.update(OPENHTC_AGENT_TOKEN=token, OPENHTC_AGENT_SERVER=srv.url, OPENHTC_AGENT_IDLE_TIMEOUT="4s")
    log_path = tmp_path / "agent.log"
    cmd = [*htc_command(), "agent", "--runtime", "process", "--vcpus", "2", "--work-dir", str(tmp_path / "w"),
           "--time-limit", "3m"]  # fmt: skip
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        yield srv, proc, log_path
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        print(log_path.read_text(errors="replace")[-3000:])


def test_an_agent_with_a_time_limit_takes_only_fitting_jobs_and_leaves_when_idle(
    agent_with_limits: tuple[HtcServer, subprocess.Popen[bytes], Path],
) -> None:
    srv, proc, log_path = agent_with_limits
    api = srv.api()
    project_id, task_id = api.project_and_task()
    # 3 min, drained a minute before the end: a job of up to ~2 min fits, one of 170 s never does
    api.submit_one(project_id, task_id, api.job_request(["true"], execTimeoutSeconds=170), group="long")
    api.submit_one(project_id, task_id, api.job_request(["sleep", "2"], execTimeoutSeconds=60), group="short")
    api.wait_jobs(
        project_id, task_id, lambda js: any(j["status"] == "SUCCEEDED" for j in js), timeout=90,
        what="the short job to run on the agent",
    )  # fmt: skip
    # nothing it may take is left: it leaves by itself after its idle timeout, having drained
    assert proc.wait(timeout=90) == 0, log_path.read_text()
    assert "idle for 4 s: leaving" in log_path.read_text()
    by_group = {j["group"]: j["status"] for j in api.jobs(project_id, task_id)}
    assert by_group["short"] == "SUCCEEDED"
    assert by_group["long"] not in ("STARTING", "RUNNING", "SUCCEEDED", "FAILED"), by_group
