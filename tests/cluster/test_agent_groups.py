"""Many agents exchanging at once through two servers on one PostgreSQL (group commit).

Each server serves the exchanges waiting at a moment together, in one transaction
(services/group_commit.py). What a user would notice: every job is leased to one agent only and
ends SUCCEEDED once, whichever server its agent called, every report is acknowledged, and the
servers' metrics show calls sharing groups. The agents are played with raw httpx, as in
test_agent_protocol.py; nothing asserts how long anything took.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from openhtc.domain.enums import JobStatus
from openhtc.testing.postgres import PostgresCluster
from openhtc.testing.server import DEFAULT_REGION, HtcServer

AGENTS = "/openhtc/v1/agents"
PER_SERVER = 10  # agents calling each server at once
SLOTS = 4
JOBS = 400


@pytest.fixture
def two_servers(pg_cluster: PostgresCluster, tmp_path: Path) -> Iterator[list[HtcServer]]:
    url = pg_cluster.new_database()
    started: list[HtcServer] = []
    try:
        for i in range(2):
            data_dir = tmp_path / f"server{i}"
            data_dir.mkdir()
            if started:  # one admin key and one signing key for both (as cluster mode shares them)
                (data_dir / "admin-api-key").write_text(started[0].api_key + "\n")
            env = {"OPENHTC_MAX_INFRASTRUCTURE_RETRIES": "0"}
            started.append(HtcServer(data_dir, url, env=env, args=("--no-executor",)).start())
        yield started
    finally:
        for srv in started:
            srv.stop()


class SimAgent:
    """One agent: claims up to its free slots, "runs" each lease at once and reports its
    STARTING, RUNNING and SUCCEEDED in its next exchange, until told to stop."""

    def __init__(self, srv: HtcServer, token: str) -> None:
        self.http = httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {token}"}, timeout=60)
        self.agent_id = f"group-{uuid.uuid4().hex[:8]}"
        self.incarnation = uuid.uuid4().hex
        self.leases: list[tuple[int, int]] = []
        self.acked: set[tuple[int, int]] = set()  # (job, attempt) whose SUCCEEDED was acknowledged
        self.refused: list[Any] = []

    def register(self) -> None:
        body = {
            "agent_id": self.agent_id, "incarnation": self.incarnation, "region": DEFAULT_REGION,
            "architectures": ["X86"], "capacity": {"vcpus": SLOTS, "memory_mb": SLOTS * 1024},
            "labels": {}, "version": "test", "host": "test", "runtime": "process",
            "running": [], "may_have_started": [],
        }  # fmt: skip
        resp = self.http.post(f"{AGENTS}/register", json=body)
        assert resp.status_code == 200, resp.text

    def run(self, stop: threading.Event) -> None:
        pending: list[dict[str, Any]] = []
        held: set[tuple[int, int]] = set()
        while not stop.is_set():
            free = SLOTS - len(held)
            body = {
                "incarnation": self.incarnation, "free": {"vcpus": free, "memory_mb": free * 1024},
                "max_jobs": free, "held": [list(k) for k in held], "reports": pending,
                "wait_seconds": 0.0 if pending else 0.5, "draining": False,
            }  # fmt: skip
            resp = self.http.post(f"{AGENTS}/{self.agent_id}/exchange", json=body)
            assert resp.status_code == 200, resp.text
            answer = resp.json()
            self.refused += answer["refused"]
            assert answer["kill"] == [], answer["kill"]
            acked = {(a[0], a[1], a[2]) for a in answer["acked"]}
            assert acked == {(r["job_id"], r["attempt"], r["seq"]) for r in pending}, (acked, pending)
            for r in pending:
                if r["status"] == int(JobStatus.SUCCEEDED):
                    held.discard((r["job_id"], r["attempt"]))
                    self.acked.add((r["job_id"], r["attempt"]))
            pending = []
            for lease in answer["leases"]:
                key = (lease["job_id"], lease["attempt"])
                self.leases.append(key)
                held.add(key)
                for seq, status in enumerate((JobStatus.STARTING, JobStatus.RUNNING, JobStatus.SUCCEEDED), 1):
                    pending.append({"job_id": key[0], "attempt": key[1], "seq": seq, "status": int(status),
                                    "at": time.time()})  # fmt: skip


def metric(srv: HtcServer, name: str) -> float:
    for line in srv.client().get("/htc/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"no {name} in /htc/metrics")


def test_agents_exchanging_at_once_through_two_servers_get_disjoint_leases_and_run_each_job_once(
    two_servers: list[HtcServer],
) -> None:
    a, b = two_servers
    token = a.cli("admin", "create-agent-token", "--agents", str(2 * PER_SERVER)).stdout.strip()
    agents = [SimAgent(srv, token) for srv in (a, b) for _ in range(PER_SERVER)]
    for agent in agents:
        agent.register()
    stop = threading.Event()
    errors: list[BaseException] = []

    def drive(agent: SimAgent) -> None:
        try:
            agent.run(stop)
        except BaseException as exc:  # an assertion in a thread: reported below
            errors.append(exc)
            stop.set()

    threads = [threading.Thread(target=drive, args=(agent,)) for agent in agents]
    for thread in threads:
        thread.start()
    try:
        api = a.api()
        project_id, task_id = api.project_and_task()
        for _ in range(JOBS // 100):  # in batches, as users submit: each wakes waiting agents
            api.submit(project_id, task_id, api.job_request(["true"], batch_size=100))
        jobs = api.wait_terminal(project_id, task_id, JOBS, timeout=120)
        deadline = time.monotonic() + 60  # the last acknowledgements on their way back
        while sum(len(x.acked) for x in agents) < JOBS and time.monotonic() < deadline and not errors:
            time.sleep(0.05)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
    assert not errors, errors[0]
    assert Counter(j["status"] for j in jobs) == {"SUCCEEDED": JOBS}
    leased = Counter(key for agent in agents for key in agent.leases)
    twice = [key for key, n in leased.items() if n > 1]
    assert not twice, f"{len(twice)} attempts leased to two agents or twice: {twice[:5]}"
    assert len(leased) == JOBS and {attempt for _, attempt in leased} == {1}
    assert sum(len(x.acked) for x in agents) == JOBS
    assert not any(x.refused for x in agents)
    assert {x.agent_id for x in agents if x.leases} & {x.agent_id for x in agents[PER_SERVER:]}, (
        "no agent of the second server got work"
    )
    # the servers served calls in groups: more calls than groups (a group is one transaction)
    groups = sum(metric(srv, "openhtc_agent_exchange_groups_total") for srv in two_servers)
    calls = sum(metric(srv, "openhtc_agent_exchange_group_calls_total") for srv in two_servers)
    assert calls > groups > 0, (calls, groups)


QUEUED, CLAIMED = int(JobStatus.SUBMITTED_TO_PROVIDER), int(JobStatus.RUNNABLE)
REFUSE_CLAIMS = f"""
CREATE FUNCTION refuse_claims() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.status = {QUEUED} AND NEW.status = {CLAIMED} THEN
        RAISE EXCEPTION 'claims refused by the test';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER refuse_claims BEFORE UPDATE ON jobs FOR EACH ROW EXECUTE FUNCTION refuse_claims();
