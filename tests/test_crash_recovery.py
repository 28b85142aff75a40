"""No job is lost or left RUNNING when the server is killed with SIGKILL and restarted.

Scenario, on SQLite and on PostgreSQL: two long jobs are RUNNING (their first attempt sleeps for
five minutes) and four short jobs are queued behind them when the server gets ``kill -9``. It is
restarted on the same data directory and database. Then:

* every job reaches SUCCEEDED or FAILED, none stays RUNNING and none is lost;
* a long job whose process died runs again as a new attempt without spending a retry
  (``maxRetries: 0``; its re-run finds a flag file and succeeds), and is FAILED with
  ``ErrorInfrastructureFault`` when the server allows no re-run after infrastructure faults
  (``max_infrastructure_retries`` 0);
* the queued short jobs run normally, including those the executor had already claimed
  (RUNNABLE) but not started: a crash must not use up an attempt that never began;
* the summary counters equal a count of the job list;
* no process of the killed attempts is still running on the host (they carry a marker
  environment variable, so orphans are found in /proc even after their parent died);
* bearer tokens issued before the crash still work after it.

The server gets short executor leases (10 s) so a recovery that relies on lease expiry stays
quick; a server that reclaims its own executor's jobs at start-up does not need them.

These tests are about the recovery of jobs whose processes died with the server (a machine's
crash, or launchers that gave up waiting): ``executor_adopt_seconds`` 0 makes the launchers
kill their jobs at once. With the default, running jobs outlive a crash instead
(``test_crash_survival.py``).
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.crash

FAST_LEASES = {
    "OPENHTC_LEASE_SECONDS": "10",
    "OPENHTC_HEARTBEAT_SECONDS": "2",
    "OPENHTC_EXECUTOR_ADOPT_SECONDS": "0",  # the jobs die with the server (see above)
}
# the clean-stop tests: a killed job's charge shows as its failure rather than as a re-run
AT_MOST_ONCE = {**FAST_LEASES, "OPENHTC_MAX_INFRASTRUCTURE_RETRIES": "0"}
LONG, SHORT = 2, 4
RECOVERY_TIMEOUT = 120.0


def _long_script(flag_dir: Path) -> str:
    """First attempt: leave a flag and sleep 5 minutes. Any later attempt: succeed at once."""
    flag = f'{flag_dir}/"$AWS_BATCH_JOB_ARRAY_INDEX"'
    return f"if [ -e {flag} ]; then echo retried; exit 0; fi; touch {flag}; echo first; sleep 300"


@dataclass
class Crashed:
    """A server that was killed with two long jobs RUNNING and four short ones queued, then restarted."""

    server: Any
    api: Any  # the HtcApi client created before the crash
    project: str
    task: str
    long_parent: str
    short_parent: str

    def long_ids(self) -> list[str]:
        return [f"{self.long_parent}:{i}" for i in range(LONG)]

    def short_ids(self) -> list[str]:
        return [f"{self.short_parent}:{i}" for i in range(SHORT)]


def crash_while_running(
    start_server: Callable[..., Any], marker: Any, flag_dir: Path, max_retries: int, infra_retries: int
) -> Crashed:
    srv = start_server(env={**FAST_LEASES, "OPENHTC_MAX_INFRASTRUCTURE_RETRIES": str(infra_retries)})
    api = srv.api()
    pid, tid = api.project_and_task()
    long_request = api.job_request(
        ["sh", "-c", _long_script(flag_dir)], batch_size=LONG, envs=marker.envs, max_retries=max_retries
    )
    long_parent = api.submit_one(pid, tid, long_request)["parentJobId"]
    api.wait_jobs(
        pid,
        tid,
        lambda js: all(j["status"] == "RUNNING" for j in js),
        timeout=30,
        what="both long jobs to run",
    )
    short_request = api.job_request(["sh", "-c", "echo short"], batch_size=SHORT)
    short_parent = api.submit_one(pid, tid, short_request)["parentJobId"]
    # Kill once the scheduler has admitted them: queued for, or already held by, the executor.
    api.wait_admitted(pid, tid, timeout=30, what="the short jobs to be admitted")
    assert len(marker.pids()) >= LONG, "the RUNNING jobs have no processes on the host"

    srv.kill9()
    srv.restart()
    return Crashed(srv, api, pid, tid, long_parent, short_parent)


def recovery_problems(crashed: Crashed, marker: Any) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Wait for recovery; return the jobs and every property violated whatever the retry policy.

    Problems are collected rather than asserted one by one, so a report names all of them.
    """
    api, pid, tid = crashed.api, crashed.project, crashed.task
    jobs = {j["jobUUID"]: j for j in api.wait_terminal(pid, tid, LONG + SHORT, timeout=RECOVERY_TIMEOUT)}
    problems = []
    if set(jobs) != set(crashed.long_ids() + crashed.short_ids()):
        problems.append(f"jobs lost or invented by the crash: {sorted(jobs)}")
    for job_id in crashed.short_ids():
        job = jobs.get(job_id, {})
        if job.get("status") != "SUCCEEDED":
            problems.append(
                f"{job_id} was queued at the crash (startedAt={job.get('startedAt')}) but ended "
                f"{job.get('status')} {job.get('failureCode')}: {job.get('statusReason')!r}"
            )
    try:
        api.assert_summary_matches_jobs(pid, tid, LONG + SHORT)
    except AssertionError as exc:
        problems.append(f"summary counters disagree with the job list: {exc}")
    deadline = time.monotonic() + 10
    while marker.pids() and time.monotonic() < deadline:
        time.sleep(0.2)
    if marker.pids():
        problems.append(f"processes of the killed attempts still run on the host: {_describe(marker.pids())}")
    return jobs, problems


