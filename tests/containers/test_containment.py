"""Containment and output limits on every runtime (process, bwrap, podman).

A job is its main process: when it exits the job has ended, and whatever it left running is
killed, ``setsid`` and ``nohup`` descendants included; the same at timeout, at cancel and when
the server stops (SIGTERM). Output past ``max_log_bytes`` is discarded after one marker line,
and a log that cannot be written (a full disk) loses output, never the job nor its launcher.
Leftovers are found in /proc by a marker variable in the job's environment.
"""

from __future__ import annotations

import os
import subprocess
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from runtime_support import (
    PlainRegistry,
    StaticSource,
    busybox_layer,
    launch,
    pids_with_env,
    require_tool,
    wait_for,
)

from openhtc.runtimes import build_runtime
from openhtc.runtimes.base import JobLog, Outcome, RunHandle

pytestmark = pytest.mark.one_db

KINDS = ["process", "bwrap", "podman"]
LOG_CAP = 20_000
# A main process that leaves a setsid'd and a nohup'd child running, then exits.
ESCAPE = "setsid sleep 300 & nohup sleep 300 >/dev/null 2>&1 & echo x"


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PlainRegistry]:
    require_tool("docker-registry")
    reg = PlainRegistry(tmp_path_factory.mktemp("registry")).start()
    reg.push_layers("proj/bb", "1", [busybox_layer()])
    yield reg
    reg.stop()


