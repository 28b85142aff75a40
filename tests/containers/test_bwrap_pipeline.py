"""The bwrap runtime's fast path: a slot's next sandbox is set up while the current job runs and
released the moment it ends; job cgroups are pooled and reused.

Real bubblewrap, cgroups and a plain registry; the jobs tell their order through a host
directory they both see.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
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

from openhtc.domain.enums import FailureCode
from openhtc.runtimes.base import JobLog, Outcome, RunHandle
from openhtc.runtimes.bwrap import BwrapRuntime, Started, owner_tag

pytestmark = pytest.mark.one_db


@pytest.fixture(scope="module")
def runtime(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BwrapRuntime]:
    require_tool("bwrap")
    require_tool("docker-registry")
    registry = PlainRegistry(tmp_path_factory.mktemp("registry")).start()
    try:
        registry.push_layers("proj/bb", "1", [busybox_layer()])
        rt = BwrapRuntime(str(tmp_path_factory.mktemp("bwrap-work")), StaticSource(registry))
        rt.adopt(f"test-{uuid.uuid4().hex[:8]}@{os.getpid()}", uuid.uuid4().hex)
        yield rt
        rt.close()
    finally:
        registry.stop()


def _job(shared: Path, script: str, marker: str, **fields: Any) -> Any:
    """A busybox job running ``script`` with the host directory ``shared`` at /shared."""
    return launch(
        "bb:1",
        ["sh", "-c", script],
        envs={"HTC_PIPELINE_TEST": marker},
        mounts=[("SHARED", str(shared), "/shared", False)],
        **fields,
    )


def _start(rt: BwrapRuntime, job: Any, tmp: Path, after: Started | None = None) -> tuple[Started, list[str]]:
    running: list[str] = []
    log = JobLog(str(tmp / f"{job.job_id}.log"))
    started = rt.start(job, RunHandle(), log, lambda: running.append("running"), after)
    assert isinstance(started, Started), started
    return started, running


def test_the_next_job_is_set_up_while_the_current_runs_and_starts_when_it_ends(
    runtime: BwrapRuntime, tmp_path: Path
) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    first_marker, second_marker = uuid.uuid4().hex, uuid.uuid4().hex
    # The first job runs until the test lets it end; each job appends to one file.
    first, first_running = _start(
        runtime,
        _job(shared, "echo first-start >> /shared/order; while [ ! -e /shared/go ]; do sleep 0.05; done; "
             "echo first-end >> /shared/order", first_marker),
        tmp_path,
    )  # fmt: skip
    second, second_running = _start(
        runtime, _job(shared, "echo second-start >> /shared/order", second_marker), tmp_path, after=first
    )
    # The second sandbox exists (bwrap carries the job's environment) and waits: it has not run.
    wait_for(lambda: pids_with_env("HTC_PIPELINE_TEST", second_marker), what="the second sandbox")
    wait_for(lambda: (shared / "order").exists(), what="the first job to run")
    assert runtime.wait(first, 0.2) is False
    assert first_running == ["running"] and second_running == []
    assert (shared / "order").read_text().split() == ["first-start"]

    (shared / "go").touch()
    assert runtime.finish(first).succeeded
    assert runtime.finish(second).succeeded
    assert second_running == ["running"]
    assert (shared / "order").read_text().split() == ["first-start", "first-end", "second-start"]
    assert not pids_with_env("HTC_PIPELINE_TEST", first_marker)
    assert not pids_with_env("HTC_PIPELINE_TEST", second_marker)


def test_a_held_job_taken_back_or_cancelled_never_runs(runtime: BwrapRuntime, tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    first, _ = _start(runtime, _job(shared, "while [ ! -e /shared/go ]; do sleep 0.05; done", "a"), tmp_path)
    withdrawn_marker, cancelled_marker = uuid.uuid4().hex, uuid.uuid4().hex
    withdrawn, _ = _start(
        runtime, _job(shared, "touch /shared/withdrawn-ran", withdrawn_marker), tmp_path, after=first
    )
    assert runtime.withdraw(withdrawn) is True
    assert not pids_with_env("HTC_PIPELINE_TEST", withdrawn_marker)  # its sandbox is gone

    cancelled, running = _start(
        runtime, _job(shared, "touch /shared/cancelled-ran", cancelled_marker), tmp_path, after=first
    )
    cancelled.handle.stop()
    (shared / "go").touch()
    assert runtime.finish(first).succeeded
    outcome = runtime.finish(cancelled)
    assert outcome.failure_code == FailureCode.ErrorUnknownFailure.value, outcome
    assert running == []
    assert not (shared / "withdrawn-ran").exists() and not (shared / "cancelled-ran").exists()
    assert not pids_with_env("HTC_PIPELINE_TEST", cancelled_marker)
    # A job that has started cannot be taken back.
    third, _ = _start(runtime, _job(shared, "true", "c"), tmp_path)
    assert runtime.withdraw(third) is False
    assert runtime.finish(third).succeeded


def test_a_reused_cgroup_does_not_carry_an_earlier_jobs_oom_kill(
    runtime: BwrapRuntime, tmp_path: Path
) -> None:
    """Job cgroups are pooled: the job after an OOM kill in the same cgroup reports its own end."""
    shared = tmp_path / "shared"
    shared.mkdir()

    def run(script: str) -> Outcome:
        started, _ = _start(runtime, _job(shared, script, "oom", memory_mb=64), tmp_path)
        return runtime.finish(started)

    # tail keeps a whole newline-free input in memory: 300 MiB against a 64 MiB limit.
    oom = run("head -c 300m /dev/zero | tail")
    assert oom.failure_code == FailureCode.ErrorNotEnoughMemory.value, oom
    before = {cg.paths for idle in runtime.cgroups._idle.values() for cg in idle}
    assert before, "the cgroup went back to the pool"
    after_oom = run("exit 3")
    assert (after_oom.exit_code, after_oom.failure_code) == (
        3,
        FailureCode.ErrorNonZeroContainerExitCode.value,
    )
    again = run("head -c 300m /dev/zero | tail")
    assert again.failure_code == FailureCode.ErrorNotEnoughMemory.value, again


HELD_SCRIPT = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {support!r})
    from runtime_support import PlainRegistry, StaticSource, launch
    from openhtc.runtimes.base import JobLog, RunHandle
    from openhtc.runtimes.bwrap import BwrapRuntime
    registry = PlainRegistry.__new__(PlainRegistry)
    registry.url, registry.host = {url!r}, {host!r}
    runtime = BwrapRuntime({work!r}, StaticSource(registry))
    runtime.adopt({owner!r}, "first")
    mounts = [("SHARED", {shared!r}, "/shared", False)]
    def job(script, n):
        return launch("bb:1", ["sh", "-c", script], envs={{"HTC_PIPELINE_TEST": {marker!r}}}, mounts=mounts,
                      job_id=n)
    log = JobLog({shared!r} + "/log")
    first = runtime.start(job("sleep 300", 1), RunHandle(), log, lambda: None)
    runtime.start(job("touch /shared/held-ran", 2), RunHandle(), log, lambda: None, first)
    print("held", flush=True)
    time.sleep(600)
    """
)


