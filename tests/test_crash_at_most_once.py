"""An attempt runs at most once, even when the server is killed while it starts jobs.

2,000 short jobs with ``maxRetries: 0`` each leave one file per execution (``mktemp``, named by
the job and its attempt). The server gets ``kill -9`` twice while it starts them at full speed,
and is restarted each time. Executions are counted from those files, not from statuses. Then:

* no attempt executed more than once (recovery never re-runs an attempt as itself);
* with ``max_infrastructure_retries`` 0 (at most once), no job executed more than once: a job
  that executed is SUCCEEDED, or FAILED with ``ErrorInfrastructureFault`` (it may have been in
  flight at a kill); one that never executed is FAILED with ``ErrorInfrastructureFault`` at most
  (handed to the runtime, not yet spawned), never SUCCEEDED;
* with the default budget (3 re-runs after infrastructure faults), a job executes at most
  ``1 + maxRetries + 3`` times, each execution beyond the first matched by a re-run its events
  record, and two kills cost no job: every one SUCCEEDED;
* no job is lost, none fails for another reason, and the counters equal the job list.

Before the executor journaled its hand-offs, jobs whose process was spawned before their
RUNNING report was committed were re-queued as if they had never started, and ran twice.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.crash

JOBS = 2_000
KILL_AT = (0.2, 0.55)  # kill once this share of the jobs has executed
ENV = {"OPENHTC_EXECUTOR_VCPUS": "8", "OPENHTC_LEASE_SECONDS": "10", "OPENHTC_HEARTBEAT_SECONDS": "2"}
AT_MOST_ONCE = {**ENV, "OPENHTC_MAX_INFRASTRUCTURE_RETRIES": "0"}
DEFAULT_BUDGET = 3  # settings.max_infrastructure_retries
# one file per execution: <job>.<attempt>.<random>
COMMAND = 'mktemp "{runs}/$RESCALE_JOB_ID.$AWS_BATCH_JOB_ATTEMPT.XXXXXX"'


def executions(runs: Path) -> Counter[tuple[str, int]]:
    """Executions per (job, attempt)."""
    out: Counter[tuple[str, int]] = Counter()
    for p in runs.iterdir():
        job, attempt, _ = p.name.rsplit(".", 2)
        out[(job, int(attempt))] += 1
    return out


def per_job(by_attempt: Counter[tuple[str, int]]) -> Counter[str]:
    ran: Counter[str] = Counter()
    for (job_id, _), n in by_attempt.items():
        ran[job_id] += n
    return ran


def wait_executed(runs: Path, count: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while sum(executions(runs).values()) < count:
        if time.monotonic() > deadline:
            pytest.fail(f"only {sum(executions(runs).values())} of {count} executions after {timeout:.0f} s")
        time.sleep(0.005)


@pytest.mark.parametrize("budget", [0, DEFAULT_BUDGET], ids=["at-most-once", "default-budget"])
def test_no_attempt_runs_twice_across_kills(
    start_server: Callable[..., Any], tmp_path: Path, budget: int
) -> None:
    runs = tmp_path / "runs"
    runs.mkdir()
    srv = start_server(env=AT_MOST_ONCE if budget == 0 else ENV)
    api = srv.api()
    pid, tid = api.project_and_task()
    request = api.job_request(["sh", "-c", COMMAND.format(runs=runs)], batch_size=JOBS // 2, max_retries=0)
    parents = [r["parentJobId"] for r in api.submit(pid, tid, request, request)]  # batches hold 1,000
    for share in KILL_AT:
        wait_executed(runs, int(JOBS * share))
        srv.kill9()
        srv.restart()
    jobs = {j["jobUUID"]: j for j in api.wait_terminal(pid, tid, JOBS, timeout=120)}
    by_attempt = executions(runs)
    ran = per_job(by_attempt)

    problems = []
    expected = {f"{parent}:{i}" for parent in parents for i in range(JOBS // 2)}
    if set(jobs) != expected:
        problems.append(
            f"lost: {sorted(expected - set(jobs))[:5]}, invented: {sorted(set(jobs) - expected)[:5]}"
        )
    twice = {key: n for key, n in by_attempt.items() if n > 1}
    if twice:
        problems.append(f"{len(twice)} attempt(s) executed more than once: {sorted(twice.items())[:5]}")
    allowed = 1 + 0 + budget  # 1 + maxRetries + infrastructure re-runs
    over = {job: n for job, n in ran.items() if n > allowed}
    if over:
        problems.append(f"{len(over)} job(s) executed more than {allowed} times: {sorted(over.items())[:5]}")
    for job_id in sorted(job for job, n in ran.items() if n > 1)[:50]:
        # each execution beyond the first is a re-run after an infrastructure fault, recorded as such
        reruns = [
            e
            for e in api.events(pid, tid, job_id)
            if e["status"] == "SUBMITTED_TO_RESCALE"
            and "after an infrastructure fault" in (e["statusReason"] or "")
        ]
        if len(reruns) < ran[job_id] - 1:
            problems.append(f"{job_id} executed {ran[job_id]} times but records {len(reruns)} re-run(s)")
    outcomes: Counter[tuple[str, str | None, bool]] = Counter()
    for job_id, job in jobs.items():
        outcome = (job["status"], job.get("failureCode"), ran[job_id] > 0)
        outcomes[outcome] += 1
        if budget:  # two kills cannot spend three re-runs: every job ends well
            allowed_outcome = outcome == ("SUCCEEDED", None, True)
        else:
            allowed_outcome = outcome in (
                ("SUCCEEDED", None, True),
                ("FAILED", "ErrorInfrastructureFault", True),
                ("FAILED", "ErrorInfrastructureFault", False),
            )
        if not allowed_outcome:
            problems.append(f"{job_id}: {outcome} ({job.get('statusReason')!r})")
    try:
        api.assert_summary_matches_jobs(pid, tid, JOBS)
    except AssertionError as exc:
        problems.append(f"summary counters disagree with the job list: {exc}")
    assert not problems, "\n".join(problems[:20]) + f"\noutcomes (status, code, executed): {dict(outcomes)}"


LONG = 6  # of 8 vCPUs: jobs that outlast the stop, each with the next job held behind it


def test_a_graceful_restart_charges_no_job_it_had_not_started(
    start_server: Callable[..., Any], tmp_path: Path
) -> None:
    """SIGTERM while jobs start at full speed, with a few long ones running, then start again.

    Pipelining hands each slot's next job to the job launcher while the slot's job runs; behind
    a long job it waits there (no slot is free to withdraw it to). A clean stop must take back
    every job it had not started, held in a launcher or journaled ahead, so that none is
    charged: every job executes exactly once (counted from the files the jobs make), and the
    only failures are the long jobs that were running, killed once the stop's grace ran out:
    FAILED with ErrorInfrastructureFault, as after a crash (``maxRetries: 0`` and no
    infrastructure re-run, so a charge shows as a failure rather than as a re-run)."""
    runs = tmp_path / "runs"
    runs.mkdir()
    gate = tmp_path / "gate"  # once it exists, a long job that starts ends at once
    srv = start_server(env={**AT_MOST_ONCE, "OPENHTC_EXECUTOR_STOP_GRACE_SECONDS": "2"})
    api = srv.api()
    pid, tid = api.project_and_task()
    mark = COMMAND.format(runs=runs)
    long = api.job_request(["sh", "-c", f'{mark} && {{ test -e "{gate}" || exec sleep 60; }}'], max_retries=0)
    short = api.job_request(["sh", "-c", mark], batch_size=JOBS // 2, max_retries=0)
    long_parents = [api.submit(pid, tid, long)[0]["parentJobId"] for _ in range(LONG)]
    api.submit(pid, tid, short, short)
    wait_executed(runs, LONG + JOBS // 10)
    gate.touch()
    running_long = {f"{parent}:0" for parent in long_parents} & set(per_job(executions(runs)))
    srv.restart()  # SIGTERM first: a clean stop
    jobs = api.wait_terminal(pid, tid, JOBS + LONG, timeout=120)
    ran = per_job(executions(runs))

    not_once = {
        j["jobUUID"]: (ran[j["jobUUID"]], j["status"], j.get("failureCode"), j.get("statusReason"))
        for j in jobs
        if ran[j["jobUUID"]] != 1
    }
    assert not not_once, (
        f"{len(not_once)} job(s) did not execute exactly once: {sorted(not_once.items())[:5]}"
    )
    failed = {
        j["jobUUID"]: (j.get("failureCode"), j.get("statusReason"))
        for j in jobs
        if j["status"] != "SUCCEEDED"
    }
    assert set(failed) == running_long, f"failed: {sorted(failed.items())[:5]}; running long: {running_long}"
    assert {code for code, _ in failed.values()} <= {"ErrorInfrastructureFault"}, failed


def test_a_machine_crash_that_loses_the_journals_tail_runs_no_attempt_twice(
    start_server: Callable[..., Any], tmp_path: Path
) -> None:
    """The embedded executor waits for no sync of its attempt journal before a hand-off (a lazy
    journal, executor/journal.py): a kill -9 of the server loses none of its writes, a crash of
    the machine may lose its tail. Here the machine "crashes" while 1,000 jobs start at full
    speed: the server dies with its launchers and their jobs (``executor_adopt_seconds`` 0), and
    the journal is left as the next boot finds it after losing every record since it was opened:
    its header alone, naming the boot before. No attempt may run twice: the executor cannot say
    which of its jobs started, so each one it held fails as one that may have started (no
    infrastructure re-run allowed); trusting the emptied journal would re-queue free the jobs
    that ran while the database still said RUNNABLE or STARTING, and run them again."""
    runs = tmp_path / "runs"
    runs.mkdir()
    srv = start_server(env={**AT_MOST_ONCE, "OPENHTC_EXECUTOR_ADOPT_SECONDS": "0"})
    api = srv.api()
    pid, tid = api.project_and_task()
    n = JOBS // 2
    api.submit(
        pid, tid, api.job_request(["sh", "-c", COMMAND.format(runs=runs)], batch_size=n, max_retries=0)
    )
    wait_executed(runs, n // 5)
    srv.kill9()
    journal = next((srv.data_dir / "executor").glob("attempts-*.journal"))
    boot = journal.read_bytes().split(b"\n", 1)[0].split()
    assert boot[0] == b"B" and boot[2] == b"lazy", boot
    journal.write_bytes(b"B the-boot-before lazy\n")
    srv.restart()
    jobs = api.wait_terminal(pid, tid, n, timeout=120)
    ran = per_job(executions(runs))
    twice = {job: times for job, times in ran.items() if times > 1}
    assert not twice, f"{len(twice)} job(s) executed more than once: {sorted(twice.items())[:5]}"
    outcomes = Counter((j["status"], j.get("failureCode")) for j in jobs)
    assert set(outcomes) <= {("SUCCEEDED", None), ("FAILED", "ErrorInfrastructureFault")}, outcomes
    failed = [j for j in jobs if j["status"] == "FAILED"]
    assert failed, "the crash left the executor holding no job: nothing was recovered"
    assert all("after its machine did" in (j.get("statusReason") or "") for j in failed), failed[:3]
    api.assert_summary_matches_jobs(pid, tid, n)