@pytest.fixture(scope="module")
def runtimes(images: PlainRegistry, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    made: dict[str, Any] = {}
    yield made
    for runtime in made.values():
        runtime.close()


@pytest.fixture(params=KINDS)
def runtime(request: pytest.FixtureRequest, runtimes: dict[str, Any], images: PlainRegistry) -> Any:
    kind = request.param
    if kind != "process":
        require_tool(kind)
    if kind not in runtimes:
        work = request.getfixturevalue("tmp_path_factory").mktemp(f"{kind}-work")
        made = build_runtime(kind, str(work), StaticSource(images), max_log_bytes=LOG_CAP)
        made.adopt(f"test-{uuid.uuid4().hex[:8]}@{os.getpid()}", uuid.uuid4().hex)
        runtimes[kind] = made
    return runtimes[kind]


class Marked:
    """A job's marker variable and the processes carrying it."""

    def __init__(self) -> None:
        self.name, self.value = "HTC_CONTAINMENT_TEST", uuid.uuid4().hex

    @property
    def envs(self) -> dict[str, str]:
        return {self.name: self.value}

    def pids(self) -> list[int]:
        return pids_with_env(self.name, self.value)

    def gone(self, what: str) -> None:
        wait_for(lambda: not self.pids(), timeout=15, what=f"the job's processes to be gone {what}")

    def kill(self) -> None:
        for pid in self.pids():
            os.kill(pid, 9)


@pytest.fixture
def marked() -> Iterator[Marked]:
    mark = Marked()
    yield mark
    mark.kill()


def run_async(runtime: Any, job: Any, log: Path, handle: RunHandle) -> tuple[threading.Thread, list[Outcome]]:
    out: list[Outcome] = []
    thread = threading.Thread(
        target=lambda: out.append(runtime.run(job, handle, JobLog(str(log)), lambda: None))
    )
    thread.start()
    return thread, out


def ended(thread: threading.Thread, out: list[Outcome]) -> Outcome:
    thread.join(60)
    assert not thread.is_alive() and out, "the job did not end"
    return out[0]


def lines(log: Path) -> list[str]:
    return [line.split("\t", 1)[1] for line in log.read_text().splitlines()] if log.exists() else []


def test_a_job_ends_with_its_main_process_and_its_escaped_children_die(
    runtime: Any, marked: Marked, tmp_path: Path
) -> None:
    log = tmp_path / "job.log"
    job = launch("bb:1", ["sh", "-c", ESCAPE], envs=marked.envs)
    outcome = ended(*run_async(runtime, job, log, RunHandle()))
    assert outcome.succeeded, outcome
    assert lines(log) == ["x"]
    marked.gone("after the job ended")


def test_timeout_kills_setsid_and_nohup_children(runtime: Any, marked: Marked, tmp_path: Path) -> None:
    job = launch("bb:1", ["sh", "-c", f"{ESCAPE}; sleep 300"], envs=marked.envs, timeout_s=2)
    outcome = ended(*run_async(runtime, job, tmp_path / "job.log", RunHandle()))
    assert outcome.failure_code == "ErrorTimeout", outcome
    marked.gone("after the timeout")


def test_cancel_kills_setsid_and_nohup_children(runtime: Any, marked: Marked, tmp_path: Path) -> None:
    handle = RunHandle()
    job = launch("bb:1", ["sh", "-c", f"{ESCAPE}; sleep 300"], envs=marked.envs)
    thread, out = run_async(runtime, job, tmp_path / "job.log", handle)
    wait_for(lambda: len(marked.pids()) >= 2, what="the job and its children to run")
    handle.stop()
    assert ended(thread, out).failure_code == "ErrorUnknownFailure", out
    marked.gone("after the cancel")


def test_output_past_the_cap_is_discarded_after_one_marker_and_the_job_runs_on(
    runtime: Any, tmp_path: Path
) -> None:
    log = tmp_path / "job.log"
    script = "i=0; while [ $i -lt 2000 ]; do echo line-$i-0123456789; i=$((i+1)); done; exit 3"
    outcome = ended(*run_async(runtime, launch("bb:1", ["sh", "-c", script]), log, RunHandle()))
    assert outcome.exit_code == 3, outcome  # it ran to its end
    got = lines(log)
    assert got[0] == "line-0-0123456789"
    assert got[-1].startswith("[openhtc] output truncated: the job wrote more than 20000 bytes")
    assert sum("output truncated" in line for line in got) == 1
    kept = got[:-1]
    assert kept == [f"line-{i}-0123456789" for i in range(len(kept))]
    assert LOG_CAP - 30 < sum(len(line) + 1 for line in kept) <= LOG_CAP


def test_a_running_jobs_output_reaches_its_log_before_the_job_ends(runtime: Any, tmp_path: Path) -> None:
    """A log is read while its job runs (the logs route, the dashboard): output written so far
    must be in the file then, not in a buffer that only the job's end flushes."""
    log = tmp_path / "job.log"
    handle = RunHandle()
    thread, out = run_async(runtime, launch("bb:1", ["sh", "-c", "echo early; sleep 300"]), log, handle)
    try:
        wait_for(lambda: lines(log) == ["early"], timeout=30, what="the first line in the log")
        assert thread.is_alive()
    finally:
        handle.stop()
    ended(thread, out)


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs for job logs (root only)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_loses_one_jobs_output_not_the_job_nor_the_others(
    runtime: Any, full_disk: Path, tmp_path: Path
) -> None:
    """ENOSPC on one job's log: that job's output is cut, it still succeeds; a job beside it on
    a disk with room keeps all of its output, and the runtime runs the next job."""
    (full_disk / "filler").write_bytes(b"\0" * (1024 * 1024 - 8192))  # 8 KiB left
    chatty = "i=0; while [ $i -lt 3000 ]; do echo chatty-$i; i=$((i+1)); done; echo end-of-chatty >&2"
    quiet = "sleep 1; echo one; sleep 1; echo two"
    a = run_async(runtime, launch("bb:1", ["sh", "-c", chatty]), full_disk / "a.log", RunHandle())
    b_log = tmp_path / "b.log"
    b = run_async(runtime, launch("bb:1", ["sh", "-c", quiet]), b_log, RunHandle())
    assert ended(*a).succeeded
    assert ended(*b).succeeded
    assert lines(b_log) == ["one", "two"]
    after = tmp_path / "after.log"
    assert ended(*run_async(runtime, launch("bb:1", ["echo", "still here"]), after, RunHandle())).succeeded
    assert lines(after) == ["still here"]
    if runtime.name == "process":  # the launcher process lived through it
        assert all(p._proc is None or p._proc.poll() is None for p in runtime.launcher._processes)


# -- through the server ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_server_ends_jobs_at_their_main_exit_frees_cancelled_slots_and_stops_clean(
    kind: str, registry_server: Any, registry_project: Any, busybox_image: str, start_server: Any
) -> None:
    """Issue 13's case: ``setsid sleep & echo x`` SUCCEEDS at once (it stayed RUNNING 150 s);
    with one slot, cancelling a job whose children escaped lets the next job run; SIGTERM
    stops the server (not the fixture's SIGKILL) and kills a running job's whole tree. (No
    infrastructure re-run, so the killed job's charge shows as its failure.)"""
    env = {"OPENHTC_EXECUTOR_VCPUS": "1", "OPENHTC_MAX_INFRASTRUCTURE_RETRIES": "0"}
    if kind == "process":
        server = start_server(runtime="process", env=env)
        api = server.api()
        pid = api.create_project()["projectId"]
        image = "busybox:latest"
    else:
        require_tool(kind)
        server = registry_server(runtime=kind, executor=True, env=env)
        project = registry_project(server)
        project.push(busybox_image, "bb:1")
        api, pid, image = project.api, project.project_id, "bb:1"
    tid = api.create_task(pid)["taskId"]
    marks = {name: Marked() for name in ("ends", "cancelled", "stopped")}
    try:

        def submit(name: str, script: str, **kw: Any) -> str:
            envs = [{"name": marks[name].name, "value": marks[name].value}] if name in marks else []
            request = api.job_request(["sh", "-c", script], imageName=image, envs=envs, max_retries=0, **kw)
            return str(api.submit(pid, tid, request, group=name)[0]["parentJobId"]) + ":0"

        def status(job_id: str) -> str:
            return str(api.job(pid, tid, job_id)["status"])

        ends = submit("ends", "setsid sleep 150 & echo x", execTimeoutSeconds=60)
        wait_for(lambda: status(ends) == "SUCCEEDED", timeout=45, what="the job to end with its main process")
        assert api.log_lines(pid, tid, ends) == ["x"]
        marks["ends"].gone("after the job ended")

        cancelled = submit("cancelled", ESCAPE + "; sleep 300")
        wait_for(lambda: status(cancelled) == "RUNNING", timeout=60, what="the job to run")
        wait_for(lambda: len(marks["cancelled"].pids()) >= 2, what="its children to run")
        behind = submit("behind", "echo next")  # waits for the one slot
        api.cancel(pid, tid, "cancelled")
        wait_for(lambda: status(behind) == "SUCCEEDED", timeout=45, what="the next job to get the freed slot")
        marks["cancelled"].gone("after the cancel")

        stopped = submit("stopped", ESCAPE + "; sleep 300")
        wait_for(lambda: status(stopped) == "RUNNING", timeout=60, what="the job to run")
        wait_for(lambda: len(marks["stopped"].pids()) >= 2, what="its children to run")
        assert server.proc is not None
        server.stop()  # SIGTERM; the fixture would SIGKILL after 15 s
        assert server.proc.returncode == 0, f"the server did not stop on SIGTERM ({server.proc.returncode})"
        marks["stopped"].gone("after the server stopped")
        server.restart()  # the stop reported the killed job: as after a crash, it may have run
        job = server.api().job(pid, tid, stopped)
        assert (job["status"], job["failureCode"], job["statusReason"]) == (
            "FAILED",
            "ErrorInfrastructureFault",
            "Infrastructure fault: the server stopped while the job ran",
        )
    finally:
        for mark in marks.values():
            mark.kill()
