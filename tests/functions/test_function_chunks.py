"""Function calls queued in a warm worker a chunk at a time (docs/functions.md, "Warm workers"):
a crash, a timeout or a cancel in the middle of a chunk touches only the call it concerns.

The server queues 16 calls per worker (``function_worker_window``) and prefetches 64; calls of
``maxVCpus: 2`` on its 2 vCPUs run in one slot, one after another, so the calls after the one
that crashes, hangs or is cancelled are in that worker's pipe when it happens.
"""

from __future__ import annotations

import itertools
import os
import time
from collections import Counter
from collections.abc import Iterator

import pytest
from tests.functions.conftest import Functions, functions_on, server_with

from openhtc.domain.enums import JobStatus
from openhtc.testing.server import HtcServer

# Each call leaves a file per execution ({index}.{pid}), in the task folder, before it acts.
SOURCE = """
import os, time

def _ran(event):
    folder = os.path.join(os.environ["TASK_SHARED_FOLDER"], "runs")
    os.makedirs(folder, exist_ok=True)
    open(os.path.join(folder, "%d.%d" % (event["x"], os.getpid())), "w").close()

def crash_or_double(event, context):
    _ran(event)
    if event.get("crash"):
        os._exit(3)
    return event["x"] * 2

def sleep_or_double(event, context):
    _ran(event)
    time.sleep(event.get("sleep", 0))
    return event["x"] * 2

def _span(event):  # when the call ran, from its first line to its return
    folder = os.path.join(os.environ["TASK_SHARED_FOLDER"], "spans")
    os.makedirs(folder, exist_ok=True)
    began = time.time()
    time.sleep(event["sleep"])
    with open(os.path.join(folder, str(event["x"])), "w") as out:
        out.write("%f %f" % (began, time.time()))
    return event["x"]

def span_a(event, context):
    return _span(event)

def span_b(event, context):
    return _span(event)
"""
ENV = {
    "OPENHTC_FUNCTION_WORKER_WINDOW": "16",
    "OPENHTC_EXECUTOR_PREFETCH": "64",
    "OPENHTC_EXECUTOR_VCPUS": "2",
    "OPENHTC_MAX_INFRASTRUCTURE_RETRIES": "0",
}


@pytest.fixture(scope="module")
def chunk_server(
    tmp_path_factory: pytest.TempPathFactory, db_kind: str, request: pytest.FixtureRequest
) -> Iterator[HtcServer]:
    yield from server_with(tmp_path_factory, db_kind, request, ENV)


@pytest.fixture
def fn(chunk_server: HtcServer) -> Functions:
    return functions_on(chunk_server, "chunks.zip", SOURCE)


def _runs(fn: Functions) -> Counter[int]:
    """How many times each call ran (its files in the task folder)."""
    folder = fn.server.data_dir / "storage" / "projects" / fn.project_id / "tasks" / fn.task_id / "runs"
    return Counter(int(name.split(".")[0]) for name in os.listdir(folder)) if folder.exists() else Counter()


def _submit(fn: Functions, handler: str, events: list[dict[str, object]], **fields: object) -> str:
    return fn.submit(f"fnlib.handlers.{handler}", events, code="chunks.zip", maxVCpus=2, **fields)


def test_a_crash_mid_chunk_fails_only_its_call_and_the_rest_run_once(fn: Functions) -> None:
    events: list[dict[str, object]] = [{"x": i, "crash": i == 5} for i in range(40)]
    batch = _submit(fn, "crash_or_double", events)
    items = fn.results(batch, 40)
    assert items[5]["status"] == "FAILED"
    assert items[5]["failureCode"] == "ErrorNonZeroContainerExitCode"
    assert "exited with code 3" in items[5]["error"]["message"]
    assert [item["result"] for item in items if item["index"] != 5] == [2 * i for i in range(40) if i != 5]
    # the calls queued behind it in the dead worker ran on a new one, each exactly once
    assert _runs(fn) == Counter(range(40))
    summary = fn.api.get(f"{fn.api.task_path(fn.project_id, fn.task_id)}/summary-statistics")
    assert (summary["jobStatuses"]["SUCCEEDED"], summary["jobStatuses"]["FAILED"]) == (39, 1)


def test_a_retry_after_a_crash_mid_chunk_runs_that_call_again_only(fn: Functions) -> None:
    events: list[dict[str, object]] = [{"x": i, "crash": i == 3} for i in range(12)]
    batch = _submit(fn, "crash_or_double", events, retryStrategy={"maxRetries": 1})
    items = fn.results(batch, 12)
    assert items[3]["status"] == "FAILED" and items[3]["attempt"] == 2  # it crashes every time
    assert all(item["status"] == "SUCCEEDED" and item["attempt"] == 1 for item in items if item["index"] != 3)
    assert _runs(fn) == Counter({**{i: 1 for i in range(12)}, 3: 2})


