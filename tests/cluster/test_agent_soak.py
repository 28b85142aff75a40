"""The agents' soak, short: hundreds of jobs with logs, and function batches, through one
``htc server --no-executor`` and two real ``htc agent`` processes; what the server and each
agent hold must not grow with the job count.

A leak per job passes every short test. The server's and each agent's descriptors and threads
(and their descendants': job launchers, function workers) are sampled after every tenth of the
jobs; growth beyond start-up noise fails the test, as does any failed job or call. The long run
is ``python -m bench --workload soak-agents`` (docs/performance.md, "Soak"). Memory is not
judged there (too noisy for a short run): what an agent kept per job and per batch is checked
directly instead (the numbering of each job's reports, each batch's environment; both were
kept for the agent's whole life).
"""

from __future__ import annotations

import io
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from tests.cluster.test_agent_protocol import agent_token

from openhtc.agent.outbox import Outbox
from openhtc.agent.transport import HttpTransport
from openhtc.domain.enums import JobStatus
from openhtc.domain.models import AttemptReport, Capacity
from openhtc.testing.agentproc import AgentProcess
from openhtc.testing.server import DEFAULT_REGION, HtcServer, htc_command
from openhtc.testing.soak import problems, slopes, soak, table

pytestmark = pytest.mark.one_db

JOBS = 400  # plus a tenth as many function calls: about a minute on the 2-core machine
HANDLERS = 'def double(event, context):\n    return event["x"] * 2\n'


@pytest.fixture
def agents(tmp_path: Path) -> Iterator[Callable[[HtcServer, int], list[AgentProcess]]]:
    started: list[AgentProcess] = []

    def start(srv: HtcServer, count: int) -> list[AgentProcess]:
        token = srv.cli("admin", "create-agent-token", "--agents", str(count)).stdout.strip()
        for i in range(count):
            started.append(AgentProcess(htc_command(), srv.url, token, tmp_path / f"agent-{i + 1}"))
        return started

    yield start
    for agent in started:
        agent.stop()
        print(f"{agent.work_dir.name}:\n{agent.log()}")


def test_server_and_agents_hold_no_more_with_the_job_count(
    start_server: Callable[..., HtcServer], agents: Callable[[HtcServer, int], list[AgentProcess]]
) -> None:
    srv = start_server(args=("--no-executor",), env={"OPENHTC_LOG_STORE": "database"})
    api = srv.api()
    project_id, task_id = api.project_and_task()
    code = io.BytesIO()
    with zipfile.ZipFile(code, "w") as zf:
        zf.writestr("soakfn.py", HANDLERS)
    api.request(
        "PUT", f"{srv.url}/htc/storage/objects/projects/{project_id}/shared/handlers.zip",
        content=code.getvalue(), expect=200,
    )  # fmt: skip
    pids = {a.work_dir.name: a.pid for a in agents(srv, 2)}
    functions = f"{srv.url}/openhtc/v1/projects/{project_id}/tasks/{task_id}/functions"
    command = ["sh", "-c", "echo soak one; echo soak two"]

    def submit(k: int) -> int:
        jobs = [api.job_request(command, maxMemory=64) for _ in range(k)]  # a batch each
        api.submit(project_id, task_id, *jobs, group="soak")
        calls = max(1, k // 10)
        body = {"image": "busybox:latest", "handler": "soakfn.double", "code": "handlers.zip",
                "events": [{"x": i} for i in range(calls)]}  # fmt: skip
        api.post(functions, body, expect=201)
        return k + calls

    def finished() -> tuple[int, int]:
        counts = api.summary(project_id, task_id)
        return counts["SUCCEEDED"] + counts["FAILED"], counts["FAILED"]

    assert srv.proc is not None
    samples = soak(srv.proc.pid, submit, finished, JOBS, steps=10, also=pids)
    found = problems(samples, srv.proc.pid, pids)
    tables = "\n".join(f"{who}:\n{table(samples, who)}" for who in ["server", *pids])
    assert not found, f"{'; '.join(found)}\nslopes per 1,000 jobs: {slopes(samples)}\n{tables}"
    # the jobs' logs reached the server (shipped by the agents)
    page = api.get(f"{api.task_path(project_id, task_id)}/jobs", group="soak", pageSize=1000)
    assert api.log_lines(project_id, task_id, page["items"][0]["jobUUID"]) == ["soak one", "soak two"]
    assert len({job["instanceId"] for job in page["items"]}) == 2  # both agents ran jobs


def test_an_agent_keeps_nothing_per_job_or_batch_once_its_jobs_ended(
    start_server: Callable[..., HtcServer], tmp_path: Path
) -> None:
    """What a long-lived agent must not hold for ever: each job's report numbering (one entry per
    job it ever ran) and each batch's environment (clients that submit one job per call make a
    batch per job). Played through the agent's transport and outbox against a real server:
    1,100 one-job batches claimed, run and reported."""
    count = 1100
    srv = start_server(args=("--no-executor",), env={"OPENHTC_AGENT_LIVENESS_SECONDS": "600"})
    api = srv.api()
    project_id, task_id = api.project_and_task()
    for start in range(0, count, 550):
        api.submit(project_id, task_id, *[api.job_request(["true"]) for _ in range(min(550, count - start))])
    outbox = Outbox(tmp_path / "outbox")
    outbox.open()
    transport = HttpTransport(srv.url, agent_token(srv), outbox, labels={}, runtime="process", version="test")
    free = Capacity(64, 1 << 20)
    try:
        transport.register("agent-soak", "inc-1", DEFAULT_REGION, ["X86"], free)
        done = 0
        deadline = time.monotonic() + 120
        while done < count:
            assert time.monotonic() < deadline, f"{done}/{count} jobs run"
            launches = transport.claim("agent-soak", DEFAULT_REGION, ["X86"], free, 200)
            now = time.time()
            steps = (JobStatus.STARTING, JobStatus.RUNNING, JobStatus.SUCCEEDED)
            for launch in launches:
                key = (launch.job_id, launch.attempt)
                transport.report("agent-soak", [AttemptReport(*key, status, now, 0) for status in steps])
                transport.launched.pop(key, None)  # its log shipped (the shipper forgets it then)
            done += len(launches)
        transport.heartbeat("agent-soak", [])  # the last reports delivered and acknowledged
        assert len(outbox) == 0
        assert api.summary(project_id, task_id)["SUCCEEDED"] == count
        assert len(outbox._seqs) == 0, f"{len(outbox._seqs)} report numberings kept"
        assert len(transport._fixed_envs) <= 1024 and len(transport._batch_envs) <= 1024
    finally:
        transport.close()
        outbox.close()