def test_a_held_sandbox_never_runs_its_job_when_the_server_dies(
    runtime: BwrapRuntime, tmp_path: Path
) -> None:
    """kill -9 of the process holding a sandbox behind a running job: the held job never runs
    (bwrap's --block-fd would read EOF and go on), and the next incarnation removes it all."""
    registry = runtime.images.registry  # type: ignore[union-attr]
    shared, work, marker = tmp_path / "shared", str(tmp_path / "work"), uuid.uuid4().hex
    shared.mkdir()
    owner = f"test-{uuid.uuid4().hex[:8]}@{os.getpid()}"
    script = HELD_SCRIPT.format(
        support=str(Path(__file__).parent), url=registry.url, host=registry.host, work=work,
        owner=owner, shared=str(shared), marker=marker,
    )  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, start_new_session=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"held\n"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        # The running job dies with the server (--die-with-parent) and so does every bwrap.
        wait_for(lambda: not [p for p in pids_with_env("HTC_PIPELINE_TEST", marker) if _is_bwrap(p)],
                 what="the sandboxes' bwrap processes to die")  # fmt: skip
        assert not (shared / "held-ran").exists()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        second = BwrapRuntime(work, runtime.images)  # kills and unmounts what the first left
        second.adopt(owner, "second")
    wait_for(lambda: not pids_with_env("HTC_PIPELINE_TEST", marker), what="the held sandbox to be killed")
    assert second.cgroups.leftovers(owner_tag(owner)) == []
    second.close()
    assert not (shared / "held-ran").exists()


