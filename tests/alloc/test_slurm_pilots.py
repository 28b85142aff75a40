"""Allocation queues against a real Slurm (private munged + slurmctld + slurmd, conftest.py).

The server runs no embedded executor: jobs run only on pilots' agents (``htc agent`` started by
the sbatch scripts the queue submits). Each test runs once, on PostgreSQL (conftest.py: pg_server).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from openhtc.testing.server import DEFAULT_REGION, HtcServer, htc_command
from openhtc.testing.slurm import PrivateSlurm

pytestmark = pytest.mark.timeout(240)


def _server(pg_server: Callable[..., HtcServer], slurm: PrivateSlurm, **env: str) -> HtcServer:
    return pg_server(
        env={
            **slurm.env,
            "OPENHTC_ALLOC_PERIOD_SECONDS": "0.3",
            "OPENHTC_ALLOC_AGENT_COMMAND": " ".join(htc_command()),
            "OPENHTC_MAX_INFRASTRUCTURE_RETRIES": "0",
            **env,
        },
        args=("--no-executor",),
    )


def _alloc(srv: HtcServer, *args: str, check: bool = True) -> Any:
    """``htc alloc ARGS`` against the server, with its admin key (env: the private Slurm's)."""
    import subprocess

    cmd = [*htc_command(), "alloc", *args]
    env = {**srv.environment(), "OPENHTC_URL": srv.url, "OPENHTC_API_KEY": srv.api_key}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60, check=False)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} -> {done.returncode}\n{done.stdout}\n{done.stderr}")
    return done


def _queues(srv: HtcServer) -> list[dict[str, Any]]:
    return list(json.loads(_alloc(srv, "ls", "--json").stdout))


def _wait(what: str, check: Callable[[], Any], timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.2)


def test_a_broken_sbatch_argument_is_refused_at_add_and_pauses_the_queue_with_its_reason(
    pg_server: Callable[..., HtcServer], slurm: PrivateSlurm
) -> None:
    srv = _server(pg_server, slurm)
    # the dry run (sbatch --test-only) refuses it: nothing is added
    done = _alloc(
        srv, "add", "slurm", "--region", DEFAULT_REGION, "--time-limit", "30m", "--", "--partition=nosuch",
        check=False,
    )  # fmt: skip
    assert done.returncode != 0
    assert "sbatch --test-only refused" in done.stderr and "partition" in done.stderr.lower(), done.stderr
    assert _queues(srv) == []

    # without the dry run it is added; its submissions fail until it pauses itself, saying why
    _alloc(
        srv, "add", "slurm", "--region", DEFAULT_REGION, "--time-limit", "30m", "--no-dry-run",
        "--", "--partition=nosuch",
    )  # fmt: skip
    api = srv.api()
    project_id, task_id = api.project_and_task()
    api.submit_one(project_id, task_id, api.job_request(["true"]))
    paused = _wait("the queue to pause", lambda: [q for q in _queues(srv) if q["state"] == "paused"])
    reason = paused[0]["pauseReason"]
    assert "10 submissions failed in a row" in reason and "partition" in reason.lower(), reason
    assert paused[0]["pilots"] == []
    assert not [j for j in slurm.squeue() if j[1].startswith("openhtc-")]
    shown = _alloc(srv, "ls").stdout
    assert "paused: 10 submissions failed" in " ".join(shown.split()), shown
    assert "paused" in srv.log_tail(200)


def _pilot_server(pg_server: Callable[..., HtcServer], slurm: PrivateSlurm, **env: str) -> HtcServer:
    """A server whose pilots run ``htc agent --runtime process`` (the agents' liveness: 3 s)."""
    return _server(
        pg_server,
        slurm,
        OPENHTC_ALLOC_AGENT_COMMAND=" ".join([*htc_command(), "agent", "--runtime", "process"]),
        OPENHTC_AGENT_LIVENESS_SECONDS="3",
        OPENHTC_AGENT_POLL_SECONDS="1",
        **env,
    )


def _our_pilots(slurm: PrivateSlurm) -> list[tuple[str, str, str]]:
    return [j for j in slurm.squeue() if j[1].startswith("openhtc-")]


