"""Several `htc server` processes on one PostgreSQL (cluster mode), with real processes.

* a token minted by one server is accepted by the other (keys shared through the database);
* exactly one server leads (runs the scheduler, lease expiry, retention) and another takes over
  within seconds when the leader is killed (``kill -9``): jobs held for the scheduler still all
  finish, none lost, none run twice;
* jobs submitted alternately through two servers, each with its embedded executor, each run
  exactly once (claims use ``FOR UPDATE SKIP LOCKED``), counted from a file per execution;
* PostgreSQL stopped for 6 s during a run: the API answers 503 meanwhile, the servers recover
  without a restart, a leader is elected again, no job is lost or run twice;
* SQLite refuses a second server on the same database file, even from another data directory.

Executions are counted from files the jobs make (``mktemp``, named by job and attempt), never
from statuses. Every wait is bounded; nothing asserts how long something took.
"""

from __future__ import annotations

import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from openhtc.testing.postgres import PostgresCluster, running_cluster
from openhtc.testing.server import HtcApi, HtcServer, htc_command

# one file per execution: <job>.<attempt>.<random>
COMMAND = 'mktemp "{runs}/$RESCALE_JOB_ID.$AWS_BATCH_JOB_ATTEMPT.XXXXXX"; sleep {sleep}'
ENV = {"OPENHTC_EXECUTOR_VCPUS": "4", "OPENHTC_MAX_INFRASTRUCTURE_RETRIES": "0"}
TAKEOVER_WAIT = 20.0  # bound on waiting for a new leader (it takes about a second)


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[list[HtcServer]]:
    started: list[HtcServer] = []
    yield started
    for srv in started:
        srv.stop()


OVERVIEW = "/openhtc/v1/overview"


def start(
    started: list[HtcServer],
    tmp: Path,
    db_url: str,
    *,
    executor: bool = True,
    env: dict[str, str] | None = None,
) -> HtcServer:
    """Another server on ``db_url``; servers after the first share its admin API key."""
    data_dir = tmp / f"server{len(started)}"
    data_dir.mkdir()
    if started:  # only the first server on a database creates the admin key (in its data dir)
        (data_dir / "admin-api-key").write_text(started[0].api_key + "\n")
    args = () if executor else ("--no-executor",)
    srv = HtcServer(data_dir, db_url, env={**ENV, **(env or {})}, args=args)
    started.append(srv)
    return srv.start()


def health(srv: HtcServer) -> dict[str, object]:
    try:
        resp = httpx.get(f"{srv.url}/health", timeout=5)
    except httpx.HTTPError:
        return {}
    return dict(resp.json()) if resp.status_code == 200 else {}


def leaders(servers: list[HtcServer]) -> list[HtcServer]:
    return [srv for srv in servers if srv.alive and health(srv).get("leader") is True]


def wait_one_leader(servers: list[HtcServer], timeout: float = TAKEOVER_WAIT) -> HtcServer:
    deadline = time.monotonic() + timeout
    while True:
        found = leaders(servers)
        if len(found) == 1:
            return found[0]
        if time.monotonic() > deadline:
            pytest.fail(f"{len(found)} leaders after {timeout:.0f} s (expected exactly one)")
        time.sleep(0.1)


def executions(runs: Path) -> Counter[str]:
    out: Counter[str] = Counter()
    for p in runs.iterdir():
        out[p.name.rsplit(".", 2)[0]] += 1
    return out


