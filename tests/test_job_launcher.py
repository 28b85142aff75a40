"""The job launcher processes that spawn, watch and reap the process runtime's jobs.

Real processes throughout: each test starts its own launcher pool (a python process per
launcher) and runs shell commands through it.
"""

from __future__ import annotations

import os
import signal
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from openhtc.runtimes.launcher import LaunchedJob, Launcher


@pytest.fixture
def launcher() -> Iterator[Launcher]:
    pool = Launcher(processes=1)
    yield pool
    pool.close()


class Runner:
    def __init__(self, launcher: Launcher, root: Path) -> None:
        self.launcher = launcher
        self.root = root
        self.shared = launcher.shared_env({"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "SHARED": "yes"})
        self.started: list[int] = []
        self._lock = threading.Lock()
        self._count = 0

    def workdir(self) -> str:
        path = self.root / f"work-{len(list(self.root.glob('work-*')))}"
        path.mkdir(mode=0o700)
        return str(path)

    def start(
        self, script: str, *, cwd: str | None = None, after: LaunchedJob | None = None, **env: str
    ) -> tuple[LaunchedJob, Path]:
        with self._lock:
            self._count += 1
            log = self.root / "logs" / f"job-{self._count}.log"
        job = self.launcher.start(
            ["sh", "-c", script],
            self.shared,
            dict(env),
            cwd or self.workdir(),
            str(log),
            lambda: self.started.append(1),
            after,
        )
        return job, log

    def run(self, script: str, **kw: str) -> tuple[LaunchedJob, Path]:
        job, log = self.start(script, **kw)
        assert job.wait(30), "the job did not end"
        return job, log


@pytest.fixture
def runner(launcher: Launcher, tmp_path: Path) -> Runner:
    return Runner(launcher, tmp_path)


def log_lines(path: Path) -> list[str]:
    lines = path.read_text().splitlines()
    for line in lines:  # "{unix time}\t{line}"
        stamp, _, _ = line.partition("\t")
        assert abs(float(stamp) - time.time()) < 60, line
    return [line.partition("\t")[2] for line in lines]


def test_output_goes_to_the_log_with_a_timestamp_per_line(runner: Runner) -> None:
    job, log = runner.run('echo "one $SHARED $OWN"; echo two >&2; printf "no newline"', OWN="mine")
    assert job.returncode == 0 and job.error is None and not job.lost
    assert log_lines(log) == ["one yes mine", "two", "no newline"]


def test_a_silent_job_writes_no_log_file(runner: Runner) -> None:
    job, log = runner.run("true")
    assert job.returncode == 0
    assert not log.exists()


def test_a_job_inherits_only_stdin_stdout_and_stderr(runner: Runner) -> None:
    """Not the launcher's control socket, pipes or pidfds: a job holding one would keep a dead
    launcher's socket open (its jobs never reported lost) or could talk to the launcher."""
    job, log = runner.run("ls /proc/$$/fd")
    assert job.returncode == 0
    assert sorted(log_lines(log)) == ["0", "1", "2"]


def test_exit_codes_and_signals_come_back_as_popen_returncodes(runner: Runner) -> None:
    assert runner.run("exit 3")[0].returncode == 3
    assert runner.run("kill -TERM $$")[0].returncode == -signal.SIGTERM


def test_a_program_that_does_not_exist_fails_to_start(launcher: Launcher, tmp_path: Path) -> None:
    shared = launcher.shared_env({"PATH": "/usr/bin:/bin"})
    log = str(tmp_path / "log")
    job = launcher.start(["no-such-program-xyz"], shared, {}, str(tmp_path), log, lambda: None)
    assert job.wait(10)
    assert job.error is not None and "no-such-program-xyz" in job.error
    assert job.returncode is None


def test_kill_stops_the_whole_process_group(runner: Runner, tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    job, _ = runner.start(f"sleep 300 & echo $! > {pidfile}; wait")
    deadline = time.monotonic() + 10
    while not (pidfile.exists() and pidfile.read_text().strip()):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    child = int(pidfile.read_text())
    job.kill()
    assert job.wait(10)
    assert job.returncode == -signal.SIGKILL
    deadline = time.monotonic() + 10
    while _alive(child):
        assert time.monotonic() < deadline, "the job's background child survived the kill"
        time.sleep(0.05)


def _pids_running(argv_marker: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if cmdline.startswith(argv_marker) and _alive(int(entry)):
                found.append(int(entry))
    return found


def _wait_until(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 10
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_a_daemon_lives_while_its_job_runs_and_dies_when_it_ends(runner: Runner, tmp_path: Path) -> None:
    """A double fork into a new session with the environment cleared (no way back to the job
    but being the launcher's orphan) runs as long as its job does, and not a moment longer."""
    duration = f"3{time.monotonic_ns() % 100000}.5"  # an argv no other process has
    flag = tmp_path / "go"
    daemons = f"(setsid env -i sleep {duration} &); (setsid sleep {duration} &)"
    script = f"{daemons}; while [ ! -e {flag} ]; do sleep 0.05; done"
    job, _ = runner.start(script)
    _wait_until(lambda: len(_pids_running(f"sleep {duration}")) == 2, "both daemons to run")
    assert runner.run("true")[0].returncode == 0  # another job's end sweeps for orphans
    time.sleep(0.3)  # and so do the sweeps after it: a running job's daemons are left alone
    assert len(_pids_running(f"sleep {duration}")) == 2
    flag.touch()
    assert job.wait(10) and job.returncode == 0
    _wait_until(lambda: not _pids_running(f"sleep {duration}"), "the daemons to be killed")


def test_a_job_ends_when_its_main_process_exits_even_if_a_child_holds_its_output(runner: Runner) -> None:
    duration = f"3{time.monotonic_ns() % 100000}.25"
    job, log = runner.run(f"setsid sleep {duration} & echo main done")
    assert job.returncode == 0
    assert log_lines(log) == ["main done"]
    _wait_until(lambda: not _pids_running(f"sleep {duration}"), "the leftover to be killed")


def test_a_dirty_working_directory_is_emptied_before_the_next_job(runner: Runner, tmp_path: Path) -> None:
    cwd = runner.workdir()
    runner.run("mkdir -p deep/er && echo x > deep/er/file && echo y > top && chmod 0755 .", cwd=cwd)
    second, log = runner.run("ls -A | wc -l; pwd", cwd=cwd)
    assert second.returncode == 0
    assert [line.strip() for line in log_lines(log)] == ["0", cwd]
    assert stat.S_IMODE(os.stat(cwd).st_mode) == 0o700


def test_a_job_held_after_another_starts_when_that_one_ends(runner: Runner, tmp_path: Path) -> None:
    first, _ = runner.start(f"sleep 0.3; date +%s.%N > {tmp_path}/first-ended")
    held, log = runner.start("date +%s.%N", after=first)
    assert held.wait(30) and first.returncode == 0
    ended_first = float((tmp_path / "first-ended").read_text())
    assert float(log_lines(log)[0]) >= ended_first


def test_a_held_job_can_be_withdrawn_until_it_starts(runner: Runner, tmp_path: Path) -> None:
    first, _ = runner.start("sleep 300")
    held, _ = runner.start(f"touch {tmp_path}/ran", after=first)
    assert not held.wait(0.3), "a held job ran before the one it waits for ended"
    assert held.withdraw() is True
    assert held.wait(0) and held.withdrawn and held.pid is None
    first.kill()
    assert first.wait(10)
    time.sleep(0.3)
    assert not (tmp_path / "ran").exists(), "a withdrawn job ran"
    # Once it has started, it is not withdrawn.
    running, _ = runner.start("sleep 300")
    _wait_for_pid(running)
    assert running.withdraw() is False
    assert not running.withdrawn and not running.wait(0.2)
    running.kill()
    assert running.wait(10)


def test_two_threads_withdrawing_one_held_job_both_get_the_answer(runner: Runner) -> None:
    """A worker and the executor's stop may withdraw the same held job at once: neither may
    wait forever for an answer the other one took."""
    first, _ = runner.start("sleep 300")
    for _ in range(20):
        held, _ = runner.start("true", after=first)
        barrier = threading.Barrier(2)
        answers: list[bool] = []

        threads = [
            threading.Thread(target=_withdraw_after, args=(held, barrier, answers), daemon=True)
            for _ in range(2)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert answers == [True, True], "a withdraw never got its answer"
    first.kill()
    assert first.wait(10)


def _withdraw_after(job: LaunchedJob, barrier: threading.Barrier, answers: list[bool]) -> None:
    barrier.wait()
    answers.append(job.withdraw())


def test_killing_a_held_job_lets_the_one_behind_it_start(runner: Runner) -> None:
    first, _ = runner.start("sleep 300")
    second, _ = runner.start("true", after=first)
    third, _ = runner.start("true", after=second)
    second.kill()
    assert second.wait(10) and second.returncode == -signal.SIGKILL and second.pid is None
    assert third.wait(10) and third.returncode == 0
    first.kill()
    assert first.wait(10)


def test_jobs_of_a_launcher_that_dies_are_killed_and_marked_lost(launcher: Launcher, runner: Runner) -> None:
    job, _ = runner.start("sleep 300")
    _wait_for_pid(job)
    proc = job.process._proc
    assert proc is not None
    proc.kill()  # the launcher process, not the job
    assert job.wait(10)
    assert job.lost and job.returncode is None
    deadline = time.monotonic() + 10
    while _alive(job.pid):
        assert time.monotonic() < deadline, "the lost job's process still runs"
        time.sleep(0.05)
    # The next job gets a new launcher process.
    again, _ = runner.run("true")
    assert again.returncode == 0 and not again.lost


def test_closing_the_launcher_kills_what_still_runs(tmp_path: Path) -> None:
    pool = Launcher(processes=2)
    runner = Runner(pool, tmp_path)
    jobs = [runner.start("sleep 300")[0] for _ in range(4)]
    deadline = time.monotonic() + 10
    while any(job.pid is None for job in jobs):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    pool.close()
    deadline = time.monotonic() + 10
    while any(_alive(job.pid) for job in jobs):
        assert time.monotonic() < deadline, "jobs survived the launcher's close"
        time.sleep(0.05)


def _wait_for_pid(job: LaunchedJob) -> None:
    deadline = time.monotonic() + 10
    while job.pid is None:
        assert time.monotonic() < deadline, "the job did not start"
        time.sleep(0.02)


def _alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


# -- through the server: the executor pipelines a slot's next job ------------------------------


def test_short_jobs_do_not_wait_behind_a_long_one(start_server: Callable[..., Any]) -> None:
    """The executor hands a slot's next job to the launcher while the current one runs; behind
    a long job, that next one is taken back and run as soon as another slot is free."""
    api = start_server(env={"OPENHTC_EXECUTOR_VCPUS": "2"}).api()
    pid, tid = api.project_and_task()
    script = 'if [ "$AWS_BATCH_JOB_ARRAY_INDEX" = 0 ]; then sleep 120; fi'
    parent = api.submit_one(pid, tid, api.job_request(["sh", "-c", script], batch_size=12))["parentJobId"]
    jobs = api.wait_jobs(
        pid,
        tid,
        lambda js: len(js) == 12 and sum(j["status"] == "SUCCEEDED" for j in js) == 11,
        timeout=60,
        what="the 11 short jobs to succeed while the long one runs",
    )
    long_job = next(j for j in jobs if j["jobUUID"] == f"{parent}:0")
    assert long_job["status"] == "RUNNING", long_job
    api.cancel(pid, tid)
    api.wait_terminal(pid, tid, 12)


def test_an_exit_and_its_output_seen_in_one_wakeup_end_the_job_once(tmp_path: Path) -> None:
    """One epoll wake-up can carry both a job's exit and its last output; the exit, handled
    first, drains and closes the pipe, and the output event must not take the launcher down
    (it did, under load: every job it held was then lost)."""
    import socket

    from openhtc.runtimes.launcher_loop import Decoder, Loop

    ours, theirs = socket.socketpair()
    loop = Loop(theirs)
    work = tmp_path / "work"
    work.mkdir(mode=0o700)
    log = tmp_path / "job.log"
    loop._start(
        1,
        ["sh", "-c", "echo last words"],
        {"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        str(work),
        str(log),
    )
    job = loop.jobs[1]
    os.waitid(os.P_PIDFD, job.pidfd, os.WEXITED | os.WNOWAIT)  # exited, output still in the pipe
    loop._reap(job)
    loop._output(job)  # the stale event of the same wake-up
    messages = Decoder().feed(b"".join(loop.replies))
    assert [m[0] for m in messages] == ["started", "exited"]
    assert messages[-1][2] == 0
    assert "last words" in log.read_text()
    ours.close()
    theirs.close()
