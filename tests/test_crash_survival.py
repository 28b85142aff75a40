"""A ``kill -9`` of the embedded server kills no running job (process runtime).

The job launchers outlive the server: its jobs keep running and writing their logs, and the
restarted server takes them back (not recovered: same attempt, no re-run) and reports their
real ends. Executions are counted with one marker file per attempt (``mktemp``).

* 100 jobs of 5 s, all running at once, when the server is killed and restarted: every one
  SUCCEEDED in its first attempt, executed exactly once, with its whole log (a line before and
  one after its sleep);
* jobs that end while no server runs are reported with their real exit code;
* jobs survive two crashes in a row;
* a launcher whose server never comes back kills its jobs after ``executor_adopt_seconds``
  and exits; the next start then recovers them as before (a re-run after an infrastructure
  fault), over a stale launcher socket left in the data directory.
"""

from __future__ import annotations

import os
import socket
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from openhtc.domain import lifecycle
from openhtc.domain.enums import JobStatus
from openhtc.domain.lifecycle import JobRecord

pytestmark = pytest.mark.crash

JOBS = 100
ENV = {
    "OPENHTC_EXECUTOR_VCPUS": str(JOBS + 4),  # every job runs at once (1 vCPU, 512 MB each)
    "OPENHTC_EXECUTOR_MEMORY_MB": str((JOBS + 4) * 512),
    "OPENHTC_LEASE_SECONDS": "10",
    "OPENHTC_HEARTBEAT_SECONDS": "2",
    "OPENHTC_MAX_INFRASTRUCTURE_RETRIES": "0",  # a lost attempt would fail, not hide as a re-run
}
MARK = 'mktemp "{runs}/$RESCALE_JOB_ID.$AWS_BATCH_JOB_ATTEMPT.XXXXXX" >/dev/null'


def executions(runs: Path) -> Counter[tuple[str, int]]:
    out: Counter[tuple[str, int]] = Counter()
    for p in runs.iterdir():
        job, attempt, _ = p.name.rsplit(".", 2)
        out[(job, int(attempt))] += 1
    return out


def wait_for(check: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.1)