def wait_executed(runs: Path, count: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while sum(executions(runs).values()) < count:
        if time.monotonic() > deadline:
            pytest.fail(f"only {sum(executions(runs).values())} of {count} executions after {timeout:.0f} s")
        time.sleep(0.02)


def check_each_ran_once(
    api: HtcApi, pid: str, tid: str, runs: Path, expected: int, timeout: float = 120
) -> None:
    jobs = api.wait_terminal(pid, tid, expected, timeout=timeout)
    ran = executions(runs)
    statuses = Counter(j["status"] for j in jobs)
    assert statuses == {"SUCCEEDED": expected}, statuses
    not_once = {j["jobUUID"]: ran[j["jobUUID"]] for j in jobs if ran[j["jobUUID"]] != 1}
    assert not not_once, f"{len(not_once)} jobs did not run exactly once: {sorted(not_once.items())[:5]}"
    assert sum(ran.values()) == expected, f"{sum(ran.values())} executions of {expected} jobs"


def claimed_jobs(srv: HtcServer) -> float:
    """Jobs the server's embedded executor claimed, from its metrics."""
    text = srv.client().get("/htc/metrics").text
    for line in text.splitlines():
        if line.startswith("openhtc_executor_claimed_jobs_total "):
            return float(line.split()[1])
    raise AssertionError("no openhtc_executor_claimed_jobs_total in /htc/metrics")


def limited_project(api: HtcApi, vcpus: int) -> tuple[str, str]:
    """A project whose jobs wait for the scheduler: at most ``vcpus`` of them admitted at a time."""
    pid, tid = api.project_and_task()
    api.post(f"/htc/projects/{pid}/limits", {"vCPUs": vcpus, "modifierRole": "PROJECT_ADMIN"}, expect=201)
    return pid, tid


# ------------------------------------------------------------------------------------------------


def test_a_token_minted_by_one_server_works_on_another(
    pg_cluster: PostgresCluster, servers: list[HtcServer], tmp_path: Path
) -> None:
    url = pg_cluster.new_database()
    a = start(servers, tmp_path, url, executor=False)
    b = start(servers, tmp_path, url, executor=False)
    assert wait_one_leader(servers) is a  # the first to start leads; the other follows
    for minted_by, used_on in ((a, b), (b, a)):
        client = used_on.client(minted_by.token())
        resp = client.get("/htc/projects")
        assert resp.status_code == 200, resp.text
    # a project made through one server is seen through the other, with the other's token
    pid, _ = a.api().project_and_task()
    assert b.api(a.token()).get(f"/htc/projects/{pid}")["projectId"] == pid
    # one registry serves both: `htc admin registry-config` names the same certificate through either
    certs = []
    for srv in (a, b):
        out = srv.cli("admin", "registry-config", "--cert-out", str(srv.data_dir / "trust.crt")).stdout
        assert "realm: http://" in out and "/api/v1/htc/registry/token" in out, out
        assert f"rootcertbundle: {srv.data_dir / 'trust.crt'}" in out, out
        certs.append((srv.data_dir / "trust.crt").read_text())
    assert certs[0] == certs[1] and "BEGIN CERTIFICATE" in certs[0]


def test_sqlite_refuses_a_second_server_on_one_database_file(
    servers: list[HtcServer], tmp_path: Path
) -> None:
    db_file = tmp_path / "shared.db"
    first = HtcServer(tmp_path / "one", f"sqlite:///{db_file}")
    servers.append(first)
    first.start()
    second_dir = tmp_path / "two"
    cmd = [
        *htc_command(), "server", "--data-dir", str(second_dir), "--host", "127.0.0.1", "--port", "0",
        "--runtime", "process", "--database-url", f"sqlite:///{db_file}",
    ]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=first.environment())
    assert result.returncode != 0
    assert "SQLite allows one server" in result.stderr, result.stderr
    assert health(first).get("status") == "ok"  # the first one is untouched


def test_claims_through_two_servers_hand_each_job_to_one_executor(
    pg_cluster: PostgresCluster, servers: list[HtcServer], tmp_path: Path
) -> None:
    """300 short jobs submitted alternately through two servers, each with its embedded executor."""
    runs = tmp_path / "runs"
    runs.mkdir()
    url = pg_cluster.new_database()
    a = start(servers, tmp_path, url)
    b = start(servers, tmp_path, url)
    apis = [a.api(), b.api()]
    pid, tid = apis[0].project_and_task()
    request = apis[0].job_request(
        ["sh", "-c", COMMAND.format(runs=runs, sleep=0)], batch_size=15, max_retries=0
    )
    for i in range(20):
        apis[i % 2].submit(pid, tid, request)
    check_each_ran_once(apis[1], pid, tid, runs, 300)
    # both executors took part (each offers 4 vCPUs and claims as soon as jobs are queued)
    assert claimed_jobs(a) > 0 and claimed_jobs(b) > 0, (claimed_jobs(a), claimed_jobs(b))
    # one host, two servers: two executors (one id would let a restart of either recover the
    # other's running jobs, and either's heartbeat renew the other's leases)
    online = [e["id"] for e in apis[0].get(OVERVIEW)["executors"] if e["online"]]
    assert len(set(online)) == 2, online


def test_killing_the_leader_hands_the_scheduler_to_another_server(
    pg_cluster: PostgresCluster, servers: list[HtcServer], tmp_path: Path
) -> None:
    """The leader (API and scheduler only) gets kill -9 while jobs wait for its admissions."""
    runs = tmp_path / "runs"
    runs.mkdir()
    url = pg_cluster.new_database()
    leader = start(servers, tmp_path, url, executor=False)
    follower = start(servers, tmp_path, url)  # runs the jobs
    assert wait_one_leader(servers) is leader
    api = follower.api()
    pid, tid = limited_project(api, 2)  # two jobs admitted at a time: the rest wait for rounds
    request = api.job_request(
        ["sh", "-c", COMMAND.format(runs=runs, sleep=0.2)], batch_size=30, max_retries=0
    )
    api.submit(pid, tid, request)
    wait_executed(runs, 6)
    leader.kill9()
    assert wait_one_leader(servers) is follower
    check_each_ran_once(api, pid, tid, runs, 30)


def test_a_wait_on_one_server_is_told_of_a_job_run_through_another(
    pg_cluster: PostgresCluster, servers: list[HtcServer], tmp_path: Path
) -> None:
    """A long poll on the leader (no executor) answers when the follower's executor ends the job:
    the change reaches it through LISTEN/NOTIFY (without it the poll answers at its timeout)."""
    url = pg_cluster.new_database()
    a = start(servers, tmp_path, url, executor=False)
    b = start(servers, tmp_path, url)
    api_a = a.api(prefix="")
    pid, tid = a.api().project_and_task()
    job = a.api().submit_one(pid, tid, a.api().job_request(["sleep", "1"]))["parentJobId"] + ":0"
    body = api_a.get(f"/openhtc/v1/projects/{pid}/tasks/{tid}/jobs/{job}/wait", timeout=60)
    assert body["status"] == "SUCCEEDED", body
    assert b.api().job(pid, tid, job)["status"] == "SUCCEEDED"


