"""A Slurm command that hangs (a slurmctld that never answers), played by fake ``sbatch`` and
``squeue`` scripts on the server's PATH: no real Slurm is needed for the hang itself.

What an operator notices: stopping the server does not wait for the hanging ``sbatch`` and leaves
no ``sbatch`` running behind it; a command past its timeout is killed with what it started
(before, a child still holding its output kept the server waiting on it long after the kill).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from openhtc.allocation.slurm import Slurm, SlurmError
from openhtc.testing.server import DEFAULT_REGION, HtcApi, HtcServer

pytestmark = pytest.mark.one_db


def _hanging(bin_dir: Path, name: str, pids: Path) -> None:
    """``name``: records its pid and that of a child it starts, then waits on the child for ever."""
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / name
    script.write_text(f"#!/bin/sh\nsleep 600 &\necho $$ $! > {pids}.tmp\nmv {pids}.tmp {pids}\nwait\n")
    script.chmod(0o755)


def _gone(pid: int) -> bool:
    """Not running: no such process, or a zombie (killed, its reaper not yet called)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rpartition(")")[2].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _wait_for(predicate: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _server_with_a_pilot_due(start_server: Callable[..., HtcServer], bin_dir: Path) -> HtcServer:
    """A ``--no-executor`` server with the fake Slurm commands of ``bin_dir`` first on its PATH, a
    Slurm allocation queue, and one job no agent takes: the queue's next round submits a pilot."""
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "OPENHTC_ALLOC_PERIOD_SECONDS": "0.2"}
    srv = start_server(args=("--no-executor",), env=env)
    queue = {"kind": "slurm", "region": DEFAULT_REGION, "timeLimitSeconds": 3600, "dryRun": False}
    assert srv.client(prefix="").post("/openhtc/v1/alloc/queues", json=queue).status_code == 201
    api: HtcApi = srv.api()
    project_id, task_id = api.project_and_task()
    api.submit(project_id, task_id, api.job_request(["true"]))
    return srv


def test_stopping_the_server_kills_a_hanging_sbatch(
    start_server: Callable[..., HtcServer], tmp_path: Path
) -> None:
    pids = tmp_path / "sbatch.pids"
    _hanging(tmp_path / "bin", "sbatch", pids)
    squeue = tmp_path / "bin" / "squeue"  # a Slurm with no job yet (a round looks before it submits)
    squeue.write_text("#!/bin/sh\nexit 0\n")
    squeue.chmod(0o755)
    srv = _server_with_a_pilot_due(start_server, tmp_path / "bin")
    _wait_for(pids.exists, "the pilot's sbatch")
    script, child = (int(p) for p in pids.read_text().split())
    assert not _gone(script)

    srv.stop()  # SIGTERM; SIGKILL only if it has not exited in 15 s
    assert srv.proc is not None and srv.proc.returncode == 0, srv.log_tail()
    _wait_for(lambda: _gone(script) and _gone(child), "the hanging sbatch to be killed", timeout=10)
    assert "allocation round interrupted: sbatch killed: the server is stopping" in srv.log_tail()
    # the stop is not a failed submission: the queue was not paused by it
    assert "paused" not in srv.log_tail()


def test_a_command_past_its_timeout_is_killed_with_what_it_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pids = tmp_path / "squeue.pids"
    _hanging(tmp_path / "bin", "squeue", pids)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    with pytest.raises(SlurmError, match="squeue did not answer within 3 s: killed"):
        Slurm(timeout=3.0).jobs("openhtc-q1")
    script, child = (int(p) for p in pids.read_text().split())
    _wait_for(lambda: _gone(script) and _gone(child), "squeue and its child to be killed", timeout=10)


def test_a_slurm_job_of_the_queue_with_no_pilot_row_is_cancelled(
    start_server: Callable[..., HtcServer], tmp_path: Path
) -> None:
    """An sbatch killed at its timeout (or failed) may have been accepted by Slurm: its job has
    no pilot row, and its agent would idle on the node until the walltime. The queue's next
    round cancels it (here sbatch fails; the job Slurm shows is not one of ours)."""
    bin_dir, cancelled = tmp_path / "bin", tmp_path / "scancel.args"
    bin_dir.mkdir()
    fakes = {
        # one pending job named as the queue's pilots are (squeue filters by name), none of ours
        "squeue": "#!/bin/sh\necho '4242|PENDING|N/A|None'\n",
        "scancel": f'#!/bin/sh\necho "$@" >> {cancelled}\n',
        "sbatch": "#!/bin/sh\necho 'sbatch: error: Socket timed out' >&2\nexit 1\n",
    }
    for name, text in fakes.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    srv = _server_with_a_pilot_due(start_server, bin_dir)  # its sbatch fails
    _wait_for(cancelled.exists, "the orphan to be cancelled", timeout=30)
    assert cancelled.read_text().split() == ["4242"]
    assert "Slurm job 4242 has no pilot here: cancelling it" in srv.log_tail()


def test_a_pilot_whose_sbatch_a_server_stop_killed_is_looked_for_at_the_next_start(
    start_server: Callable[..., HtcServer], tmp_path: Path
) -> None:
    """A stop kills the round's sbatch at once; Slurm may have queued that pilot already. Its row
    was written before sbatch, so the server's next start knows an answer is missing: its first
    round lists the queue's Slurm jobs and cancels the one no pilot row names (its agent would
    hold a node, getting no work, until the walltime), and the row ends saying why."""
    bin_dir, pids, cancelled, jobs = (
        tmp_path / "bin",
        tmp_path / "sbatch.pids",
        tmp_path / "scancel",
        tmp_path / "jobs",
    )
    _hanging(bin_dir, "sbatch", pids)
    fakes = {
        "squeue": f"#!/bin/sh\ncat {jobs} 2>/dev/null\nexit 0\n",  # the jobs Slurm has (none yet)
        "scancel": f'#!/bin/sh\necho "$@" >> {cancelled}\n: > {jobs}\n',
    }
    for name, text in fakes.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    srv = _server_with_a_pilot_due(start_server, bin_dir)
    _wait_for(pids.exists, "the pilot's sbatch")
    srv.stop()  # kills the hanging sbatch ...
    jobs.write_text("4242|PENDING|N/A|None\n")  # ... which Slurm had taken: its job, under the queue's name
    (bin_dir / "sbatch").write_text(
        "#!/bin/sh\necho 'sbatch: error: Batch job submission failed' >&2\nexit 1\n"
    )

    srv.restart()
    client = srv.client(prefix="")

    def pilots() -> list[dict[str, Any]]:
        (queue,) = client.get("/openhtc/v1/alloc/queues").json()["queues"]
        return list(queue["pilots"])

    _wait_for(lambda: [p["state"] for p in pilots()] == ["ended"], "the unanswered pilot to be given up", 30)
    assert cancelled.exists() and cancelled.read_text().split() == ["4242"], srv.log_tail()
    assert "Slurm job 4242 has no pilot here: cancelling it" in srv.log_tail()
    (pilot,) = pilots()
    assert "sbatch never answered" in pilot["detail"], pilot