def test_a_timeout_mid_chunk_fails_only_its_call_and_the_rest_run_once(fn: Functions) -> None:
    events: list[dict[str, object]] = [{"x": i, "sleep": 30 if i == 2 else 0} for i in range(10)]
    batch = _submit(fn, "sleep_or_double", events, execTimeoutSeconds=1)
    items = fn.results(batch, 10)
    assert items[2]["status"] == "FAILED" and items[2]["failureCode"] == "ErrorTimeout"
    assert items[2]["error"]["type"] == "TimeoutError"
    assert [item["result"] for item in items if item["index"] != 2] == [2 * i for i in range(10) if i != 2]
    assert _runs(fn) == Counter(range(10))


def test_a_cancel_mid_chunk_stops_the_running_call_and_the_queued_ones_never_run(fn: Functions) -> None:
    events: list[dict[str, object]] = [{"x": i, "sleep": 60} for i in range(20)]
    batch = _submit(fn, "sleep_or_double", events, execTimeoutSeconds=120)
    deadline = time.monotonic() + 60
    while not _runs(fn):
        assert time.monotonic() < deadline, fn.server.log_tail()
        time.sleep(0.05)
    assert fn.cancel(batch) == 20
    items = fn.results(batch, 20, timeout=30)  # well before any sleep could end
    assert {item["status"] for item in items} == {"FAILED"}
    # The one slot (2 vCPUs) runs a call submitted now only once the cancelled window is gone.
    after = _submit(fn, "sleep_or_double", [{"x": 100}])
    assert fn.results(after, 1, timeout=30)[0]["result"] == 200
    # only the first call ever ran: the 15 queued behind it in its worker never did
    assert _runs(fn) == Counter([0, 100])


def test_a_call_records_runnable_running_and_its_end(fn: Functions) -> None:
    batch = _submit(fn, "crash_or_double", [{"x": 1}])
    (item,) = fn.results(batch, 1)
    assert item["result"] == 2
    events = fn.api.events(fn.project_id, fn.task_id, f"{batch}:0")
    statuses = sorted((e["status"] for e in events), key=lambda s: JobStatus[s])
    # no STARTING: a warm worker has nothing to set up
    assert statuses == ["SUBMITTED_TO_RESCALE", "SUBMITTED_TO_PROVIDER", "RUNNABLE", "RUNNING", "SUCCEEDED"]
    job = fn.api.job(fn.project_id, fn.task_id, f"{batch}:0")
    assert job["status"] == "SUCCEEDED" and job.get("startedAt")


def test_a_cancelled_call_in_a_pipe_never_hands_its_result_to_the_next_call(fn: Functions) -> None:
    # One slot: B runs, then P, C and Q, each a batch of its own, queued behind it in its
    # worker. C is cancelled while P runs with C in the worker's pipe behind it.
    sleeper = "sleep_or_double"
    b = _submit(fn, sleeper, [{"x": 0, "sleep": 0.5}])
    p = _submit(fn, sleeper, [{"x": 1, "sleep": 2}])
    c = _submit(fn, sleeper, [{"x": 2, "sleep": 0.5}])
    q = _submit(fn, sleeper, [{"x": 3, "sleep": 0.5}])
    deadline = time.monotonic() + 60
    while not _runs(fn)[1]:
        assert time.monotonic() < deadline, fn.server.log_tail()
        time.sleep(0.02)
    time.sleep(0.3)
    assert fn.cancel(c) == 1
    assert [fn.results(batch, 1)[0]["result"] for batch in (b, p, q)] == [0, 2, 6]  # Q's own
    (cancelled,) = fn.results(c, 1)
    assert cancelled["status"] == "FAILED" and cancelled.get("result") is None
    runs = _runs(fn)
    # C was in the pipe: it may have begun before its worker was killed for it, never twice
    assert runs - Counter([2]) == Counter([0, 1, 3]) and runs[2] <= 1


def test_one_slot_runs_one_call_at_a_time_when_handlers_alternate(fn: Functions) -> None:
    # Calls of two handlers next to each other in line: a window takes only its worker's kind,
    # so one 2-vCPU slot (maxVCpus 2 each) never runs two at once.
    batches = [_submit(fn, "span_a", [{"x": 0, "sleep": 1}])]
    for x in range(1, 7):
        handler = "span_b" if x % 2 else "span_a"
        batches.append(_submit(fn, handler, [{"x": x, "sleep": 0.3}]))
    assert [fn.results(batch, 1)[0]["result"] for batch in batches] == list(range(7))
    folder = fn.server.data_dir / "storage" / "projects" / fn.project_id / "tasks" / fn.task_id / "spans"
    spans = sorted(tuple(map(float, (folder / name).read_text().split())) for name in os.listdir(folder))
    assert len(spans) == 7
    overlaps = [(one, two) for one, two in itertools.pairwise(spans) if two[0] < one[1]]
    assert not overlaps, f"calls ran at once in one slot: {overlaps}"