def _describe(pids: list[int]) -> list[str]:
    out = []
    for pid in pids:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        except OSError:
            cmdline = "?"
        out.append(f"{pid}: {cmdline}")
    return out


def test_running_jobs_fail_with_infrastructure_fault_after_a_crash_when_no_rerun_is_allowed(
    start_server: Callable[..., Any], marker: Any, tmp_path: Path
) -> None:
    """max_infrastructure_retries 0 (at most once) and maxRetries 1: the crash ends the job; the
    user's retry is not spent on the server's fault either."""
    crashed = crash_while_running(start_server, marker, tmp_path, max_retries=1, infra_retries=0)
    # The client from before the crash keeps working: tokens survive the restart.
    assert isinstance(crashed.api.get("/htc/projects")["items"], list)
    jobs, problems = recovery_problems(crashed, marker)
    for job_id in crashed.long_ids():
        job = jobs[job_id]
        if (job["status"], job["failureCode"]) != ("FAILED", "ErrorInfrastructureFault"):
            problems.append(
                f"{job_id} RUNNING, no re-run allowed, but ended {job['status']} {job['failureCode']}"
            )
        statuses = [e["status"] for e in crashed.api.events(crashed.project, crashed.task, job_id)]
        if statuses.count("RUNNING") != 1 or "FAILED" not in statuses:
            problems.append(f"{job_id} events: {statuses}")
    assert not problems, "\n".join(problems)


def test_running_jobs_are_rerun_after_a_crash_without_spending_a_retry(
    start_server: Callable[..., Any], marker: Any, tmp_path: Path
) -> None:
    """The default: a crash is the infrastructure's fault, so a job with maxRetries 0 runs again."""
    crashed = crash_while_running(start_server, marker, tmp_path, max_retries=0, infra_retries=3)
    jobs, problems = recovery_problems(crashed, marker)
    for job_id in crashed.long_ids():
        if jobs[job_id]["status"] != "SUCCEEDED":
            problems.append(f"{job_id} had a re-run left but ended {jobs[job_id]['status']}")
        events = crashed.api.events(crashed.project, crashed.task, job_id)
        statuses = [e["status"] for e in events]
        if statuses.count("RUNNING") != 2:
            problems.append(f"{job_id}: expected the crashed attempt and one re-run: {statuses}")
        if not any(
            "Re-run 1 of 3 after an infrastructure fault" in (e["statusReason"] or "") for e in events
        ):
            problems.append(
                f"{job_id}: no event says why it ran again: {[e['statusReason'] for e in events]}"
            )
        lines = crashed.api.log_lines(crashed.project, crashed.task, job_id)
        if not lines or lines[-1] != "retried":
            problems.append(f"{job_id}: the retry did not run to the end: {lines}")
    assert not problems, "\n".join(problems)


