"""Function tasks from the client's side, against a real server (process runtime): ``Task.map``,
``FunctionBatch`` (results streamed in order, wait, cancel), ``FunctionError``, ``htc map`` and
the HTC-Grid-style connector. The handlers come as a zip in the project's shared storage."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from openhtc.client import Connection, FunctionError, Session, Task, functions
from openhtc.client.htcgrid import HtcGridConnector
from openhtc.client.storage import StorageClient
from openhtc.testing.server import HtcApi, HtcServer, htc_command

IMAGE = "busybox:latest"  # the process runtime runs the handler with the host's python3
HANDLERS = textwrap.dedent(
    """
    import os
    import time


    def double(event, context):
        return event["x"] * 2


    def fail_odd(event, context):
        if event["x"] % 2:
            raise ValueError(f"odd x: {event['x']}")
        return event["x"]


    def gated(event, context):
        # calls after the first wait until the test opens the gate (a file), or end on their own
        if event["x"] > 0:
            while not os.path.exists(event["gate"]) and context.get_remaining_time_in_millis() > 1000:
                time.sleep(0.01)
        return event["x"]


    def late_first(event, context):
        # the first calls end last: the results must still come back in event order
        if event["x"] < 3:
            time.sleep(0.3)
        return event["x"] * 2
    """
)


@pytest.fixture(scope="module")
def handlers_zip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("code") / "handlers.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("fc_handlers.py", HANDLERS)
    return path


@pytest.fixture
def task(api: HtcApi, module_server: HtcServer, handlers_zip: Path) -> Iterator[Task]:
    """A fresh task whose project holds handlers.zip in its shared storage."""
    pid, tid = api.project_and_task()
    with Session(connection=Connection(module_server.url, api_key=module_server.api_key)) as htc:
        with StorageClient.for_project(htc.connection, pid) as store:
            store.upload(handlers_zip, store.resolve("handlers.zip"))
        yield htc.task(pid, tid)


def test_map_returns_the_results_in_event_order(task: Task) -> None:
    events = [{"x": i} for i in range(200)]
    results = task.map(IMAGE, "fc_handlers.late_first", events, code="handlers.zip")
    assert results == [2 * i for i in range(200)]
    # more events than one submission holds go in several batches; the indices run on
    batch = functions.submit_functions(
        task, IMAGE, "fc_handlers.double", events[:25], code="handlers.zip", chunk_size=10
    )
    assert len(batch.batch_ids) == 3 and batch.count == 25
    assert list(batch.results()) == [(i, 2 * i) for i in range(25)]
    assert batch.wait().done == 25


@pytest.mark.one_db
def test_an_event_that_is_not_json_is_named_and_nothing_is_submitted(task: Task) -> None:
    events: list[Any] = [{"x": i} for i in range(5)] + [{"x": float("nan")}]
    with pytest.raises(ValueError, match="event 5 is not JSON"):
        functions.submit_functions(
            task, IMAGE, "fc_handlers.double", events, code="handlers.zip", chunk_size=2
        )
    with pytest.raises(ValueError, match="event 1 is not JSON"):
        task.map(IMAGE, "fc_handlers.double", [{"x": 0}, {"x": {1, 2}}], code="handlers.zip")
    assert task.summary().total == 0


@pytest.mark.one_db
def test_function_error_carries_the_index_type_message_and_remote_traceback(task: Task) -> None:
    with pytest.raises(FunctionError) as caught:
        task.map(IMAGE, "fc_handlers.fail_odd", [{"x": i} for i in range(4)], code="handlers.zip")
    error = caught.value
    assert (error.index, error.type, error.message) == (1, "ValueError", "odd x: 1")
    assert error.failure_code == "ErrorFunction"
    assert "fail_odd" in error.traceback and "raise ValueError" in error.traceback
    text = str(error)
    assert "call 1 failed: ValueError: odd x: 1" in text and "raise ValueError" in text


@pytest.mark.one_db
def test_return_exceptions_puts_each_error_in_its_place(task: Task) -> None:
    out = task.map(
        IMAGE,
        "fc_handlers.fail_odd",
        [{"x": i} for i in range(6)],
        code="handlers.zip",
        return_exceptions=True,
    )
    assert [r for r in out if not isinstance(r, FunctionError)] == [0, 2, 4]
    errors = [r for r in out if isinstance(r, FunctionError)]
    assert [(e.index, e.type) for e in errors] == [(1, "ValueError"), (3, "ValueError"), (5, "ValueError")]


@pytest.mark.one_db
def test_results_stream_as_the_calls_end(task: Task, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    events = [{"x": i, "gate": str(gate)} for i in range(5)]
    batch = task.submit_functions(IMAGE, "fc_handlers.gated", events, code="handlers.zip", timeout=120)
    stream = batch.results()
    # the first call ends while the others still wait at the gate: it arrives on its own
    assert next(stream) == (0, 0)
    assert not gate.exists() and batch.counts.done < 5
    gate.touch()
    assert list(stream) == [(i, i) for i in range(1, 5)]


@pytest.mark.one_db
def test_cancel_stops_the_calls_still_running(task: Task, tmp_path: Path) -> None:
    gate = tmp_path / "never"
    events = [{"x": i + 1, "gate": str(gate)} for i in range(4)]  # every call waits at the gate
    batch = task.submit_functions(IMAGE, "fc_handlers.gated", events, code="handlers.zip", timeout=600)
    for _ in range(600):  # until a call runs (its worker started), so the cancel has one to stop
        if task.summary()["RUNNING"]:
            break
        time.sleep(0.1)
    assert task.summary()["RUNNING"] >= 1
    assert batch.cancel() == 4
    counts = batch.wait(timeout=300)  # the calls would otherwise wait 600 s at the gate
    assert (counts.done, counts.failed) == (4, 4)
    out = [r for _, r in batch.results(return_exceptions=True)]
    assert all(isinstance(r, FunctionError) and r.type != "TimeoutError" for r in out)


def htc(server: HtcServer, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENHTC_")}
    env.update(OPENHTC_URL=server.url, OPENHTC_API_KEY=server.api_key)
    return subprocess.run(
        [*htc_command(), *args], capture_output=True, text=True, timeout=300, env=env, cwd=cwd, check=False
    )


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.one_db
def test_htc_map_writes_results_and_exits_non_zero_on_a_failure(
    task: Task, module_server: HtcServer, tmp_path: Path
) -> None:
    (tmp_path / "events.jsonl").write_text("".join(json.dumps({"x": i}) + "\n" for i in range(5)))
    common = (
        "--project",
        task.project_id,
        "--task",
        task.id,
        "--events",
        "events.jsonl",
        "--code",
        "handlers.zip",
    )

    ok = htc(module_server, "map", IMAGE, "fc_handlers.double", *common, "--out", "ok.jsonl", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    lines = read_jsonl(tmp_path / "ok.jsonl")
    assert [(r["index"], r["status"], r["result"]) for r in lines] == [
        (i, "SUCCEEDED", 2 * i) for i in range(5)
    ]

    bad = htc(
        module_server, "map", IMAGE, "fc_handlers.fail_odd", *common, "--out", "bad.jsonl", cwd=tmp_path
    )
    assert bad.returncode == 1, bad.stderr
    lines = read_jsonl(tmp_path / "bad.jsonl")
    assert [r["status"] for r in lines] == ["SUCCEEDED", "FAILED", "SUCCEEDED", "FAILED", "SUCCEEDED"]
    assert lines[1]["error"]["type"] == "ValueError" and lines[1]["result"] is None
    assert "2 of 5 call(s) failed" in bad.stderr
    assert "call 1: ValueError: odd x: 1" in bad.stderr and "raise ValueError" in bad.stderr

    (tmp_path / "broken.jsonl").write_text('{"x": 1}\n{"x": \n')
    broken = htc(
        module_server,
        "map",
        IMAGE,
        "fc_handlers.double",
        *common[:4],
        "--events",
        "broken.jsonl",
        cwd=tmp_path,
    )
    assert broken.returncode == 2 and "line 2 is not JSON" in broken.stderr


@pytest.mark.one_db
def test_the_htc_grid_connector_sends_collects_and_cancels_sessions(task: Task, tmp_path: Path) -> None:
    grid = HtcGridConnector(task, IMAGE, "fc_handlers.fail_odd", code="handlers.zip")
    session = grid.send([{"x": i} for i in range(4)])
    sid = session["session_id"]
    assert session["task_ids"] == [f"{sid}_{i}" for i in range(4)]
    out = grid.get_results(session, timeout_sec=120)
    assert out["finished"] == [f"{sid}_0", f"{sid}_2"] and out["finished_OUTPUT"] == [0, 2]
    assert out["failed"] == [f"{sid}_1", f"{sid}_3"]
    assert [e["type"] for e in out["failed_OUTPUT"]] == ["ValueError", "ValueError"]
    assert out["metadata"] == {"tasks_in_response": 4}

    # another connector on the task collects a session by its id alone, and cancels it
    gated = HtcGridConnector(task, IMAGE, "fc_handlers.gated", code="handlers.zip", timeout=600)
    waiting = gated.send([{"x": 1, "gate": str(tmp_path / "never")}] * 3)["session_id"]
    assert grid.get_results(waiting)["metadata"] == {"tasks_in_response": 0}  # 0 s: look once
    assert grid.cancel_sessions([waiting]) == {waiting: 3}
    ended = grid.get_results(waiting, timeout_sec=300)
    assert ended["finished"] == [] and len(ended["failed"]) == 3


def test_a_results_long_poll_unanswered_in_time_is_asked_again() -> None:
    """A server too busy to answer a long poll within its wait (seen on PostgreSQL under load):
    the read is repeated rather than failing the whole iteration."""
    calls: list[str] = []

    def server(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        if len(calls) <= 2:
            raise httpx.ReadTimeout("timed out", request=request)
        item = {"index": 0, "status": "SUCCEEDED", "result": 42, "error": None, "attempt": 1}
        return httpx.Response(200, json={"items": [item], "next": None, "done": 1, "failed": 0, "total": 1})

    conn = Connection("http://htc.example", bearer_token="t", transport=httpx.MockTransport(server))
    with Session(connection=conn) as htc:
        batch = functions.FunctionBatch(Task(htc, {"taskId": "t", "projectId": "p"}), [("b", 1)])
        assert list(batch.results()) == [(0, 42)]
    assert calls == ["/openhtc/v1/projects/p/tasks/t/functions/b/results"] * 3


def test_the_submits_first_page_is_used_once_and_only_if_it_holds_results() -> None:
    """A submit's ``results`` (``wait``) stands in for the first read if it holds ended calls;
    an empty one says nothing of later, so the server is asked (a ``calls(wait=0)`` made after
    every call has ended must not stop at it)."""
    reads: list[str] = []
    item = {"index": 0, "status": "SUCCEEDED", "result": 42, "error": None, "attempt": 1}
    ended = {"items": [item], "next": None, "done": 1, "failed": 0, "total": 1}

    def server(request: httpx.Request) -> httpx.Response:
        reads.append(request.url.path)
        return httpx.Response(200, json=ended)

    conn = Connection("http://htc.example", bearer_token="t", transport=httpx.MockTransport(server))
    with Session(connection=conn) as htc:
        task = Task(htc, {"taskId": "t", "projectId": "p"})
        held = functions.FunctionBatch(task, [("b", 1)], ended)
        assert list(held.results()) == [(0, 42)] and reads == []  # no read: the submit's answer
        empty = {"items": [], "next": 0, "done": 0, "failed": 0, "total": 1}
        stale = functions.FunctionBatch(task, [("b", 1)], empty)
        assert [call.result for call in stale.calls(wait=0)] == [42] and len(reads) == 1
