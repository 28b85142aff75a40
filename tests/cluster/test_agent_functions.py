"""Function calls on `htc agent`: a real server with no executor of its own (`--no-executor`) and a
real agent process (process runtime) run `Task.map` as the embedded executor does.

What a user notices: results come back in order; a handler's exception is a `FunctionError`
with the remote traceback; a worker that crashes mid-call is retried per the retry strategy; a call
over its timeout fails (`TimeoutError`) and the next ones run; cancel
stops the calls running on the agent (their workers are killed); a
result over the size limit comes back intact (kept in task storage); the handlers come from a
zip in the project's shared storage. And, playing the agent over HTTP: a call's result is
stored with its end, once; a stale attempt's result is refused.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import textwrap
import time
import uuid
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from openhtc.client import Connection, FunctionError, Session, Task
from openhtc.client.storage import StorageClient
from openhtc.domain.enums import JobStatus
from openhtc.testing.server import DEFAULT_REGION, HtcServer, htc_command

IMAGE = "busybox:latest"  # the process runtime runs the handler with the agent's python3
LIMIT = 4096  # the server's function_result_max_bytes here: larger results go to task storage
HANDLERS = textwrap.dedent(
    """
    import os
    import time


    def double(event, context):
        return event["x"] * 2


    def late_first(event, context):
        import time
        if event["x"] < 3:
            time.sleep(0.2)
        return event["x"] * 2


    def fail_odd(event, context):
        if event["x"] % 2:
            raise ValueError(f"odd x: {event['x']}")
        return event["x"]


    def crash_once(event, context):
        # the first attempt's worker dies mid-call; the retry answers
        marker = event["marker"]
        if not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(3)
        return {"x": event["x"], "attempt": context.attempt}


    def pid_then_sleep(event, context):
        with open(os.path.join(event["dir"], str(event["x"])), "w") as out:
            out.write(str(os.getpid()))
        time.sleep(120)


    def sleepy(event, context):
        time.sleep(event["sleep"])
        return event["x"]


    def huge_error(event, context):
        raise ValueError("e" * event["size"])


    def big(event, context):
        return [event["x"]] + ["y" * 1000] * (event["size"] // 1000)
    """
)


def _zip(source: str) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("agent_handlers.py", source)
    return buf.getvalue()


@pytest.fixture(scope="module")
def agent_server(
    tmp_path_factory: pytest.TempPathFactory, db_kind: str, request: pytest.FixtureRequest
) -> Iterator[HtcServer]:
    """A server without an executor of its own, and one `htc agent` (process runtime, 2 vCPUs)."""
    db_url = None if db_kind == "sqlite" else request.getfixturevalue("pg_cluster").new_database()
    env = {"OPENHTC_FUNCTION_RESULT_MAX_BYTES": str(LIMIT), "OPENHTC_MAX_INFRASTRUCTURE_RETRIES": "0"}
    srv = HtcServer(tmp_path_factory.mktemp("htc-data"), db_url, env=env, args=("--no-executor",))
    srv.start()
    work = tmp_path_factory.mktemp("agent")
    token = srv.cli("admin", "create-agent-token").stdout.strip()
    agent_env = {k: v for k, v in os.environ.items() if not k.startswith("OPENHTC_")}
    agent_env.update({"OPENHTC_AGENT_TOKEN": token, "OPENHTC_AGENT_SERVER": srv.url})
    cmd = [*htc_command(), "agent", "--runtime", "process", "--vcpus", "2", "--work-dir", str(work)]
    with open(work / "agent.log", "ab") as out:
        agent = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=agent_env,
            start_new_session=True,
        )  # fmt: skip
    try:
        yield srv
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.send_signal(signal.SIGTERM)  # the second kills what still runs
        try:
            agent.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(agent.pid, signal.SIGKILL)
            agent.wait(timeout=10)
        print((work / "agent.log").read_text(errors="replace")[-5000:])
        srv.stop()


@pytest.fixture
def task(agent_server: HtcServer, tmp_path: Path) -> Iterator[Task]:
    """A fresh task whose project holds handlers.zip in its shared storage."""
    api = agent_server.api()
    pid, tid = api.project_and_task()
    code = tmp_path / "handlers.zip"
    code.write_bytes(_zip(HANDLERS))
    with Session(connection=Connection(agent_server.url, api_key=agent_server.api_key)) as htc:
        with StorageClient.for_project(htc.connection, pid) as store:
            store.upload(code, store.resolve("handlers.zip"))
        yield htc.task(pid, tid)
    api.cancel_created_tasks()


def test_map_on_an_agent_returns_the_results_in_order(task: Task) -> None:
    events = [{"x": i} for i in range(300)]
    assert task.map(IMAGE, "agent_handlers.late_first", events, code="handlers.zip") == [
        2 * i for i in range(300)
    ]


def test_a_raising_handler_gives_function_error_with_the_remote_traceback(task: Task) -> None:
    with pytest.raises(FunctionError) as caught:
        task.map(IMAGE, "agent_handlers.fail_odd", [{"x": i} for i in range(4)], code="handlers.zip")
    error = caught.value
    assert (error.index, error.type, error.message) == (1, "ValueError", "odd x: 1")
    assert error.failure_code == "ErrorFunction"
    assert "fail_odd" in error.traceback and "raise ValueError" in error.traceback
    # an error larger than a report may carry (here 2 MB, over the server's string limit) is cut
    with pytest.raises(FunctionError) as caught:
        task.map(IMAGE, "agent_handlers.huge_error", [{"size": 2_000_000}], code="handlers.zip")
    assert caught.value.type == "ValueError" and caught.value.message.startswith("eeee")
    assert caught.value.message.endswith("(cut)") and len(caught.value.message) < LIMIT
    assert "raise ValueError" in caught.value.traceback


def test_a_worker_crash_mid_call_is_retried_per_the_retry_strategy(task: Task, tmp_path: Path) -> None:
    marker = tmp_path / "crashed"
    events = [{"x": 0, "marker": str(marker)}]
    out = task.map(IMAGE, "agent_handlers.crash_once", events, code="handlers.zip", retries=1)
    assert out == [{"x": 0, "attempt": 2}] and marker.exists()
    # without a retry the crash is the call's failure, with the worker's exit code in its reason
    marker2 = tmp_path / "crashed-again"
    with pytest.raises(FunctionError) as caught:
        task.map(IMAGE, "agent_handlers.crash_once", [{"x": 1, "marker": str(marker2)}], code="handlers.zip")
    assert caught.value.failure_code == "ErrorNonZeroContainerExitCode"
    assert "exited with code 3 during the call" in caught.value.message


def test_a_call_over_its_timeout_fails_and_the_next_calls_run(task: Task) -> None:
    events = [{"x": 0, "sleep": 30}, {"x": 1, "sleep": 0}, {"x": 2, "sleep": 0}]
    out = task.map(
        IMAGE, "agent_handlers.sleepy", events, code="handlers.zip", timeout=1, return_exceptions=True
    )
    first = out[0]
    assert isinstance(first, FunctionError), out
    assert (first.type, first.failure_code) == ("TimeoutError", "ErrorTimeout")
    assert out[1:] == [1, 2]


def test_cancel_stops_the_calls_running_on_the_agent(task: Task, tmp_path: Path) -> None:
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    events = [{"x": i, "dir": str(pid_dir)} for i in range(2)]
    batch = task.submit_functions(IMAGE, "agent_handlers.pid_then_sleep", events, code="handlers.zip")
    deadline = time.monotonic() + 60
    while sum(1 for f in pid_dir.iterdir() if f.read_text().strip()) < 2:  # both calls run
        assert time.monotonic() < deadline, "the calls did not start"
        time.sleep(0.1)
    pids = [int((pid_dir / str(i)).read_text()) for i in range(2)]
    assert batch.cancel() == 2
    counts = batch.wait(timeout=60)
    assert (counts.done, counts.failed) == (2, 2)
    deadline = time.monotonic() + 30
    while any(_alive(pid) for pid in pids):  # the agent killed their workers
        assert time.monotonic() < deadline, f"workers still running: {pids}"
        time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_results_over_the_size_limit_come_back_intact(task: Task, agent_server: HtcServer) -> None:
    sizes = [100, 100_000, 3_000_000]  # under the limit, over it (yet under the agent's default), far over
    events = [{"x": i, "size": size} for i, size in enumerate(sizes)]
    batch = task.submit_functions(IMAGE, "agent_handlers.big", events, code="handlers.zip")
    results = [result for _, result in batch.results(timeout=120)]
    for i, size in enumerate(sizes):
        assert results[i] == [i] + ["y" * 1000] * (size // 1000)
    # the large ones are in the task's storage, where the embedded executor puts them too
    api = agent_server.api()
    listed = api.get(
        f"{agent_server.url}/htc/storage/list",
        prefix=f"projects/{task.project_id}/tasks/{task.id}/function-results/",
    )
    names = sorted(item["key"].rsplit("/", 1)[1] for item in listed["items"])
    assert names == ["1.json", "2.json"]


# -- the protocol, played by the test ------------------------------------------------------------


class FakeAgent:
    def __init__(self, srv: HtcServer) -> None:
        token = srv.cli("admin", "create-agent-token").stdout.strip()
        self.http = httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {token}"}, timeout=60)
        self.agent_id = f"agent-fake-{uuid.uuid4().hex[:6]}"
        self.incarnation = uuid.uuid4().hex
        body = {"agent_id": self.agent_id, "incarnation": self.incarnation, "region": DEFAULT_REGION,
                "architectures": ["X86"], "capacity": {"vcpus": 1, "memory_mb": 1024}}  # fmt: skip
        resp = self.http.post("/openhtc/v1/agents/register", json=body)
        assert resp.status_code == 200, resp.text
        assert resp.json()["function_result_max_bytes"] == LIMIT

    def exchange(self, reports: list[dict[str, Any]] = (), max_jobs: int = 0) -> dict[str, Any]:  # type: ignore[assignment]
        resp = self.post_exchange(reports, max_jobs)
        assert resp.status_code == 200, resp.text
        return dict(resp.json())

    def post_exchange(self, reports: list[dict[str, Any]] = (), max_jobs: int = 0) -> httpx.Response:  # type: ignore[assignment]
        body = {"incarnation": self.incarnation, "free": {"vcpus": 1, "memory_mb": 1024},
                "max_jobs": max_jobs, "reports": list(reports),
                "wait_seconds": 1.0 if max_jobs else 0}  # fmt: skip
        return self.http.post(f"/openhtc/v1/agents/{self.agent_id}/exchange", json=body)


def _report(lease: dict[str, Any], seq: int, status: JobStatus, **extra: Any) -> dict[str, Any]:
    return {"job_id": lease["job_id"], "attempt": lease["attempt"], "seq": seq, "status": int(status),
            "at": time.time(), **extra}  # fmt: skip


def test_a_reported_result_is_stored_once_and_a_stale_attempts_is_refused(
    start_server: Callable[..., HtcServer],
) -> None:
    # a server of its own: the module's real agent would take the calls
    srv = start_server(args=("--no-executor",), env={"OPENHTC_FUNCTION_RESULT_MAX_BYTES": str(LIMIT)})
    api = srv.api()
    pid, tid = api.project_and_task()
    base = f"{srv.url}/openhtc/v1/projects/{pid}/tasks/{tid}/functions"
    events = [{"x": 7}, {"x": 8}, {"x": 9}]
    batch = api.post(base, {"image": IMAGE, "handler": "m.f", "events": events}, expect=201)
    agent = FakeAgent(srv)
    leases: list[dict[str, Any]] = []
    deadline = time.monotonic() + 30
    while len(leases) < 3 and time.monotonic() < deadline:
        leases += agent.exchange(max_jobs=3 - len(leases))["leases"]
    assert sorted(json.loads(lease["event"])["x"] for lease in leases) == [7, 8, 9]  # events ride the leases
    first, second, third = sorted(leases, key=lambda lease: lease["array_index"])

    def run(lease: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
        ended = _report(lease, 3, JobStatus.SUCCEEDED, exit_code=0, result=result)
        return agent.exchange(
            [_report(lease, 1, JobStatus.STARTING), _report(lease, 2, JobStatus.RUNNING), ended]
        )

    assert len(run(first, {"result": "14"})["acked"]) == 3
    # the same end again with another value, as a resend (same seq) and as one the server has no
    # memory of (a later seq, say after its restart): neither changes the stored result
    again = _report(first, 3, JobStatus.SUCCEEDED, exit_code=0, result={"result": "99"})
    assert agent.exchange([again])["acked"] == [[first["job_id"], first["attempt"], 3]]
    agent.exchange([{**again, "seq": 4}])
    # an attempt that is not the current one: refused, and its result is not stored
    assert len(run(second, {"result": "16"})["acked"]) == 3
    stale = _report(
        {**second, "attempt": second["attempt"] + 1}, 1, JobStatus.SUCCEEDED, result={"result": "66"}
    )
    assert agent.exchange([stale])["refused"] == [[second["job_id"], second["attempt"] + 1]]
    # a large result's key must be its own call's: else a 400, and the call is not ended
    wrong = _report(third, 1, JobStatus.SUCCEEDED, result={"result_key": "elsewhere.json"})
    assert agent.post_exchange([wrong]).status_code == 400
    assert len(run(third, {"result": "18"})["acked"]) == 3
    page = api.get(f"{base}/{batch['batchId']}/results", **{"from": 0, "wait": 0})
    assert [(i["index"], i["status"], i["result"]) for i in page["items"]] == [
        (0, "SUCCEEDED", 14),
        (1, "SUCCEEDED", 16),
        (2, "SUCCEEDED", 18),
    ]