class _Watch:
    """Looks at Slurm's queue (squeue: waiting, running, completing) every 0.1 s while the test
    runs: the most jobs of one allocation queue it saw there at once, and that listing. It may
    miss a short excess, never invent one: the server submits a pilot only after squeue showed
    the one it replaces ended, so any later look shows that one gone too."""

    def __init__(self, slurm: PrivateSlurm, queue_id: str) -> None:
        self.slurm, self.name = slurm, f"openhtc-{queue_id}"
        self.most: list[tuple[str, str, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> _Watch:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            now = [j for j in self.slurm.squeue() if j[1] == self.name]
            if len(now) > len(self.most):
                self.most = now


def test_pilots_appear_for_queued_jobs_run_them_and_leave_when_idle(
    pg_server: Callable[..., HtcServer], slurm: PrivateSlurm
) -> None:
    srv = _pilot_server(pg_server, slurm)
    _alloc(
        srv, "add", "slurm", "--region", DEFAULT_REGION, "--time-limit", "30m", "--max-pilots", "2",
        "--idle-timeout", "3s",
    )  # fmt: skip
    assert _our_pilots(slurm) == []  # nothing queued: no pilot

    api = srv.api()
    project_id, task_id = api.project_and_task()
    with _Watch(slurm, _queues(srv)[0]["id"]) as watch:
        api.submit_one(
            project_id,
            task_id,
            api.job_request(["sh", "-c", "echo ran $AWS_BATCH_JOB_ARRAY_INDEX"], batch_size=6),
        )
        jobs = api.wait_terminal(project_id, task_id, 6, timeout=120)
        assert {j["status"] for j in jobs} == {"SUCCEEDED"}, [
            (j["status"], j.get("statusReason")) for j in jobs
        ]

        (queue,) = _queues(srv)
        ran = [p for p in queue["pilots"] if p["agentId"]]
        assert ran and all(p["slurmJobId"].isdigit() for p in ran), queue["pilots"]

        # no work left: every pilot exits after its idle timeout and Slurm's queue is empty
        _wait("the pilots to leave squeue", lambda: _our_pilots(slurm) == [], timeout=60)
    (queue,) = _wait("every pilot to be ended", lambda: [q for q in _queues(srv) if all(
        p["state"] == "ended" for p in q["pilots"])])  # fmt: skip
    assert queue["state"] == "active" and queue["failedStarts"] == 0, queue
    assert any("idle" in (p["detail"] or "") for p in queue["pilots"]), queue["pilots"]
    assert 0 < len(watch.most) <= 2, watch.most  # never more than --max-pilots in Slurm at once


def test_scancel_of_a_busy_pilot_recovers_its_jobs_none_lost_none_run_twice_at_once(
    pg_server: Callable[..., HtcServer], slurm: PrivateSlurm, tmp_path: Path
) -> None:
    srv = _pilot_server(pg_server, slurm, OPENHTC_MAX_INFRASTRUCTURE_RETRIES="3")
    _alloc(
        srv, "add", "slurm", "--region", DEFAULT_REGION, "--time-limit", "30m", "--max-pilots", "1",
        "--pilot-vcpus", "2", "--idle-timeout", "3s",
    )  # fmt: skip
    shared = tmp_path / "runs"
    shared.mkdir()
    shared.chmod(0o777)
    # each run appends a line; a run while another of the same job still holds its lock fails
    script = f"exec flock -n {shared}/lock-$I sh -c 'echo run >> {shared}/runs-$I; sleep 6'"
    api = srv.api()
    project_id, task_id = api.project_and_task()
    api.submit_one(
        project_id,
        task_id,
        api.job_request(["sh", "-c", f"export I=$AWS_BATCH_JOB_ARRAY_INDEX; {script}"], batch_size=2),
    )
    api.wait_jobs(project_id, task_id, lambda js: all(j["status"] == "RUNNING" for j in js), timeout=90,
                  what="both jobs to run on the pilot")  # fmt: skip
    (pilot,) = _our_pilots(slurm)
    slurm.cmd("scancel", pilot[0])  # the node is lost: Slurm kills the agent and its jobs

    jobs = api.wait_terminal(project_id, task_id, 2, timeout=150)
    assert [j["status"] for j in jobs] == ["SUCCEEDED"] * 2, [
        (j["status"], j.get("statusReason")) for j in jobs
    ]
    for index in (0, 1):  # each ran again on a fresh pilot: twice in all, never at once (flock)
        assert (shared / f"runs-{index}").read_text().split() == ["run", "run"]
    (queue,) = _queues(srv)
    assert len(queue["pilots"]) >= 2 and queue["state"] == "active", queue


def test_a_job_longer_than_a_pilots_walltime_left_waits_for_a_fresh_pilot(
    pg_server: Callable[..., HtcServer], slurm: PrivateSlurm
) -> None:
    srv = _pilot_server(pg_server, slurm)
    # 4 min pilots drain 1 min before their end: a fresh one takes jobs of up to ~3 min
    _alloc(
        srv, "add", "slurm", "--region", DEFAULT_REGION, "--time-limit", "4m", "--max-pilots", "1",
        "--idle-timeout", "3s",
    )  # fmt: skip
    api = srv.api()
    project_id, task_id = api.project_and_task()
    short = api.job_request(["sleep", "20"], execTimeoutSeconds=60)
    api.submit_one(project_id, task_id, short, group="short")
    api.wait_terminal(project_id, task_id, 1, timeout=90)
    # 170 s fits a fresh pilot, not the first one now that its short job used ~20 s of it
    api.submit_one(project_id, task_id, api.job_request(["true"], execTimeoutSeconds=170), group="long")
    jobs = api.wait_terminal(project_id, task_id, 2, timeout=150)
    assert [j["status"] for j in jobs] == ["SUCCEEDED"] * 2, [
        (j["status"], j.get("statusReason")) for j in jobs
    ]
    agents = {j["group"]: j["jobExecutionEnvironment"]["instanceId"] for j in jobs}
    assert agents["short"] != agents["long"], agents
    pilots = {p["agentId"]: p for p in _queues(srv)[0]["pilots"]}
    assert agents["short"] in pilots and agents["long"] in pilots, (agents, pilots)


def test_a_pilot_asked_to_stop_counts_against_max_pilots_until_it_has_left(
    pg_server: Callable[..., HtcServer], slurm: PrivateSlurm
) -> None:
    """Work that arrives while the queue's only pilot drains after its idle timeout waits for a
    fresh pilot, submitted once the old one has left Slurm's queue: never two at once with
    --max-pilots 1 (the one leaving offers no capacity, but still holds its allocation)."""
    srv = _pilot_server(pg_server, slurm)
    _alloc(
        srv, "add", "slurm", "--region", DEFAULT_REGION, "--time-limit", "30m", "--max-pilots", "1",
        "--idle-timeout", "3s",
    )  # fmt: skip
    api = srv.api()
    project_id, task_id = api.project_and_task()
    queue_id = _queues(srv)[0]["id"]
    with _Watch(slurm, queue_id) as watch:
        api.submit_one(project_id, task_id, api.job_request(["true"]), group="first")
        api.wait_terminal(project_id, task_id, 1, timeout=120)
        # once its agent has stopped (it takes no job then), before its Slurm job has left
        logs = srv.data_dir / "pilots" / queue_id
        deadline = time.monotonic() + 60
        while not any("agent: stopped" in log.read_text() for log in logs.glob("pilot-*.log")):
            assert time.monotonic() < deadline, "the pilot's agent never stopped"
            time.sleep(0.05)
        api.submit_one(project_id, task_id, api.job_request(["true"]), group="second")
        jobs = api.wait_terminal(project_id, task_id, 2, timeout=120)
    assert [j["status"] for j in jobs] == ["SUCCEEDED"] * 2, [
        (j["status"], j.get("statusReason")) for j in jobs
    ]
    (queue,) = _queues(srv)
    assert len(queue["pilots"]) == 2, queue["pilots"]  # the second job ran on a fresh pilot
    assert len(watch.most) == 1, watch.most  # never two in Slurm at once


def test_a_pilot_whose_agent_never_calls_is_cancelled_as_a_failed_start(
    pg_server: Callable[..., HtcServer], slurm: PrivateSlurm
) -> None:
    """A pilot whose agent hangs before it calls the server (here a command that only sleeps)
    would hold its node until its walltime, and nothing idle-stops a pilot with no agent: the
    server cancels it ``alloc_start_timeout_seconds`` after it started, and three such failed
    starts in a row pause the queue, saying why."""
    srv = _server(
        pg_server,
        slurm,
        OPENHTC_ALLOC_AGENT_COMMAND="sh -c 'exec sleep 600' hung-agent",
        OPENHTC_ALLOC_START_TIMEOUT_SECONDS="2",
    )
    _alloc(
        srv, "add", "slurm", "--region", DEFAULT_REGION, "--time-limit", "30m", "--max-pilots", "1",
        "--idle-timeout", "3s",
    )  # fmt: skip
    queue_id = _queues(srv)[0]["id"]
    api = srv.api()
    project_id, task_id = api.project_and_task()
    api.submit_one(project_id, task_id, api.job_request(["true"]))
    (queue,) = _wait("the queue to pause", lambda: [q for q in _queues(srv) if q["state"] == "paused"], 150)
    reason = queue["pauseReason"]
    assert "3 pilots in a row ended before their agent called" in reason, reason
    assert "had not called the server 2 s after it started: cancelled" in reason, reason
    _wait(
        "its pilots to leave squeue", lambda: not [j for j in slurm.squeue() if j[1] == f"openhtc-{queue_id}"]
    )