def test_held_jobs_survive_a_crash(start_server: Callable[..., Any]) -> None:
    """Jobs accepted but held (a 0-vCPU project limit) when the server dies all run after the
    restart once the limit is lifted: nothing accepted is lost."""
    srv = start_server(env=FAST_LEASES)
    api = srv.api()
    pid, tid = api.project_and_task()
    limit = {"vCPUs": 0, "modifierRole": "PROJECT_ADMIN"}
    api.request("POST", f"/htc/projects/{pid}/limits", json=limit, expect=201)
    parent = api.submit_one(pid, tid, api.job_request(["sh", "-c", "echo ok"], batch_size=20))["parentJobId"]
    assert {j["status"] for j in api.jobs(pid, tid)} == {"SUBMITTED_TO_RESCALE"}
    srv.kill9()
    srv.restart()
    assert {j["status"] for j in api.jobs(pid, tid)} == {"SUBMITTED_TO_RESCALE"}
    api.request("DELETE", f"/htc/projects/{pid}/limits", expect=204)
    jobs = api.wait_terminal(pid, tid, 20, timeout=RECOVERY_TIMEOUT)
    assert sorted(j["jobUUID"] for j in jobs) == sorted(f"{parent}:{i}" for i in range(20))
    assert {j["status"] for j in jobs} == {"SUCCEEDED"}
    api.assert_summary_matches_jobs(pid, tid, 20)


def test_a_clean_stop_takes_back_the_job_held_behind_a_running_one(
    start_server: Callable[..., Any], tmp_path: Path
) -> None:
    """One vCPU: a long job runs and the next job waits behind it in the job launcher (STARTING;
    no slot is free to move it to). On SIGTERM the stop withdraws the held job before it kills
    the long one (whose end would start it): the held job never starts, and after the restart
    it runs in its one attempt. The long job, killed, fails as after a crash. Executions are
    counted from the files the jobs make, and the server log says what the stop did."""
    runs = tmp_path / "runs"
    runs.mkdir()
    gate = tmp_path / "gate"  # once it exists, a long job that starts ends at once
    srv = start_server(env={**AT_MOST_ONCE, "OPENHTC_EXECUTOR_VCPUS": "1"})
    api = srv.api()
    pid, tid = api.project_and_task()
    mark = f'mktemp "{runs}/$RESCALE_JOB_ID.XXXXXX"'
    long = api.job_request(
        ["sh", "-c", f'{mark} && {{ test -e "{gate}" || exec sleep 300; }}'], max_retries=0
    )
    short = api.job_request(["sh", "-c", mark], batch_size=SHORT, max_retries=0)
    long_parent, short_parent = (r["parentJobId"] for r in api.submit(pid, tid, long, short))
    long_id, held_id = f"{long_parent}:0", f"{short_parent}:0"

    def held_behind(jobs: list[dict[str, Any]]) -> bool:
        status = {j["jobUUID"]: j["status"] for j in jobs}
        return status.get(long_id) == "RUNNING" and status.get(held_id) == "STARTING"

    api.wait_jobs(
        pid,
        tid,
        held_behind,
        timeout=RECOVERY_TIMEOUT,
        what="the long job to run with the next one held behind it",
    )
    gate.touch()
    srv.restart()  # SIGTERM first: a clean stop
    jobs = {j["jobUUID"]: j for j in api.wait_terminal(pid, tid, 1 + SHORT, timeout=RECOVERY_TIMEOUT)}
    ran = {p.name.rpartition(".")[0] for p in runs.iterdir()}
    assert len(list(runs.iterdir())) == len(ran) == 1 + SHORT, sorted(p.name for p in runs.iterdir())
    ends = {job_id: (j["status"], j.get("failureCode"), j.get("statusReason")) for job_id, j in jobs.items()}
    assert ends.pop(long_id) == (
        "FAILED",
        "ErrorInfrastructureFault",
        "Infrastructure fault: the server stopped while the job ran",
    )
    assert {end[:2] for end in ends.values()} == {("SUCCEEDED", None)}, ends
    log = srv.log_path.read_text(errors="replace")
    assert "(1 held, not started, taken back)" in log
    assert "1 job(s) killed" in log