OUTAGE = 6.0  # seconds PostgreSQL stays down
# leases shorter than the outage: every lease has run out when the database is back, and the
# leader must let the executors renew them before it takes their jobs for lost (renewed every
# 0.5 s, a lease outlasts 3.5 s of a busy machine's delays before the outage)
SHORT_LEASES = {"OPENHTC_LEASE_SECONDS": "4", "OPENHTC_HEARTBEAT_SECONDS": "0.5"}


def test_servers_recover_from_a_postgresql_outage_without_a_restart(
    servers: list[HtcServer], tmp_path: Path
) -> None:
    """PostgreSQL stops for 6 s, longer than the leases, while jobs run and wait for the
    scheduler, then starts again."""
    runs = tmp_path / "runs"
    runs.mkdir()
    with running_cluster() as cluster:  # its own cluster: the session's stays up for other tests
        url = cluster.new_database()
        leader = start(servers, tmp_path, url, executor=False, env=SHORT_LEASES)
        follower = start(servers, tmp_path, url, env=SHORT_LEASES)
        assert wait_one_leader(servers) is leader
        api = follower.api()
        pid, tid = limited_project(api, 2)
        command = COMMAND.format(runs=runs, sleep=0.3)
        api.submit(pid, tid, api.job_request(["sh", "-c", command], batch_size=20, max_retries=0))
        clients = {srv.url: srv.client() for srv in servers}  # tokens minted while the database is up
        wait_executed(runs, 4)
        cluster.pause()
        down_since = time.monotonic()
        answers: dict[str, set[int]] = {srv.url: set() for srv in servers}
        while time.monotonic() - down_since < OUTAGE:
            for where, client in clients.items():
                answers[where].add(client.get("/htc/projects", timeout=10).status_code)
            time.sleep(0.5)
        cluster.resume()
        # while it was down every server answered 503 (Unavailable), never 500
        assert all(codes == {503} for codes in answers.values()), answers
        # the leader noticed it had lost its lock's session and stepped down, then one led again
        assert "stepped down" in leader.log_path.read_text()
        wait_one_leader(servers)
        check_each_ran_once(api, pid, tid, runs, 20)
        assert all(srv.alive for srv in servers)
        for srv in servers:  # before their database goes
            srv.stop()


def test_servers_started_together_on_a_new_database_make_one_installation(
    pg_cluster: PostgresCluster, servers: list[HtcServer], tmp_path: Path
) -> None:
    """Migrations, the shared keys and the first workspace are each made once, under locks."""
    import psycopg

    url = pg_cluster.new_database()
    pair = [HtcServer(tmp_path / f"together{i}", url, env=ENV, args=("--no-executor",)) for i in range(2)]
    for srv in pair:
        srv.data_dir.mkdir()
        servers.append(srv)
        srv._spawn()  # both start before either answers
    for srv in pair:
        assert srv._wait_healthy() is None, srv.log_tail()
    keys = [srv.data_dir / "admin-api-key" for srv in pair if (srv.data_dir / "admin-api-key").exists()]
    assert len(keys) == 1, "exactly one server creates the installation and its admin key"
    with psycopg.connect(url) as conn:
        workspaces = conn.execute("SELECT count(*) FROM workspaces").fetchone()
        secrets = conn.execute("SELECT count(*) FROM shared_secrets").fetchone()
    assert workspaces == (1,) and secrets == (2,), (workspaces, secrets)
    for srv in pair:
        srv.api_key = keys[0].read_text().strip()
    assert pair[1].client(pair[0].token()).get("/htc/projects").status_code == 200


def test_the_signing_key_can_come_from_a_file_every_server_reads(tmp_path: Path) -> None:
    """OPENHTC_SIGNING_KEY_FILE: servers reading one file sign alike, whatever their data dirs."""
    from openhtc.testing.inprocess import in_process_services

    key_file = tmp_path / "shared" / "jwt.pem"
    with (
        in_process_services(tmp_path / "one", None, signing_key_file=key_file) as one,
        in_process_services(tmp_path / "two", None, signing_key_file=key_file) as two,
    ):
        assert key_file.exists() and not (tmp_path / "one" / "keys" / "jwt-signing.pem").exists()
        assert one.tokens.key.kid == two.tokens.key.kid


def test_a_database_url_that_names_its_application_still_elects_a_leader(pg_cluster: PostgresCluster) -> None:
    """Connection options in the URL's query (here application_name, which the leader lock sets
    too) must not stop the lock from connecting: no server would ever lead, silently."""
    from openhtc.store.leader_lock import PgLeaderLock

    url = pg_cluster.new_database()
    lock = PgLeaderLock(url + ("&" if "?" in url else "?") + "application_name=mine")
    try:
        assert lock.hold() is True
    finally:
        lock.release()
