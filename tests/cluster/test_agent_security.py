"""The agent protocol's review findings (issue 16), each against a real server over HTTP.

What a user would notice: one agent's token cannot act for another agent (register as it,
report its jobs, write its logs); a lease whose answer was lost goes back to the queue at
once; a lost or draining agent gets no job; a log chunk the server cannot write is kept by the
agent and sent again.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from tests.cluster.test_agent import AgentProcess
from tests.cluster.test_agent_protocol import AGENTS, Agent, agent_token, claim, submit
from tests.cluster.test_multiserver import start

from openhtc.auth.keys import load_or_create_signing_key
from openhtc.auth.tokens import TokenService
from openhtc.domain.clock import Clock
from openhtc.domain.enums import JobStatus
from openhtc.testing.ci import skip_or_fail
from openhtc.testing.postgres import PostgresCluster
from openhtc.testing.procstats import alive
from openhtc.testing.proxy import DROP, PASS, FaultyProxy
from openhtc.testing.server import HtcServer, htc_command


@pytest.fixture
def srv(start_server: Callable[..., HtcServer]) -> HtcServer:
    """A server whose agents stay live through a slow test (minting a token takes seconds)."""
    return start_server(
        args=("--no-executor",),
        env={"OPENHTC_AGENT_LIVENESS_SECONDS": "120", "OPENHTC_MAX_INFRASTRUCTURE_RETRIES": "1"},
    )


@pytest.fixture
def servers() -> Iterator[list[HtcServer]]:
    """Servers on one PostgreSQL (tests.cluster.test_multiserver.start), stopped at the end."""
    started: list[HtcServer] = []
    yield started
    for one in started:
        one.stop()


# The quick server's liveness, and a long poll that outlasts it by 4 liveness timeouts and more:
# short, since the test waits for the poll to run out.
QUICK_LIVENESS = 2.0
LONG_POLL = QUICK_LIVENESS * 6


@pytest.fixture
def quick(start_server: Callable[..., HtcServer]) -> HtcServer:
    """A server that marks an agent lost after QUICK_LIVENESS seconds of silence."""
    return start_server(
        args=("--no-executor",),
        env={
            "OPENHTC_AGENT_LIVENESS_SECONDS": str(QUICK_LIVENESS),
            "OPENHTC_AGENT_POLL_SECONDS": str(LONG_POLL),
            "OPENHTC_MAX_INFRASTRUCTURE_RETRIES": "1",
        },
    )


def post_logs(agent: Agent, chunks: list[dict[str, Any]]) -> httpx.Response:
    return agent.http.post(
        f"{AGENTS}/{agent.agent_id}/logs", json={"incarnation": agent.incarnation, "chunks": chunks}
    )


def impostor(srv: HtcServer, token: str, victim: Agent) -> Agent:
    """A caller with its own token that claims to be ``victim``."""
    fake = Agent(srv, token, "impostor")
    fake.agent_id, fake.incarnation = victim.agent_id, victim.incarnation
    return fake


def test_an_agent_token_speaks_only_for_the_agent_that_registered_with_it(srv: HtcServer) -> None:
    api = srv.api()
    owner = Agent(srv, agent_token(srv), "owner")
    owner.register()
    project_id, task_id = submit(api)
    (lease,) = claim(owner, 1)
    key = (lease["job_id"], lease["attempt"])
    owner.exchange(held=[key], reports=[owner.report(*key, JobStatus.STARTING)])
    job_uuid = api.jobs(project_id, task_id)[0]["jobUUID"]
    events = api.events(project_id, task_id, job_uuid)

    # the owner's token is taken: a second agent id cannot register with it
    second = Agent(srv, owner.http.headers["Authorization"].split()[1], "second")
    resp = second.http.post(f"{AGENTS}/register", json=_register_body(second))
    assert resp.status_code == 403 and owner.agent_id in resp.text, resp.text

    # another token cannot register as the owner, report its job or write its log
    other_token = agent_token(srv)
    fake = impostor(srv, other_token, owner)
    resp = fake.http.post(f"{AGENTS}/register", json=_register_body(fake))
    assert resp.status_code == 403, resp.text
    done = fake.report(*key, JobStatus.SUCCEEDED, exit_code=0)
    done["seq"] = 5
    resp = fake.http.post(f"{AGENTS}/{owner.agent_id}/exchange", json=_exchange_body(fake, [key], [done]))
    assert resp.status_code == 403 and "another agent token" in resp.text, resp.text
    chunk = {"job_id": key[0], "attempt": key[1], "offset": 0, "data": f"{time.time()}\tforged line\n"}
    assert post_logs(fake, [chunk]).status_code == 403
    # nothing was written: the job still runs as the owner reported it, without a line of log
    assert api.jobs(project_id, task_id)[0]["status"] == "STARTING"
    assert api.events(project_id, task_id, job_uuid) == events
    assert api.log_lines(project_id, task_id, job_uuid) == []

    # an agent of its own token may not write the log of a job it does not hold either
    neighbour = Agent(srv, other_token, "neighbour")
    neighbour.register()
    resp = post_logs(neighbour, [chunk])
    assert resp.status_code == 409, resp.text
    assert resp.json() == {"error": "not this agent's attempt", "refused": [list(key)]}
    assert api.log_lines(project_id, task_id, job_uuid) == []
    # the owner's own lines go in
    assert post_logs(owner, [chunk]).status_code == 200
    assert api.log_lines(project_id, task_id, job_uuid) == ["forged line"]


def test_a_fleet_token_serves_as_many_live_agents_as_it_was_minted_for(srv: HtcServer) -> None:
    token = agent_token(srv, agents=2)
    first, second, third = (Agent(srv, token, f"fleet{i}") for i in range(3))
    first.register()
    second.register()
    third.register(expect=403)
    # an agent restarting with its id keeps its slot
    first.incarnation = uuid.uuid4().hex
    first.register()


def test_a_token_minted_before_binding_still_serves_its_whole_fleet(
    start_server: Callable[..., HtcServer], tmp_path: Path
) -> None:
    # One token in one Kubernetes Secret for every pod, minted by a version without the
    # ``agents`` claim: after the upgrade it must not shrink the fleet to one agent.
    key_file = tmp_path / "jwt-signing.pem"
    srv = start_server(args=("--no-executor",), env={"OPENHTC_SIGNING_KEY_FILE": str(key_file)})
    tokens = TokenService(load_or_create_signing_key(key_file), Clock(), 3600, 3600)
    claims = jwt.decode(tokens.agent("fleet", "*", 3600), options={"verify_signature": False})
    del claims["agents"]
    old_token = tokens._encode(claims)
    pods = [Agent(srv, old_token, f"pod{i}") for i in range(3)]
    for pod in pods:
        pod.register()
    assert pods[2].exchange()["kill"] == []
    # each pod is still bound to the token: another token does not speak for it
    other = impostor(srv, agent_token(srv), pods[0])
    other.exchange(expect=403)


def _register_body(agent: Agent) -> dict[str, Any]:
    return {
        "agent_id": agent.agent_id,
        "incarnation": agent.incarnation,
        "region": "AWS_US_EAST_1",
        "architectures": ["X86"],
        "capacity": {"vcpus": 4, "memory_mb": 8192},
    }


def _exchange_body(
    agent: Agent, held: list[tuple[int, int]], reports: list[dict[str, Any]]
) -> dict[str, Any]:
    return {
        "incarnation": agent.incarnation,
        "free": {"vcpus": 4, "memory_mb": 8192},
        "max_jobs": 0,
        "held": [list(k) for k in held],
        "reports": reports,
    }


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.1)


@pytest.mark.one_db  # the agent's side and the log files: not about the store
def test_a_second_agent_on_a_work_directory_in_use_exits_naming_the_first(
    srv: HtcServer, tmp_path: Path
) -> None:
    first = AgentProcess(srv, tmp_path / "work")
    second: AgentProcess | None = None
    try:
        wait_until(lambda: (tmp_path / "work" / "agent" / "id").exists(), "the first agent to start")
        agent_id = (tmp_path / "work" / "agent" / "id").read_text().strip()
        second = AgentProcess(srv, tmp_path / "work")
        assert second.proc.wait(timeout=60) == 2
        assert f"pid {first.proc.pid}" in second.log(), second.log()
        assert first.proc.poll() is None  # the first runs on
        # another work directory on this host is another agent, with an id of its own
        other = AgentProcess(srv, tmp_path / "other")
        try:
            wait_until(lambda: (tmp_path / "other" / "agent" / "id").exists(), "the other agent to start")
            assert (tmp_path / "other" / "agent" / "id").read_text().strip() != agent_id
        finally:
            other.stop()
    finally:
        first.stop()
        if second is not None:
            second.stop()
    # the id is kept: a restart is the same agent
    again = AgentProcess(srv, tmp_path / "work", first.token)
    try:
        wait_until(lambda: agent_id in again.log(), "the restarted agent to say its id")
    finally:
        again.stop()


def start_agent(
    srv: HtcServer, url: str, work_dir: Path, *extra: str
) -> tuple[subprocess.Popen[bytes], Path]:
    """A real ``htc agent`` (process runtime) that reaches the server at ``url``."""
    token = agent_token(srv)
    work_dir.mkdir(parents=True, exist_ok=True)
    log_path = work_dir / "agent.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENHTC_")}
    env.update({"OPENHTC_AGENT_TOKEN": token, "OPENHTC_AGENT_SERVER": url})
    cmd = [
        *htc_command(),
        "agent",
        "--runtime",
        "process",
        "--vcpus",
        "2",
        "--work-dir",
        str(work_dir),
        *extra,
    ]
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    return proc, log_path


def stop_agent(proc: subprocess.Popen[bytes], log_path: Path) -> None:
    if proc.poll() is None:
        proc.terminate()
        proc.terminate()  # the second kills what still runs
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    print(log_path.read_text(errors="replace")[-4000:])


def test_a_lease_whose_answer_was_lost_runs_once_soon(
    start_server: Callable[..., HtcServer], tmp_path: Path
) -> None:
    # a liveness far longer than the test: only the reconciliation can give the lease back
    srv = start_server(
        args=("--no-executor",),
        env={"OPENHTC_AGENT_LIVENESS_SECONDS": "600", "OPENHTC_MAX_INFRASTRUCTURE_RETRIES": "0"},
    )
    proxy = FaultyProxy(srv.url)
    dropped: list[str] = []

    def lose_first_lease(path: str, status: int, body: bytes) -> str:
        if not dropped and path.endswith("/exchange") and status == 200 and json.loads(body)["leases"]:
            dropped.append(path)
            return DROP
        return PASS

    proxy.hook = lose_first_lease
    marker = tmp_path / "runs"
    proc, log_path = start_agent(srv, proxy.url, tmp_path / "agent")
    try:
        api = srv.api()
        project_id, task_id = api.project_and_task()
        api.submit(project_id, task_id, api.job_request(["sh", "-c", f"echo run >> {marker}"], max_retries=0))
        (job,) = api.wait_terminal(project_id, task_id, 1, timeout=120)
        assert dropped, "no answer carried a lease"
        assert job["status"] == "SUCCEEDED", job
        assert marker.read_text().splitlines() == ["run"]
        reasons = [e.get("statusReason") or "" for e in api.events(project_id, task_id, job["jobUUID"])]
        assert any("never received its lease" in r for r in reasons), reasons
    finally:
        stop_agent(proc, log_path)
        proxy.close()
    log = srv.log_path.read_text(errors="replace")  # the release neither failed nor answered 500
    assert "Traceback" not in log and '" 500' not in log, log[-4000:]


def test_a_long_poll_claims_nothing_for_an_agent_marked_lost_meanwhile(quick: HtcServer) -> None:
    api = quick.api()
    token = agent_token(quick, agents=2)
    sleeper, other = Agent(quick, token, "sleeper"), Agent(quick, token, "other")
    sleeper.register()
    other.register()
    answers: list[dict[str, Any]] = []
    # the sleeper's long poll outlasts its liveness (poll 12 s, liveness 2 s): it is marked lost
    poll = threading.Thread(target=lambda: answers.append(sleeper.exchange(max_jobs=1, wait=LONG_POLL)))
    poll.start()
    deadline = time.monotonic() + QUICK_LIVENESS * 4
    while time.monotonic() < deadline:  # the other agent keeps calling: the server trusts itself
        other.exchange()
        time.sleep(0.3)
    assert poll.is_alive(), answers  # the job comes while the sleeper's long poll still waits
    project_id, task_id = submit(api)  # wakes the sleeper's long poll first
    leases: list[dict[str, Any]] = []
    wait_until(lambda: bool(leases.extend(other.exchange(max_jobs=1)["leases"]) or leases), "a lease")
    assert len(leases) == 1
    assert api.jobs(project_id, task_id)[0]["status"] == "RUNNABLE"
    key = (leases[0]["job_id"], leases[0]["attempt"])
    while poll.is_alive():  # the other agent holds its lease while the sleeper's poll runs out
        other.exchange(held=[key])
        poll.join(timeout=0.3)
    assert answers and answers[0]["leases"] == [], answers
    assert sleeper.exchange(expect=409) == {"error": "agent lost"}


def test_an_agent_that_alternates_servers_keeps_its_drain_and_its_reports_once(
    pg_cluster: PostgresCluster, servers: list[HtcServer], tmp_path: Path
) -> None:
    url = pg_cluster.new_database()
    env = {"OPENHTC_AGENT_LIVENESS_SECONDS": "120", "OPENHTC_AGENT_POLL_SECONDS": "30"}
    a = start(servers, tmp_path, url, executor=False, env=env)
    b = start(servers, tmp_path, url, executor=False, env=env)
    api = a.api()
    token = agent_token(a)
    via_a, via_b = Agent(a, token, "roamer"), Agent(b, token, "roamer")
    via_b.agent_id, via_b.incarnation, via_b.seq = via_a.agent_id, via_a.incarnation, via_a.seq
    via_a.register()
    # reports applied through one server and sent again through the other: applied once
    project_id, task_id = submit(api)
    (lease,) = claim(via_a, 1)
    key = (lease["job_id"], lease["attempt"])
    reports = [via_a.report(*key, s) for s in (JobStatus.STARTING, JobStatus.RUNNING)]
    reports.append(via_a.report(*key, JobStatus.SUCCEEDED, exit_code=0))
    assert len(via_a.exchange(held=[key], reports=reports)["acked"]) == 3
    job_uuid = api.jobs(project_id, task_id)[0]["jobUUID"]
    events = api.events(project_id, task_id, job_uuid)
    again = via_b.exchange(held=[key], reports=reports)
    assert sorted(map(tuple, again["acked"])) == [(*key, 1), (*key, 2), (*key, 3)], again
    assert api.events(project_id, task_id, job_uuid) == events
    assert api.jobs(project_id, task_id)[0]["status"] == "SUCCEEDED"
    # a long poll through A; the agent says it drains through B; a job comes: A gives it nothing
    answers: list[dict[str, Any]] = []
    poll = threading.Thread(target=lambda: answers.append(via_a.exchange(max_jobs=1, wait=10.0)))
    poll.start()
    time.sleep(0.5)  # the long poll reaches A and waits there
    body = {
        "incarnation": via_b.incarnation,
        "free": {"vcpus": 0, "memory_mb": 0},
        "max_jobs": 0,
        "draining": True,
    }
    assert via_b.http.post(f"{AGENTS}/{via_b.agent_id}/exchange", json=body).status_code == 200
    submit(api)
    poll.join(timeout=60)
    assert answers and answers[0]["leases"] == [], answers
    # nor does any later call of the draining agent, through either server
    assert via_a.exchange(max_jobs=1)["leases"] == []
    assert via_b.exchange(max_jobs=1)["leases"] == []


@pytest.mark.one_db  # the agent's side and the log files: not about the store
def test_an_agent_refused_past_its_liveness_kills_its_jobs_and_rejoins(
    start_server: Callable[..., HtcServer], tmp_path: Path
) -> None:
    srv = start_server(
        args=("--no-executor",),
        env={"OPENHTC_AGENT_LIVENESS_SECONDS": "4", "OPENHTC_MAX_INFRASTRUCTURE_RETRIES": "0"},
    )
    proxy = FaultyProxy(srv.url)
    pid_file = tmp_path / "pid"
    proc, log_path = start_agent(srv, proxy.url, tmp_path / "agent")
    try:
        api = srv.api()
        project_id, task_id = api.project_and_task()
        api.submit(
            project_id, task_id, api.job_request(["sh", "-c", f"echo $$ > {pid_file}; exec sleep 600"])
        )
        wait_until(lambda: pid_file.exists() and pid_file.read_text().strip() != "", "the job to start", 60)
        pid = int(pid_file.read_text())
        assert alive(pid)
        proxy.cut = 403  # every call of the agent is refused from now on
        wait_until(lambda: not alive(pid), "the agent to kill its job", 60)
        text = log_path.read_text(errors="replace")
        assert text.count("refuses this agent's token (HTTP 403") == 1, text[-3000:]
        proxy.cut = None  # the agent registers again and takes new work
        api.submit(project_id, task_id, api.job_request(["true"]))
        jobs = api.wait_terminal(project_id, task_id, 2, timeout=120)
        assert sorted(j["status"] for j in jobs) == ["FAILED", "SUCCEEDED"], jobs
    finally:
        stop_agent(proc, log_path)
        proxy.close()


@pytest.mark.one_db  # the agent's side and the log files: not about the store
def test_a_log_chunk_the_server_cannot_write_is_kept_by_the_agent_and_sent_again(
    start_server: Callable[..., HtcServer], tmp_path: Path
) -> None:
    srv = start_server(args=("--no-executor",), env={"OPENHTC_AGENT_LIVENESS_SECONDS": "120"})
    proxy = FaultyProxy(srv.url)
    answers: list[tuple[str, int, bytes]] = []

    def record(path: str, status: int, body: bytes) -> str:
        if path.endswith("/logs"):
            answers.append((path, status, body))
        return PASS

    proxy.hook = record
    api = srv.api()
    project_id, task_id = api.project_and_task()
    submitted = api.submit_one(project_id, task_id, api.job_request(["echo", "kept line"]))
    parent = submitted["parentJobId"]
    # where the job's log goes is a file, not a directory: every write fails (an OSError)
    blocker = srv.data_dir / "logs" / task_id / parent
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_text("in the way")
    proc, log_path = start_agent(srv, proxy.url, tmp_path / "agent")
    try:
        (done,) = api.wait_terminal(project_id, task_id, 1, timeout=120)
        assert done["status"] == "SUCCEEDED", done
        wait_until(lambda: any(status != 200 for _, status, _ in answers), "a refused log chunk")
        status, body = next((s, json.loads(b)) for _, s, b in answers if s != 200)
        assert status == 503 and body["error"] == "SERVICE_UNAVAILABLE", (status, body)
        blocker.unlink()  # the disk works again: the agent's next try writes the line
        wait_until(lambda: api.log_lines(project_id, task_id, done["jobUUID"]) == ["kept line"], "the log")
    finally:
        stop_agent(proc, log_path)
        proxy.close()


@pytest.mark.one_db  # the agent's side and the log files: not about the store
def test_a_log_chunk_on_a_full_disk_answers_507_and_writes_nothing(srv: HtcServer, tmp_path: Path) -> None:
    if os.geteuid() != 0:
        skip_or_fail("mounting a small tmpfs needs root; CI runs as root")
    api = srv.api()
    agent = Agent(srv, agent_token(srv), "full")
    agent.register()
    _, task_id = submit(api)
    (lease,) = claim(agent, 1)
    key = (lease["job_id"], lease["attempt"])
    # the task's log directory is a full 64 KiB file system
    where = srv.data_dir / "logs" / task_id
    where.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(where)], check=True)
    try:
        subprocess.run(
            ["dd", "if=/dev/zero", f"of={where}/filler", "bs=4k"], capture_output=True, check=False
        )
        line = f"{time.time()}\tno room\n" * 200
        resp = post_logs(agent, [{"job_id": key[0], "attempt": key[1], "offset": 0, "data": line}])
        assert resp.status_code == 507, resp.text
        assert resp.json()["error"] == "INSUFFICIENT_STORAGE"
        (where / "filler").unlink()  # room again: the same chunk goes in
        resp = post_logs(agent, [{"job_id": key[0], "attempt": key[1], "offset": 0, "data": line}])
        assert resp.status_code == 200, resp.text
        assert resp.json()["acked"] == [[*key, len(line.encode())]]
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.mark.one_db  # tokens only
def test_two_agent_tokens_minted_in_one_second_are_two_tokens(tmp_path: Path) -> None:
    """An agent is bound to the hash of the token it registered with: two tokens minted for
    two agents in the same second must differ, or each could speak for the other's agent."""
    tokens = TokenService(load_or_create_signing_key(tmp_path / "key.pem"), Clock(), 3600, 3600)
    minted = {tokens.agent("agents", "*", 3600) for _ in range(20)}
    assert len(minted) == 20
