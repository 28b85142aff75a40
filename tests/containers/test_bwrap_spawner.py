"""The bwrap runtime's sandbox spawners seen through the server: a spawner killed alone loses
the job it ran as an infrastructure fault, the job is re-run as the rules allow, and the slot
gets a new spawner. (The runtime-level cases are in test_bwrap_pipeline.py.)"""

from __future__ import annotations

import os
import signal
import uuid
from pathlib import Path
from typing import Any

import pytest
from runtime_support import pids_with_env, require_tool, wait_for

pytestmark = pytest.mark.one_db


def _spawners(server_pid: int) -> list[int]:
    """The server's sandbox spawner processes."""
    found = []
    for task in os.listdir(f"/proc/{server_pid}/task"):
        for child in Path(f"/proc/{server_pid}/task/{task}/children").read_text().split():
            try:
                if b"spawner_loop.py" in Path(f"/proc/{child}/cmdline").read_bytes():
                    found.append(int(child))
            except OSError:
                pass
    return found


def test_a_killed_spawner_loses_its_job_which_runs_again_on_a_new_spawner(
    registry_server: Any, registry_project: Any, busybox_image: str
) -> None:
    require_tool("bwrap")
    server = registry_server(runtime="bwrap", executor=True, env={"OPENHTC_EXECUTOR_VCPUS": "1"})
    project = registry_project(server)
    project.push(busybox_image, "bb:1")
    api, pid = project.api, project.project_id
    tid = api.create_task(pid)["taskId"]
    marker = uuid.uuid4().hex
    envs = [{"name": "HTC_SPAWNER_TEST", "value": marker}]
    request = api.job_request(["sh", "-c", "sleep 4; echo done"], imageName="bb:1", envs=envs)
    job_id = str(api.submit(pid, tid, request)[0]["parentJobId"]) + ":0"
    try:
        wait_for(lambda: api.job(pid, tid, job_id)["status"] == "RUNNING", timeout=60, what="the job to run")
        assert server.proc is not None
        killed = _spawners(server.proc.pid)
        assert killed, "no sandbox spawner"
        for spawner in killed:
            os.kill(spawner, signal.SIGKILL)
        wait_for(lambda: api.job(pid, tid, job_id)["status"] == "SUCCEEDED", timeout=60, what="the re-run")
        events = api.events(pid, tid, job_id)
        reasons = [str(e.get("statusReason")) for e in events if e["status"] == "FAILED"]
        assert any("spawner stopped" in r for r in reasons), reasons
        assert api.log_lines(pid, tid, job_id)[-1:] == ["done"]
        alive = _spawners(server.proc.pid)
        assert alive and not set(alive) & set(killed)
    finally:
        for leftover in pids_with_env("HTC_SPAWNER_TEST", marker):
            os.kill(leftover, signal.SIGKILL)
