"""The executor protocol over HTTP (/openhtc/v1/agents/...), driven with raw httpx as an agent would.

A real server with no embedded executor; the test plays the agent. What a user would notice:
jobs run by an agent end as it reports them, once; a report for an attempt that is no longer
current changes nothing; an agent that vanishes gives its jobs back (an infrastructure retry);
an idle agent's call returns the moment a job is submitted.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from openhtc.domain.enums import JobStatus
from openhtc.testing.server import DEFAULT_REGION, HtcApi, HtcServer

AGENTS = "/openhtc/v1/agents"
LIVENESS = 3.0


class Agent:
    """One fake agent: registers, exchanges, reports with increasing seqs."""

    def __init__(self, srv: HtcServer, token: str, name: str) -> None:
        self.http = httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {token}"}, timeout=60)
        self.agent_id = f"agent-{name}-{uuid.uuid4().hex[:6]}"
        self.incarnation = uuid.uuid4().hex
        self.seq: dict[tuple[int, int], int] = {}

    def register(self, running: list[list[int]] | None = None, expect: int = 200) -> dict[str, Any]:
        body = {
            "agent_id": self.agent_id,
            "incarnation": self.incarnation,
            "region": DEFAULT_REGION,
            "architectures": ["X86"],
            "capacity": {"vcpus": 4, "memory_mb": 8192},
            "labels": {"rack": "a"},
            "version": "test",
            "host": "test",
            "runtime": "process",
            "running": running or [],
            "may_have_started": [],
        }
        resp = self.http.post(f"{AGENTS}/register", json=body)
        assert resp.status_code == expect, resp.text
        return dict(resp.json())

    def report(self, job_id: int, attempt: int, status: JobStatus, **extra: Any) -> dict[str, Any]:
        key = (job_id, attempt)
        self.seq[key] = self.seq.get(key, 0) + 1
        return {"job_id": job_id, "attempt": attempt, "seq": self.seq[key], "status": int(status),
                "at": time.time(), **extra}  # fmt: skip

    def exchange(
        self,
        *,
        held: list[tuple[int, int]] = (),  # type: ignore[assignment]
        reports: list[dict[str, Any]] = (),  # type: ignore[assignment]
        max_jobs: int = 0,
        wait: float = 0.0,
        expect: int = 200,
        seq: int | None = None,  # an exchange_seq: ``held`` is complete (lost leases re-queued)
    ) -> dict[str, Any]:
        body: dict[str, Any] = {
            "incarnation": self.incarnation,
            "free": {"vcpus": 4, "memory_mb": 8192},
            "max_jobs": max_jobs,
            "held": [list(k) for k in held],
            "reports": list(reports),
            "wait_seconds": wait,
            "draining": False,
        }
        if seq is not None:
            body["exchange_seq"] = seq
        resp = self.http.post(f"{AGENTS}/{self.agent_id}/exchange", json=body)
        assert resp.status_code == expect, resp.text
        return dict(resp.json())


@pytest.fixture
def srv(start_server: Callable[..., HtcServer]) -> HtcServer:
    return start_server(
        args=("--no-executor",),
        env={"OPENHTC_AGENT_LIVENESS_SECONDS": str(LIVENESS), "OPENHTC_MAX_INFRASTRUCTURE_RETRIES": "1"},
    )


def agent_token(srv: HtcServer, region: str = "*", agents: int = 1) -> str:
    """A token for ``agents`` live agents at once (each bound to it at its first register)."""
    return srv.cli("admin", "create-agent-token", "--region", region, "--agents", str(agents)).stdout.strip()


def submit(api: HtcApi, count: int = 1) -> tuple[str, str]:
    project_id, task_id = api.project_and_task()
    api.submit(project_id, task_id, api.job_request(["true"], batch_size=count))
    return project_id, task_id


def claim(agent: Agent, count: int) -> list[dict[str, Any]]:
    leases: list[dict[str, Any]] = []
    deadline = time.monotonic() + 30
    while len(leases) < count and time.monotonic() < deadline:
        leases += agent.exchange(max_jobs=count - len(leases), wait=1.0)["leases"]
    assert len(leases) == count, leases
    return leases


def test_token_scopes(srv: HtcServer) -> None:
    token = agent_token(srv, DEFAULT_REGION)
    # an agent token reaches no Rescale route
    assert (
        httpx.get(f"{srv.api_url}/htc/projects", headers={"Authorization": f"Bearer {token}"}).status_code
        == 403
    )
    # user credentials reach no agent route
    body = {"incarnation": "x", "free": {"vcpus": 1, "memory_mb": 1}, "max_jobs": 0}
    for header in (f"Bearer {srv.token()}", f"Token {srv.api_key}"):
        resp = httpx.post(f"{srv.url}{AGENTS}/a/exchange", json=body, headers={"Authorization": header})
        assert resp.status_code == 403, resp.text
    # a token of one region registers no agent in another
    other = Agent(srv, agent_token(srv, "GCP_US_EAST_1"), "other")
    other.register(expect=403)
    # an agent unknown to the server must register first
    agent = Agent(srv, token, "scoped")
    assert agent.exchange(expect=409) == {"error": "unknown agent"}
    agent.register()
    agent.exchange()
    # nor does it serve an agent of another region
    other.agent_id, other.incarnation = agent.agent_id, agent.incarnation
    other.exchange(expect=403)
    agent.incarnation = uuid.uuid4().hex
    assert agent.exchange(expect=409) == {"error": "stale incarnation"}


def test_duplicate_report_is_acked_and_changes_nothing(srv: HtcServer) -> None:
    api = srv.api()
    agent = Agent(srv, agent_token(srv), "dup")
    agent.register()
    project_id, task_id = submit(api)
    (lease,) = claim(agent, 1)
    key = (lease["job_id"], lease["attempt"])
    starting, running = agent.report(*key, JobStatus.STARTING), agent.report(*key, JobStatus.RUNNING)
    done = agent.report(*key, JobStatus.FAILED, exit_code=3, failure_code="ErrorNonZeroContainerExitCode",
                        reason="exit 3")  # fmt: skip
    answer = agent.exchange(held=[key], reports=[starting, running, done])
    assert sorted(map(tuple, answer["acked"])) == [(*key, 1), (*key, 2), (*key, 3)]
    (job,) = api.jobs(project_id, task_id)
    assert job["status"] == "FAILED"
    events = api.events(project_id, task_id, job["jobUUID"])
    # the answer was lost: the agent sends the same reports again
    again = agent.exchange(held=[key], reports=[starting, running, done])
    assert sorted(map(tuple, again["acked"])) == [(*key, 1), (*key, 2), (*key, 3)]
    assert again["refused"] == []
    assert api.jobs(project_id, task_id)[0]["status"] == "FAILED"
    assert api.events(project_id, task_id, job["jobUUID"]) == events


def test_a_report_at_a_time_that_is_not_a_number_is_a_4xx_and_changes_nothing(srv: HtcServer) -> None:
    """JSON's NaN (which Python's and the server's parsers accept) in a report's time: refused
    as bad input, the job untouched (it was a 500 after a failed write, resent forever)."""
    api = srv.api()
    agent = Agent(srv, agent_token(srv), "nan")
    agent.register()
    project_id, task_id = submit(api)
    (lease,) = claim(agent, 1)
    key = (lease["job_id"], lease["attempt"])
    bad = {**agent.report(*key, JobStatus.STARTING), "at": float("nan")}
    body = {"incarnation": agent.incarnation, "free": {"vcpus": 4, "memory_mb": 8192}, "max_jobs": 0,
            "held": [list(key)], "reports": [bad], "wait_seconds": 0.0, "draining": False}  # fmt: skip
    raw = json.dumps(body)
    assert "NaN" in raw
    resp = agent.http.post(
        f"{AGENTS}/{agent.agent_id}/exchange", content=raw, headers={"Content-Type": "application/json"}
    )
    assert 400 <= resp.status_code < 500, (resp.status_code, resp.text[:300])
    (job,) = api.jobs(project_id, task_id)
    assert job["status"] != "STARTING"


def test_stale_attempt_is_refused_and_killed(srv: HtcServer) -> None:
    api = srv.api()
    agent = Agent(srv, agent_token(srv), "stale")
    agent.register()
    project_id, task_id = submit(api)
    (lease,) = claim(agent, 1)
    key = (lease["job_id"], lease["attempt"])
    agent.exchange(held=[key], reports=[agent.report(*key, JobStatus.STARTING)])
    # the agent restarts (a new incarnation) without saying it still runs the job: recovered
    agent.incarnation = uuid.uuid4().hex
    agent.register()
    (retry,) = claim(agent, 1)
    assert (retry["job_id"], retry["attempt"]) == (key[0], key[1] + 1)
    # a late report for the old attempt: refused, its attempt is to be killed, nothing changes
    late = agent.report(*key, JobStatus.SUCCEEDED, exit_code=0)
    answer = agent.exchange(held=[key], reports=[late])
    assert [tuple(k) for k in answer["refused"]] == [key]
    assert key in [tuple(k) for k in answer["kill"]]
    (job,) = api.jobs(project_id, task_id)
    assert job["status"] == "RUNNABLE"


def test_long_poll_returns_when_a_job_is_submitted(srv: HtcServer) -> None:
    api = srv.api()
    agent = Agent(srv, agent_token(srv), "poll")
    agent.register()
    answers: list[dict[str, Any]] = []
    waiting = threading.Thread(target=lambda: answers.append(agent.exchange(max_jobs=1, wait=20.0)))
    began = time.monotonic()
    waiting.start()
    time.sleep(0.5)  # let the call reach the server and wait there
    assert not answers, "an idle exchange with wait_seconds answered before any job existed"
    submit(api)
    waiting.join(timeout=30)
    assert answers and len(answers[0]["leases"]) == 1, answers
    assert time.monotonic() - began < 15, "the long poll ran to its end instead of waking"


def test_a_lost_agent_gives_its_jobs_back_but_not_while_the_server_hears_nobody(srv: HtcServer) -> None:
    api = srv.api()
    token = agent_token(srv, agents=2)
    lost, other = Agent(srv, token, "lost"), Agent(srv, token, "other")
    lost.register()
    other.register()
    project_id, task_id = submit(api)
    (lease,) = claim(lost, 1)
    key = (lease["job_id"], lease["attempt"])
    lost.exchange(
        held=[key], reports=[lost.report(*key, JobStatus.STARTING), lost.report(*key, JobStatus.RUNNING)]
    )
    other.exchange()
    # nobody calls for longer than the liveness timeout: the server suspects itself, not the agents
    time.sleep(LIVENESS * 2)
    assert api.jobs(project_id, task_id)[0]["status"] == "RUNNING"
    # another agent calls again: the silent one is lost a liveness timeout later, its job re-queued
    deadline = time.monotonic() + 30
    leases: list[dict[str, Any]] = []
    while not leases and time.monotonic() < deadline:
        leases = other.exchange(max_jobs=1, wait=0.5)["leases"]
    assert [(x["job_id"], x["attempt"]) for x in leases] == [(key[0], key[1] + 1)]
    events = api.events(project_id, task_id, api.jobs(project_id, task_id)[0]["jobUUID"])
    assert any("lost" in (e.get("statusReason") or "") for e in events), events
    # the lost agent must register again; its report for the old attempt is then refused
    assert lost.exchange(held=[key], expect=409) == {"error": "agent lost"}
    assert lost.register(running=[list(key)])["kill"] == [list(key)]
    answer = lost.exchange(held=[key], reports=[lost.report(*key, JobStatus.SUCCEEDED, exit_code=0)])
    assert [tuple(k) for k in answer["refused"]] == [key]


def test_one_invalid_report_costs_the_agent_none_of_its_others(srv: HtcServer) -> None:
    api = srv.api()
    agent = Agent(srv, agent_token(srv), "invalid")
    agent.register()
    project_id, task_id = submit(api, 3)
    leases = claim(agent, 2)
    good, bad = ((x["job_id"], x["attempt"]) for x in leases)
    # RUNNABLE -> SUCCEEDED skips RUNNING: invalid. The other report, the heartbeat and the claim
    # of the same exchange still go through.
    answer = agent.exchange(
        held=[good, bad],
        reports=[
            agent.report(*good, JobStatus.STARTING),
            agent.report(*bad, JobStatus.SUCCEEDED, exit_code=0),
        ],
        max_jobs=1,
    )
    assert [tuple(k) for k in answer["acked"]] == [(*good, 1)]
    assert [tuple(k) for k in answer["refused"]] == [bad]
    assert answer["kill"] == []  # the refused report's attempt is still the agent's own
    assert len(answer["leases"]) == 1
    statuses = sorted(j["status"] for j in api.jobs(project_id, task_id))
    assert statuses == ["RUNNABLE", "RUNNABLE", "STARTING"], statuses


def test_an_attempt_that_ended_by_the_agents_report_is_not_killed(srv: HtcServer) -> None:
    api = srv.api()
    agent = Agent(srv, agent_token(srv), "ended")
    agent.register()
    project_id, task_id = submit(api, 2)
    ended, cancelled = ((x["job_id"], x["attempt"]) for x in claim(agent, 2))
    reports = [agent.report(*ended, s) for s in (JobStatus.STARTING, JobStatus.RUNNING)]
    reports.append(agent.report(*ended, JobStatus.SUCCEEDED, exit_code=0))
    # the end acked in this very exchange, and listed as held until the agent drops it
    assert agent.exchange(held=[ended, cancelled], reports=reports)["kill"] == []
    assert agent.exchange(held=[ended, cancelled], reports=reports)["kill"] == []
    # a cancelled one is still killed
    assert api.cancel(project_id, task_id).status_code < 300
    assert [tuple(k) for k in agent.exchange(held=[ended, cancelled])["kill"]] == [cancelled]


def _claim_calls(srv: HtcServer) -> int:
    resp = httpx.get(f"{srv.api_url}/htc/metrics", headers={"Authorization": f"Token {srv.api_key}"})
    resp.raise_for_status()
    line = next(x for x in resp.text.splitlines() if x.startswith("openhtc_executor_claims"))
    return int(float(line.split()[-1]))


def test_a_submission_wakes_one_claims_worth_of_idle_agents_not_all(srv: HtcServer) -> None:
    api = srv.api()
    token = agent_token(srv, agents=6)
    agents = [Agent(srv, token, f"idle{i}") for i in range(6)]
    answers: list[dict[str, Any]] = []
    for agent in agents:
        agent.register()
    polls = [
        threading.Thread(target=lambda a=a: answers.append(a.exchange(max_jobs=1, wait=8.0))) for a in agents
    ]
    for poll in polls:
        poll.start()
    time.sleep(1.0)  # every long poll reaches the server and waits there
    before = _claim_calls(srv)
    submit(api)
    for poll in polls:
        poll.join(timeout=30)
    assert sum(len(a["leases"]) for a in answers) == 1, answers
    # the woken agent claims the job, then the next one finds nothing and the chain stops;
    # an agent woken for nothing would claim in vain (each claim a write transaction)
    claims = _claim_calls(srv) - before
    assert claims < len(agents), claims
