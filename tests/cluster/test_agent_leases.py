"""An agent's leases are reconciled without running a job twice (issue 16 review, finding 1).

The server re-queues the claimed leases an agent does not list as held (their answer was lost).
What a user would notice if the list missed a lease the agent did receive: the job runs twice,
even with no retries allowed. Against a real server: the agent's transport lists every lease it
received until a report of it is in its outbox, the server re-queues only a lease missing from
two exchanges in a row, and a real ``htc agent`` runs each of a few hundred jobs exactly once.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from tests.cluster.test_agent_protocol import Agent, agent_token, claim, submit
from tests.cluster.test_agent_security import start_agent, stop_agent

from openhtc.agent.outbox import Outbox
from openhtc.agent.transport import HttpTransport
from openhtc.domain.enums import JobStatus
from openhtc.domain.models import AttemptReport, Capacity
from openhtc.testing.server import DEFAULT_REGION, HtcServer

NEVER_RECEIVED = "never received its lease"


@pytest.fixture
def srv(start_server: Callable[..., HtcServer]) -> HtcServer:
    """Only the reconciliation can give a lease back (a liveness far longer than the test), and a
    job given back after it started would run twice (no retries)."""
    return start_server(
        args=("--no-executor",),
        env={"OPENHTC_AGENT_LIVENESS_SECONDS": "600", "OPENHTC_MAX_INFRASTRUCTURE_RETRIES": "0"},
    )


def reasons(srv: HtcServer, project_id: str, task_id: str) -> list[str]:
    api = srv.api()
    return [
        e.get("statusReason") or ""
        for job in api.jobs(project_id, task_id)
        for e in api.events(project_id, task_id, job["jobUUID"])
    ]


def assert_clean_log(srv: HtcServer) -> None:
    log = srv.log_path.read_text(errors="replace")
    assert "Traceback" not in log and '" 500' not in log, log[-4000:]


def test_a_lease_is_re_queued_only_when_two_exchanges_in_a_row_miss_it(srv: HtcServer) -> None:
    project_id, task_id = submit(srv.api())
    agent = Agent(srv, agent_token(srv), "forgetful")
    agent.register()
    (lease,) = claim(agent, 1)
    key = (lease["job_id"], lease["attempt"])
    # a lease on its way through the agent (ended, its report not yet in the outbox) may miss
    # one list: kept
    agent.exchange(held=[], seq=1)
    agent.exchange(held=[key], seq=2)
    agent.exchange(held=[], seq=3)
    assert not any(NEVER_RECEIVED in r for r in reasons(srv, project_id, task_id))
    # missed twice in a row: its answer never reached the agent, the job goes back to the queue
    agent.exchange(held=[], seq=4)
    assert any(NEVER_RECEIVED in r for r in reasons(srv, project_id, task_id))
    other = Agent(srv, agent_token(srv), "other")
    other.register()
    (again,) = claim(other, 1)
    assert again["job_id"] == key[0]
    assert_clean_log(srv)


def test_the_transport_lists_a_received_lease_until_its_report_is_in_the_outbox(
    srv: HtcServer, tmp_path: Path
) -> None:
    project_id, task_id = submit(srv.api())
    outbox = Outbox(tmp_path / "outbox")
    outbox.open()
    transport = HttpTransport(srv.url, agent_token(srv), outbox, labels={}, runtime="process", version="test")
    try:
        transport.register("agent-t", "inc-1", DEFAULT_REGION, ["X86"], Capacity(2, 4096))
        launches = []
        deadline = time.monotonic() + 30
        while not launches and time.monotonic() < deadline:
            launches = transport.claim("agent-t", DEFAULT_REGION, ["X86"], Capacity(2, 4096), 1)
        (launch,) = launches
        # The executor ended the job and took its report for the flush: the attempt is in
        # neither its held nor its reporting list, and the report is not in the outbox yet.
        # Exchanges (the next turns' claims) go meanwhile.
        transport.held = list
        for _ in range(3):
            transport.claim("agent-t", DEFAULT_REGION, ["X86"], Capacity(2, 4096), 0)
        assert not any(NEVER_RECEIVED in r for r in reasons(srv, project_id, task_id))
        key, now = (launch.job_id, launch.attempt), time.time()
        steps = [JobStatus.STARTING, JobStatus.RUNNING, JobStatus.SUCCEEDED]
        transport.report("agent-t", [AttemptReport(*key, status, now, 0) for status in steps])
        transport.heartbeat("agent-t", [])
        (job,) = srv.api().wait_terminal(project_id, task_id, 1, timeout=30)
        assert job["status"] == "SUCCEEDED", job
        assert not any(NEVER_RECEIVED in r for r in reasons(srv, project_id, task_id))
    finally:
        transport.close()
        outbox.close()
    assert_clean_log(srv)


def test_a_few_hundred_short_jobs_on_one_agent_each_run_exactly_once(srv: HtcServer, tmp_path: Path) -> None:
    count = 300
    marker = tmp_path / "runs"
    proc, log_path = start_agent(srv, srv.url, tmp_path / "agent")
    try:
        api = srv.api()
        project_id, task_id = api.project_and_task()
        command = f"echo $AWS_BATCH_JOB_ARRAY_INDEX >> {marker}"
        api.submit(
            project_id, task_id, api.job_request(["sh", "-c", command], batch_size=count, max_retries=0)
        )
        jobs = api.wait_terminal(project_id, task_id, count, timeout=300)
        assert collections.Counter(j["status"] for j in jobs) == {"SUCCEEDED": count}
        runs = collections.Counter(marker.read_text().split())
        assert {index for index, n in runs.items() if n > 1} == set()
        assert sorted(runs, key=int) == [str(i) for i in range(count)]
    finally:
        stop_agent(proc, log_path)
    assert_clean_log(srv)