@pytest.mark.one_db  # the executor's stop; the store's recovery runs on both in the crash tests
def test_a_stop_with_a_grace_lets_the_running_job_finish_and_starts_nothing(
    start_server: Callable[..., Any], tmp_path: Path
) -> None:
    """``executor_stop_grace_seconds``: SIGTERM lets the running job finish (it succeeds), while
    the job held behind it is taken back at once, not started when the running one ends; it
    runs after the next start (it finds the gate the test opens in between)."""
    runs = tmp_path / "runs"
    runs.mkdir()
    gate = tmp_path / "gate"
    srv = start_server(
        env={**AT_MOST_ONCE, "OPENHTC_EXECUTOR_VCPUS": "1", "OPENHTC_EXECUTOR_STOP_GRACE_SECONDS": "60"}
    )
    api = srv.api()
    pid, tid = api.project_and_task()
    running = api.job_request(["sh", "-c", f"sleep 1; touch {runs}/finished"], max_retries=0)
    held = api.job_request(
        ["sh", "-c", f'if [ -e "{gate}" ]; then touch {runs}/later; else touch {runs}/early; fi']
    )
    running_parent, held_parent = (r["parentJobId"] for r in api.submit(pid, tid, running, held))
    running_id, held_id = f"{running_parent}:0", f"{held_parent}:0"

    def held_behind(jobs: list[dict[str, Any]]) -> bool:
        status = {j["jobUUID"]: j["status"] for j in jobs}
        return status.get(running_id) == "RUNNING" and status.get(held_id) == "STARTING"

    api.wait_jobs(
        pid, tid, held_behind, timeout=RECOVERY_TIMEOUT, what="a running job and one held behind it"
    )
    srv.stop()  # SIGTERM: waits for the running job
    assert srv.proc is not None and srv.proc.returncode == 0
    gate.touch()
    srv.start()
    jobs = {j["jobUUID"]: j for j in srv.api().wait_terminal(pid, tid, 2, timeout=RECOVERY_TIMEOUT)}
    assert {job_id: j["status"] for job_id, j in jobs.items()} == {
        running_id: "SUCCEEDED",
        held_id: "SUCCEEDED",
    }
    assert sorted(p.name for p in runs.iterdir()) == ["finished", "later"]
    log = srv.log_path.read_text(errors="replace")
    assert "(1 held, not started, taken back)" in log and "0 job(s) killed" in log


@pytest.mark.one_db  # the executor's stop; the store's recovery runs on both in the crash tests
def test_a_second_sigterm_ends_the_grace_and_kills_the_running_job(
    start_server: Callable[..., Any], tmp_path: Path
) -> None:
    """With a long grace, the first SIGTERM waits for the running job; a second one kills it
    at once (it fails as after a crash) and the server exits cleanly."""
    env = {**AT_MOST_ONCE, "OPENHTC_EXECUTOR_VCPUS": "1", "OPENHTC_EXECUTOR_STOP_GRACE_SECONDS": "3600"}
    srv = start_server(env=env)
    api = srv.api()
    pid, tid = api.project_and_task()
    parent = api.submit_one(pid, tid, api.job_request(["sleep", "3600"], max_retries=0))["parentJobId"]
    api.wait_jobs(pid, tid, lambda jobs: jobs[0]["status"] == "RUNNING", what="the job to run")
    assert srv.proc is not None
    srv.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + RECOVERY_TIMEOUT
    while "executor stopping" not in srv.log_path.read_text(errors="replace"):
        assert time.monotonic() < deadline and srv.proc.poll() is None, srv.log_tail()
        time.sleep(0.05)
    srv.proc.send_signal(signal.SIGTERM)
    assert srv.proc.wait(timeout=RECOVERY_TIMEOUT) == 0
    srv.start()
    job = srv.api().job(pid, tid, f"{parent}:0")
    assert (job["status"], job["failureCode"]) == ("FAILED", "ErrorInfrastructureFault")
    assert "killing the 1 job(s) still running" in srv.log_path.read_text(errors="replace")