def test_running_jobs_survive_a_kill9_of_the_server(start_server: Callable[..., Any], tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    runs.mkdir()
    srv = start_server(env=ENV)
    api = srv.api()
    pid, tid = api.project_and_task()
    script = f"{MARK.format(runs=runs)}; echo before; sleep 5; echo after"
    parent = api.submit_one(pid, tid, api.job_request(["sh", "-c", script], batch_size=JOBS, max_retries=0))[
        "parentJobId"
    ]
    wait_for(lambda: sum(executions(runs).values()) >= JOBS, f"all {JOBS} jobs to start")
    srv.kill9()
    srv.restart()
    jobs = {j["jobUUID"]: j for j in api.wait_terminal(pid, tid, JOBS, timeout=120)}

    problems = []
    expected = {f"{parent}:{i}" for i in range(JOBS)}
    if set(jobs) != expected:
        problems.append(
            f"lost: {sorted(expected - set(jobs))[:5]}, invented: {sorted(set(jobs) - expected)[:5]}"
        )
    ran = executions(runs)
    if ran != Counter({(job_id, 1): 1 for job_id in expected}):
        problems.append(f"executions other than one first attempt per job: {sorted((+ran).items())[:5]}")
    bad = {k: (j["status"], j.get("failureCode"), j.get("statusReason")) for k, j in jobs.items()}
    bad = {k: v for k, v in bad.items() if v[0] != "SUCCEEDED"}
    if bad:
        problems.append(f"{len(bad)} job(s) did not succeed: {sorted(bad.items())[:5]}")
    for job_id in sorted(expected)[:: JOBS // 10]:  # a sample: events and logs are a request each
        statuses = [e["status"] for e in api.events(pid, tid, job_id)]
        if statuses.count("RUNNING") != 1 or statuses.count("SUBMITTED_TO_RESCALE") != 1:
            problems.append(f"{job_id} ran more than one attempt: {statuses}")
        lines = api.log_lines(pid, tid, job_id)
        if lines != ["before", "after"]:
            problems.append(f"{job_id}: log not complete (or doubled) across the crash: {lines}")
    try:
        api.assert_summary_matches_jobs(pid, tid, JOBS)
    except AssertionError as exc:
        problems.append(f"summary counters disagree with the job list: {exc}")
    assert not problems, "\n".join(problems) + "\n" + srv.log_tail(40)
    assert "took back" in srv.log_tail(400), "the restarted server did not say it took jobs back"


@pytest.mark.one_db  # the launchers' behaviour; the store's adoption runs on both in the kill -9 test
def test_a_job_that_ends_while_the_server_is_down_reports_its_exit_code(
    start_server: Callable[..., Any], tmp_path: Path
) -> None:
    runs, ends = tmp_path / "runs", tmp_path / "ends"
    runs.mkdir()
    ends.mkdir()
    srv = start_server(env=ENV)
    api = srv.api()
    pid, tid = api.project_and_task()
    gate = tmp_path / "gate"
    script = (
        f"{MARK.format(runs=runs)}; echo before; while [ ! -e {gate} ]; do sleep 0.05; done; echo after; "
        f'touch {ends}/"$AWS_BATCH_JOB_ARRAY_INDEX"; exit $((3 + AWS_BATCH_JOB_ARRAY_INDEX))'
    )
    api.submit_one(pid, tid, api.job_request(["sh", "-c", script], batch_size=3, max_retries=0))
    wait_for(lambda: sum(executions(runs).values()) >= 3, "the jobs to start")
    srv.kill9()
    gate.touch()
    wait_for(lambda: len(list(ends.iterdir())) == 3, "the jobs to end while the server is down")
    srv.restart()
    jobs = sorted(api.wait_terminal(pid, tid, 3, timeout=60), key=lambda j: j["jobUUID"])
    for job in jobs:
        index = int(job["jobUUID"].rpartition(":")[2])
        assert (job["status"], job["failureCode"], (job["container"] or {}).get("exitCode")) == (
            "FAILED",
            "ErrorNonZeroContainerExitCode",
            3 + index,
        ), job
        assert api.log_lines(pid, tid, job["jobUUID"]) == ["before", "after"]
        statuses = [e["status"] for e in api.events(pid, tid, job["jobUUID"])]
        assert statuses.count("RUNNING") == 1, statuses
    assert executions(runs) == Counter({(j["jobUUID"], 1): 1 for j in jobs})


@pytest.mark.one_db  # the launchers' behaviour; the store's adoption runs on both in the kill -9 test
def test_jobs_survive_two_crashes_in_a_row(start_server: Callable[..., Any], tmp_path: Path) -> None:
    """The server taken back jobs from is killed too: the next one takes them back again (they
    are in its journal and the launchers wait again), and a job started in between as well."""
    runs, gate = tmp_path / "runs", tmp_path / "gate"
    runs.mkdir()
    srv = start_server(env=ENV)
    api = srv.api()
    pid, tid = api.project_and_task()
    script = f"{MARK.format(runs=runs)}; echo before; while [ ! -e {gate} ]; do sleep 0.05; done; echo after"
    request = api.job_request(["sh", "-c", script], batch_size=4, max_retries=0)
    api.submit_one(pid, tid, request)
    wait_for(lambda: sum(executions(runs).values()) >= 4, "the first jobs to start")
    srv.kill9()
    srv.restart()
    api.submit_one(pid, tid, request)
    wait_for(lambda: sum(executions(runs).values()) >= 8, "the second jobs to start")
    api.wait_jobs(pid, tid, lambda js: all(j["status"] == "RUNNING" for j in js), what="all 8 RUNNING")
    srv.kill9()
    srv.restart()
    gate.touch()
    jobs = api.wait_terminal(pid, tid, 8, timeout=60)
    assert {j["status"] for j in jobs} == {"SUCCEEDED"}, [(j["jobUUID"], j["statusReason"]) for j in jobs]
    assert executions(runs) == Counter({(j["jobUUID"], 1): 1 for j in jobs})
    for job in jobs:
        assert api.log_lines(pid, tid, job["jobUUID"]) == ["before", "after"]
    api.assert_summary_matches_jobs(pid, tid, 8)


@pytest.mark.one_db  # the launchers' behaviour; the store's adoption runs on both in the kill -9 test
def test_launchers_kill_their_jobs_when_no_server_comes_back(
    start_server: Callable[..., Any], marker: Any, tmp_path: Path
) -> None:
    """``executor_adopt_seconds`` (2 s here) passes with no server: the launcher kills its jobs
    and exits. The next start finds a stale launcher socket (left by an older crash) and its
    job's attempt recovered as before: an infrastructure fault, re-run as a new attempt."""
    flag = tmp_path / "flag"
    srv = start_server(
        env={**ENV, "OPENHTC_EXECUTOR_ADOPT_SECONDS": "2", "OPENHTC_MAX_INFRASTRUCTURE_RETRIES": "1"}
    )
    api = srv.api()
    pid, tid = api.project_and_task()
    script = f"if [ -e {flag} ]; then echo again; exit 0; fi; touch {flag}; echo first; sleep 300"
    job_id = (
        api.submit_one(pid, tid, api.job_request(["sh", "-c", script], envs=marker.envs, max_retries=0))[
            "parentJobId"
        ]
        + ":0"
    )
    wait_for(lambda: flag.exists() and bool(marker.pids()), "the job to run")
    launchers = srv.data_dir / "executor" / "launchers"
    assert {p.name for p in launchers.glob("*.sock")}, "the launchers wait on no socket"
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in launchers.glob("*.sock"))
    srv.kill9()
    wait_for(lambda: not marker.pids(), "the launcher to kill its job", timeout=30)
    wait_for(lambda: not list(launchers.glob("*.sock")), "the launchers to exit", timeout=30)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # a socket nobody listens on
    stale.bind(str(launchers / "0.sock"))
    stale.close()
    srv.restart()
    (job,) = api.wait_terminal(pid, tid, 1, timeout=60)
    assert (job["status"], job["jobUUID"]) == ("SUCCEEDED", job_id), job
    events = api.events(pid, tid, job_id)
    assert [e["status"] for e in events].count("SUBMITTED_TO_RESCALE") == 2  # a second attempt
    assert any("after an infrastructure fault" in (e["statusReason"] or "") for e in events)
    assert os.stat(launchers / "0.sock").st_mode & 0o777 == 0o600  # the new launcher's, not the stale one


@pytest.mark.one_db  # the launchers' behaviour; the store's adoption runs on both in the kill -9 test
def test_a_server_with_another_runtime_ends_the_jobs_left_waiting(
    start_server: Callable[..., Any], marker: Any
) -> None:
    """Restarted with a runtime that cannot take them back (noop here), the server ends the
    waiting launchers and their jobs before it recovers the attempts, so none runs twice."""
    srv = start_server(env=ENV)
    api = srv.api()
    pid, tid = api.project_and_task()
    api.submit_one(pid, tid, api.job_request(["sh", "-c", "sleep 300"], envs=marker.envs, max_retries=0))
    api.wait_jobs(pid, tid, lambda js: js[0]["status"] == "RUNNING", what="the job to run")
    srv.kill9()
    srv.runtime = "noop"
    srv.restart()
    (job,) = api.wait_terminal(pid, tid, 1, timeout=60)
    assert (job["status"], job["failureCode"]) == ("FAILED", "ErrorInfrastructureFault"), job
    assert not marker.pids(), "the job of the process runtime still runs"
    assert not list((srv.data_dir / "executor" / "launchers").glob("*.sock"))


def test_adoption_keeps_the_attempt_and_renews_its_lease() -> None:
    """The pure rule: an adopted attempt stays in its status with a new lease, no event; an
    attempt the executor no longer holds is not adopted."""
    rec = JobRecord(7, int(JobStatus.RUNNING), attempt=2, executor_id="local-a", lease_expires_at=10.0)
    adopted = lifecycle.adopt(rec, "local-a", 2, 99.0)
    assert adopted == rec._replace(lease_expires_at=99.0)
    assert lifecycle.adopt(rec, "local-a", 1, 99.0) is None  # an older attempt
    assert lifecycle.adopt(rec, "local-b", 2, 99.0) is None  # another executor's
    done = rec._replace(status=int(JobStatus.SUCCEEDED))
    assert lifecycle.adopt(done, "local-a", 2, 99.0) is None
    starting = rec._replace(status=int(JobStatus.STARTING))
    assert lifecycle.adopt(starting, "local-a", 2, 5.0) == starting._replace(lease_expires_at=5.0)


@pytest.mark.unit
def test_on_a_shared_database_launchers_end_their_jobs_before_another_server_may_rerun_them(
    tmp_path: Path,
) -> None:
    """With PostgreSQL another server expires a dead executor's leases after ``lease_seconds``
    and runs its jobs again: the launchers must have killed them by then (else they run twice)."""
    from types import SimpleNamespace

    from openhtc.config import Settings
    from openhtc.wiring import _adopt_seconds

    settings = Settings(data_dir=tmp_path, executor_adopt_seconds=600, lease_seconds=60, heartbeat_seconds=5)
    shared = SimpleNamespace(db=SimpleNamespace(is_sqlite=False))
    alone = SimpleNamespace(db=SimpleNamespace(is_sqlite=True))
    assert _adopt_seconds(settings, shared) == 50  # type: ignore[arg-type]
    assert _adopt_seconds(settings, alone) == 600  # type: ignore[arg-type]
    assert _adopt_seconds(settings.model_copy(update={"executor_adopt_seconds": 0}), shared) == 0  # type: ignore[arg-type]