def _is_bwrap(pid: int) -> bool:
    """bwrap's outer process (not the sandbox's init, which is bwrap too, inside its own pid ns)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
        leader = os.getpgid(pid) == pid
    except OSError:
        return False
    return state != "Z" and cmdline[0].endswith(b"bwrap") and leader


def test_a_sandbox_killed_while_it_is_set_up_is_gone_not_an_error() -> None:
    """A cancel that comes while bwrap sets the sandbox up (before it told the child's pid): the
    runtime learns the sandbox is gone, with what bwrap said, and the job ends as stopped."""
    require_tool("bwrap")
    from openhtc.runtimes.sandbox import Sandbox, SandboxGone

    bwrap = shutil.which("bwrap")
    assert bwrap is not None
    sandbox = Sandbox([bwrap, "--ro-bind", "/", "/"], ["true"], {}, lambda: None)
    sandbox.kill()  # before it is set up, as handle.stop() does from another thread
    sandbox.proceed()
    with pytest.raises(SandboxGone):
        sandbox.wait_ready()
    assert sandbox.code is not None  # reaped: no process or descriptor of it is left


def test_a_sandbox_whose_cgroup_move_fails_leaves_no_descriptor_open() -> None:
    """The runtime's set-up (BwrapRuntime._spawn) kills and reaps the sandbox when moving bwrap
    into the job's cgroup fails (an OSError), before it ever reads bwrap's ``--info-fd``: that
    pipe is closed too, or each such failure leaks a descriptor for the agent's lifetime."""
    require_tool("bwrap")
    from openhtc.runtimes.sandbox import Sandbox

    bwrap = shutil.which("bwrap")
    assert bwrap is not None
    sandbox = Sandbox([bwrap, "--ro-bind", "/", "/"], ["true"], {}, lambda: None)
    held = (sandbox.out, sandbox._info, sandbox._block_w, sandbox._args_w)  # its pipes' ends
    pipes = {os.readlink(f"/proc/self/fd/{fd}") for fd in held if fd is not None and fd >= 0}
    assert len(pipes) == 4, pipes
    sandbox.kill()  # what _spawn does when job.cgroup.add(sandbox.pid) raises OSError
    sandbox.reap()
    left = []
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own descriptor, closed since
            if os.readlink(f"/proc/self/fd/{name}") in pipes:
                left.append(int(name))
    assert left == [], f"descriptors of the sandbox's pipes left open: {left}"


def test_a_cancel_just_after_a_job_ended_does_not_kill_the_next_job_in_its_cgroup(
    runtime: BwrapRuntime, tmp_path: Path
) -> None:
    """A job's cgroup goes back to the pool at its end and the next job with the same limits
    gets it: a cancel of the ended job that comes late (the heartbeat's, a user's) must not
    kill the job now in that cgroup."""
    shared = tmp_path / "shared"
    shared.mkdir()
    first, _ = _start(runtime, _job(shared, "true", uuid.uuid4().hex), tmp_path)
    assert runtime.finish(first).succeeded
    script = "sleep 1; echo done > /shared/second"
    second, _ = _start(runtime, _job(shared, script, uuid.uuid4().hex), tmp_path)
    time.sleep(0.3)  # it runs, in the cgroup the first job gave back
    first.handle.stop()  # the late cancel
    outcome = runtime.finish(second)
    assert outcome.succeeded, outcome
    assert (shared / "second").read_text() == "done\n"
