"""Jobs on ``htc agent`` see PROJECT_SHARED_FOLDER and TASK_SHARED_FOLDER on a server with local
storage, staged through the server's object API with each job's own token.

What a user notices: an input uploaded with htcctl is read by a job on the agent; what the job
writes to its task folder can be downloaded through the API afterwards, also when it fails. (The
process runtime isolates nothing: that the shared folder is read-only inside a job is bwrap's and
podman's part; the job's token cannot write the shared folder: tests/storage/test_http_backend.py.)
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from tests.cluster.test_agent import AgentProcess, cluster, wait_for  # noqa: F401 - a fixture

from openhtc.testing.server import HtcApi, HtcServer

# The database plays no part in staging: run on the first of --db only.
pytestmark = pytest.mark.one_db

JOB = (
    'cat "$PROJECT_SHARED_FOLDER/inputs/in.txt"; '
    'mkdir -p "$TASK_SHARED_FOLDER/out"; '
    'echo "result $AWS_BATCH_JOB_ARRAY_INDEX $(cat "$PROJECT_SHARED_FOLDER/inputs/in.txt")" '
    '> "$TASK_SHARED_FOLDER/out/r-$AWS_BATCH_JOB_ARRAY_INDEX.txt"; '
    'exit "$EXIT"'
)


def htcctl(srv: HtcServer, *args: str, cwd: Path) -> str:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(cwd), "RESCALE_API_TOKEN": srv.api_key,
           "OPENHTC_API_URL": srv.api_url}  # fmt: skip
    done = subprocess.run(
        [str(Path(sys.executable).parent / "htcctl"), *args], env=env, cwd=cwd, capture_output=True,
        text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_a_job_on_the_agent_reads_shared_inputs_and_its_outputs_reach_task_storage(
    cluster: tuple[HtcServer, HtcApi, AgentProcess],  # noqa: F811 - the fixture imported above
    tmp_path: Path,
) -> None:
    srv, api, agent = cluster
    project_id, task_id = api.project_and_task()
    failing_task = api.create_task(project_id)["taskId"]
    (tmp_path / "inputs").mkdir()
    (tmp_path / "inputs" / "in.txt").write_text("hello-input\n")
    htcctl(srv, "--project-shared", "--project-id", project_id, "upload", "inputs/in.txt", cwd=tmp_path)

    for task, exit_code in ((task_id, 0), (failing_task, 3)):
        request = api.job_request(["sh", "-c", JOB], batch_size=2)
        request["htcJobDefinition"]["envs"] = [{"name": "EXIT", "value": str(exit_code)}]
        api.submit(project_id, task, request)
    with httpx.Client(base_url=srv.api_url, headers={"Authorization": f"Bearer {srv.token()}"}) as http:
        for task, expected in ((task_id, "SUCCEEDED"), (failing_task, "FAILED")):
            jobs = api.wait_terminal(project_id, task, 2)
            assert {j["status"] for j in jobs} == {expected}, [
                (j["status"], j.get("statusReason")) for j in jobs
            ]
            for job in jobs:
                wait_for(
                    lambda job=job, task=task: (
                        "hello-input" in api.log_lines(project_id, task, job["jobUUID"])
                    ),
                    f"the log of {job['jobUUID']}",
                )
            # the outputs are in task storage once the jobs are reported ended
            prefix = f"projects/{project_id}/tasks/{task}/"
            listed = http.get("/htc/storage/list", params={"prefix": prefix}).json()
            assert [i["key"] for i in listed["items"]] == [prefix + "out/r-0.txt", prefix + "out/r-1.txt"]
            for index in (0, 1):
                body = http.get(f"/htc/storage/objects/{prefix}out/r-{index}.txt")
                assert body.status_code == 200 and body.text == f"result {index} hello-input\n"
        shared = http.get("/htc/storage/list", params={"prefix": f"projects/{project_id}/shared/"}).json()
        assert [i["key"] for i in shared["items"]] == [f"projects/{project_id}/shared/inputs/in.txt"]
    assert "Traceback" not in agent.log()
