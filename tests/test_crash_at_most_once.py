"""An attempt runs at most once, even when the server is killed while it starts jobs.

2,000 short jobs with ``maxRetries: 0`` each leave one file per execution (``mktemp``, named by
the job). The server gets ``kill -9`` twice while it starts them at full speed, and is restarted
each time. Executions are counted from those files, not from statuses. Then:

* no job executed more than once (its only attempt may not be re-run by recovery);
* a job that executed is SUCCEEDED, or FAILED with ``ErrorInfrastructureFault`` (it may have
  been in flight at a kill); one that never executed is FAILED with ``ErrorInfrastructureFault``
  at most (handed to the runtime, not yet spawned), never SUCCEEDED;
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


def executions(runs: Path) -> Counter[str]:
    return Counter(name.rpartition(".")[0] for name in (p.name for p in runs.iterdir()))


def wait_executed(runs: Path, count: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while sum(executions(runs).values()) < count:
        if time.monotonic() > deadline:
            pytest.fail(f"only {sum(executions(runs).values())} of {count} executions after {timeout:.0f} s")
        time.sleep(0.005)


def test_no_attempt_runs_twice_across_kills(start_server: Callable[..., Any], tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    runs.mkdir()
    srv = start_server(env=ENV)
    api = srv.api()
    pid, tid = api.project_and_task()
    command = f'mktemp "{runs}/$RESCALE_JOB_ID.XXXXXX"'
    request = api.job_request(["sh", "-c", command], batch_size=JOBS // 2, max_retries=0)
    parents = [r["parentJobId"] for r in api.submit(pid, tid, request, request)]  # batches hold 1,000
    for share in KILL_AT:
        wait_executed(runs, int(JOBS * share))
        srv.kill9()
        srv.restart()
    jobs = {j["jobUUID"]: j for j in api.wait_terminal(pid, tid, JOBS, timeout=120)}
    ran = executions(runs)

    problems = []
    expected = {f"{parent}:{i}" for parent in parents for i in range(JOBS // 2)}
    if set(jobs) != expected:
        problems.append(
            f"lost: {sorted(expected - set(jobs))[:5]}, invented: {sorted(set(jobs) - expected)[:5]}"
        )
    twice = {job: n for job, n in ran.items() if n > 1}
    if twice:
        problems.append(f"{len(twice)} job(s) executed more than once: {sorted(twice.items())[:5]}")
    outcomes: Counter[tuple[str, str | None, bool]] = Counter()
    for job_id, job in jobs.items():
        outcome = (job["status"], job.get("failureCode"), ran[job_id] > 0)
        outcomes[outcome] += 1
        allowed = outcome in (("SUCCEEDED", None, True), ("FAILED", "ErrorInfrastructureFault", True)) or (
            outcome == ("FAILED", "ErrorInfrastructureFault", False)
        )
        if not allowed:
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
    handed over, so none of them fails as "may have started" after the restart."""
    runs = tmp_path / "runs"
    runs.mkdir()
    srv = start_server(env=ENV)
    api = srv.api()
    pid, tid = api.project_and_task()
    command = f'mktemp "{runs}/$RESCALE_JOB_ID.XXXXXX"'
    request = api.job_request(["sh", "-c", command], batch_size=JOBS // 2, max_retries=0)
    api.submit(pid, tid, request, request)
    wait_executed(runs, int(JOBS * KILL_AT[0]))
    srv.restart()  # SIGTERM first: a clean stop
    jobs = api.wait_terminal(pid, tid, JOBS, timeout=120)
    ran = executions(runs)
    assert max(ran.values()) == 1
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
