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


def test_a_graceful_restart_charges_no_job_it_had_not_started(
    start_server: Callable[..., Any], tmp_path: Path
) -> None:
    """SIGTERM while jobs start at full speed, then start again: the executor journals the jobs
    next in line ahead of their hand-off, and a clean stop must take back those it never
    handed over, so none of them fails as "may have started" after the restart. (At most once,
    so a charge shows as a failure rather than as a re-run.)"""
    runs = tmp_path / "runs"
    runs.mkdir()
    srv = start_server(env=AT_MOST_ONCE)
    api = srv.api()
    pid, tid = api.project_and_task()
    request = api.job_request(["sh", "-c", COMMAND.format(runs=runs)], batch_size=JOBS // 2, max_retries=0)
    api.submit(pid, tid, request, request)
    wait_executed(runs, int(JOBS * KILL_AT[0]))
    srv.restart()  # SIGTERM first: a clean stop
    jobs = api.wait_terminal(pid, tid, JOBS, timeout=120)
    assert max(per_job(executions(runs)).values()) == 1
    # The journal's part: what was journaled ahead but never handed over is taken back, so the
    # restart's recovery charges nothing. (A job already handed to a job launcher when the stop
    # came can still end "The job launcher stopped while the job ran" without having run: a
    # known gap of the clean stop, not of the journal, tracked separately.)
    charged = [
        (j["jobUUID"], j["statusReason"])
        for j in jobs
        if j.get("failureCode") == "ErrorInfrastructureFault"
        and "may have started" in (j.get("statusReason") or "")
    ]
    assert not charged, f"{len(charged)} job(s) charged by a clean restart: {charged[:5]}"
