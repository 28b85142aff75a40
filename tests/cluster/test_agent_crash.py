"""`htc agent` journals its hand-offs without a sync, and a crash of its machine runs no job twice.

The agent writes ``S <job> <attempt>`` to its attempt journal before each hand-off to the
runtime and waits for no ``fdatasync`` (executor/journal.py, lazy): a ``kill -9`` of the agent
loses none of it (the page cache), a crash of its machine may lose the file's tail. Here the
machine "crashes" while 1,000 jobs start at full speed: the agent dies with its jobs, and its
journal is left as the next boot finds it after losing every record since it was opened (its
header alone, naming the boot before). Restarted on the same work directory, the agent
registers saying its journal cannot tell (``journal_untrusted``), and the server recovers every
attempt leased to it as one that may have started. Trusting the emptied journal (an empty
``may_have_started``) would re-queue free the jobs that ran while the database still said
RUNNABLE or STARTING, and run them again.
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from openhtc.testing.agentproc import AgentProcess
from openhtc.testing.server import HtcServer, htc_command

pytestmark = pytest.mark.timeout(300)

JOBS = 1_000
# one file per execution: <job>.<attempt>.<random>
COMMAND = 'mktemp "{runs}/$RESCALE_JOB_ID.$AWS_BATCH_JOB_ATTEMPT.XXXXXX"'


def executions(runs: Path) -> Counter[str]:
    """Executions per job."""
    return Counter(p.name.rsplit(".", 2)[0] for p in runs.iterdir())


def wait_executed(runs: Path, count: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while sum(executions(runs).values()) < count:
        if time.monotonic() > deadline:
            pytest.fail(f"only {sum(executions(runs).values())} of {count} executions after {timeout:.0f} s")
        time.sleep(0.005)


def test_a_machine_crash_under_an_agent_runs_no_job_twice(
    start_server: Callable[..., HtcServer], tmp_path: Path
) -> None:
    runs = tmp_path / "runs"
    runs.mkdir()
    srv = start_server(args=("--no-executor",), env={"OPENHTC_MAX_INFRASTRUCTURE_RETRIES": "0"})
    token = srv.cli("admin", "create-agent-token").stdout.strip()
    work = tmp_path / "agent"
    agent = AgentProcess(htc_command(), srv.url, token, work, vcpus=8)
    restarted: AgentProcess | None = None
    try:
        api = srv.api()
        pid, tid = api.project_and_task()
        request = api.job_request(["sh", "-c", COMMAND.format(runs=runs)], batch_size=JOBS, max_retries=0)
        api.submit(pid, tid, request)
        wait_executed(runs, JOBS // 5)
        os.killpg(agent.pid, signal.SIGKILL)  # the machine goes: the agent and its jobs
        agent.proc.wait(timeout=10)
        journal = next((work / "executor").glob("attempts-*.journal"))
        header = journal.read_bytes().split(b"\n", 1)[0].split()
        assert header[0] == b"B" and header[2] == b"lazy", header  # no sync before a hand-off
        journal.write_bytes(b"B the-boot-before lazy\n")  # the next boot finds the tail lost
        restarted = AgentProcess(htc_command(), srv.url, token, work, vcpus=8)
        jobs = api.wait_terminal(pid, tid, JOBS, timeout=180)
    finally:
        for proc in (agent, restarted):
            if proc is not None:
                proc.stop()
                print(proc.log())
    ran = executions(runs)
    twice = {job: times for job, times in ran.items() if times > 1}
    assert not twice, f"{len(twice)} job(s) executed more than once: {sorted(twice.items())[:5]}"
    outcomes = Counter((j["status"], j.get("failureCode")) for j in jobs)
    assert set(outcomes) <= {("SUCCEEDED", None), ("FAILED", "ErrorInfrastructureFault")}, outcomes
    failed = [j for j in jobs if j["status"] == "FAILED"]
    assert failed, "the crash left the agent holding no job: nothing was recovered"
    assert all("after its machine did" in (j.get("statusReason") or "") for j in failed), failed[:3]
    api.assert_summary_matches_jobs(pid, tid, JOBS)