"""


def test_a_report_is_acknowledged_even_when_the_claim_of_its_call_fails(
    pg_cluster: PostgresCluster, tmp_path: Path
) -> None:
    """A call's reports commit before its claim (services/group_commit.py): when the claim fails
    (here PostgreSQL refuses every claim, by a trigger), the agent still hears its reports
    acknowledged and the job ends as reported; it claims again in a later call."""
    import psycopg

    url = pg_cluster.new_database()
    srv = HtcServer(tmp_path, url, env={"OPENHTC_MAX_INFRASTRUCTURE_RETRIES": "0"}, args=("--no-executor",))
    srv.start()
    try:
        token = srv.cli("admin", "create-agent-token").stdout.strip()
        agent = SimAgent(srv, token)
        agent.register()
        api = srv.api()
        project_id, task_id = api.project_and_task()
        api.submit(project_id, task_id, api.job_request(["true"], batch_size=2))

        def exchange(reports: list[dict[str, Any]], held: list[tuple[int, int]]) -> dict[str, Any]:
            body = {
                "incarnation": agent.incarnation, "free": {"vcpus": 1, "memory_mb": 1024},
                "max_jobs": 1, "held": [list(k) for k in held], "reports": reports,
                "wait_seconds": 0.0 if reports else 2.0, "draining": False,
            }  # fmt: skip
            resp = agent.http.post(f"{AGENTS}/{agent.agent_id}/exchange", json=body)
            assert resp.status_code == 200, resp.text
            return dict(resp.json())

        def ran(key: tuple[int, int]) -> list[dict[str, Any]]:
            return [
                {"job_id": key[0], "attempt": key[1], "seq": seq, "status": int(status), "at": time.time()}
                for seq, status in enumerate((JobStatus.STARTING, JobStatus.RUNNING, JobStatus.SUCCEEDED), 1)
            ]

        leases: list[dict[str, Any]] = []
        deadline = time.monotonic() + 30
        while not leases and time.monotonic() < deadline:
            leases = exchange([], [])["leases"]
        assert len(leases) == 1, leases
        first = (leases[0]["job_id"], leases[0]["attempt"])
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(REFUSE_CLAIMS)
        # its reports and a claim of the other job (queued) in one call: the claim fails
        reports = ran(first)
        answer = exchange(reports, [first])
        assert sorted(map(tuple, answer["acked"])) == [(first[0], first[1], r["seq"]) for r in reports]
        assert answer["leases"] == [] and answer["refused"] == [] and answer["kill"] == []
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("DROP TRIGGER refuse_claims ON jobs")
        # the other job is still queued: the next call claims it, and it runs
        deadline = time.monotonic() + 30
        while not (leases := exchange([], [])["leases"]) and time.monotonic() < deadline:
            pass
        assert len(leases) == 1 and leases[0]["job_id"] != first[0], leases
        second = (leases[0]["job_id"], leases[0]["attempt"])
        assert exchange(ran(second), [second])["refused"] == []
        jobs = api.wait_terminal(project_id, task_id, 2, timeout=60)
        assert Counter(j["status"] for j in jobs) == {"SUCCEEDED": 2}
    finally:
        srv.stop()
