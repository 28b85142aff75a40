"""Function tasks (docs/functions.md) end to end: a real server subprocess, real warm workers
under the process runtime, handlers from a code zip in project storage."""

from __future__ import annotations

import os
import time
from typing import Any

import pytest
from tests.functions.conftest import Functions

from openhtc.testing.server import HtcServer


@pytest.fixture
def fn(module_server: HtcServer) -> Functions:
    api = module_server.api()
    project_id, task_id = api.project_and_task()
    functions = Functions(module_server, api, project_id, task_id)
    functions.upload_code()
    return functions


def test_results_come_back_in_order_with_the_handlers_values(fn: Functions) -> None:
    batch = fn.submit("fnlib.handlers.double", [{"x": i} for i in range(300)], code="handlers.zip")
    items = fn.results(batch, 300)
    assert [item["index"] for item in items] == list(range(300))
    assert [item["result"] for item in items] == [2 * i for i in range(300)]
    assert {item["status"] for item in items} == {"SUCCEEDED"}
    last = fn.page(batch, 300)
    assert last["items"] == [] and last["next"] is None
    assert (last["done"], last["failed"], last["total"]) == (300, 0, 300)
    # Each call is a job of the task, in the usual statuses.
    job = fn.api.job(fn.project_id, fn.task_id, f"{batch}:7")
    assert job["status"] == "SUCCEEDED"


def test_a_page_stops_at_the_first_call_not_ended_and_later_ones_wait_for_it(fn: Functions) -> None:
    """Most calls end while call 0 still runs: reading from 0 gives nothing yet (``next``
    stays 0) although the batch counts them done; once call 0 ends (here: cancelled), all ten
    come back in order."""
    events = [{"x": 0, "sleep": 60}] + [{"x": i} for i in range(1, 10)]
    batch = fn.submit("fnlib.handlers.sleepy", events, code="handlers.zip")
    deadline = time.monotonic() + 60
    first = fn.page(batch, 0)
    while first["done"] < 8:  # the call queued behind call 0 in its worker may wait with it
        assert time.monotonic() < deadline, fn.server.log_tail()
        time.sleep(0.1)
        first = fn.page(batch, 0)
    assert first["items"] == [] and first["next"] == 0
    assert fn.cancel(batch) >= 1
    items = fn.results(batch, 10)
    assert [item["index"] for item in items] == list(range(10))
    assert items[0]["status"] == "FAILED"
    succeeded = [item for item in items if item["status"] == "SUCCEEDED"]
    assert len(succeeded) >= 8 and all(item["result"] == item["index"] for item in succeeded)


EVENTS: list[Any] = [
    'a "quoted" \\ string',
    "ünïcödé ✓",
    "",
    0,
    -7,
    2**62,
    1.5,
    0.1,
    1e300,
    True,
    False,
    None,
    [1, [2, {"a": None}]],
    {"k": "v", "n": {"deep": [True, 0.25]}},
    {},
    [],
]


def test_every_kind_of_json_event_reaches_the_handler_unchanged(fn: Functions) -> None:
    batch = fn.submit("fnlib.handlers.identity", EVENTS, code="handlers.zip")
    assert [item["result"] for item in fn.results(batch, len(EVENTS))] == EVENTS


@pytest.mark.one_db
def test_warm_workers_serve_many_calls_with_a_lambda_context(fn: Functions) -> None:
    batch = fn.submit("fnlib.handlers.echo_context", [{} for _ in range(50)], code="handlers.zip")
    items = fn.results(batch, 50)
    results = [item["result"] for item in items]
    assert results[3]["requestId"] == f"{batch}:3"
    assert results[0]["name"] == "fnlib.handlers.echo_context"
    assert 0 < results[0]["remaining"] <= 60_000
    assert results[0]["attempt"] == 1
    # No process per call: a handful of workers served all 50 calls.
    assert len({r["pid"] for r in results}) < 10


def test_an_exception_fails_the_call_with_its_type_message_and_traceback(fn: Functions) -> None:
    batch = fn.submit(
        "fnlib.handlers.fail_odd", [{"x": i} for i in range(6)], code="handlers.zip", groupName="odd-ones"
    )
    items = fn.results(batch, 6)
    assert [item["status"] for item in items] == ["SUCCEEDED", "FAILED"] * 3
    error = items[1]["error"]
    assert error["type"] == "ValueError"
    assert error["message"] == "odd input 1"
    assert "fail_odd" in error["traceback"] and "raise ValueError" in error["traceback"]
    assert items[1]["result"] is None and items[1]["failureCode"] == "ErrorFunction"
    assert items[2]["result"] == 2 and items[2]["error"] is None
    job = fn.api.job(fn.project_id, fn.task_id, f"{batch}:1")
    assert job["status"] == "FAILED" and job["failureCode"] == "ErrorFunction"
    assert fn.page(batch, 6)["failed"] == 3


@pytest.mark.one_db
def test_a_result_that_is_not_json_is_an_error(fn: Functions) -> None:
    batch = fn.submit("fnlib.handlers.not_json", [{}], code="handlers.zip")
    (item,) = fn.results(batch, 1)
    assert item["status"] == "FAILED" and item["error"]["type"] == "TypeError"


@pytest.mark.one_db
def test_a_missing_handler_fails_each_call_with_the_import_error(fn: Functions) -> None:
    batch = fn.submit("fnlib.nothere.handler", [{}, {}], code="handlers.zip")
    items = fn.results(batch, 2)
    assert {item["error"]["type"] for item in items} == {"ModuleNotFoundError"}


@pytest.mark.one_db
def test_output_goes_to_the_calls_log_only_when_it_prints(fn: Functions) -> None:
    batch = fn.submit("fnlib.handlers.chatty", [{"x": 5}], code="handlers.zip")
    fn.results(batch, 1)
    lines = [line["message"] for line in fn.api.logs(fn.project_id, fn.task_id, f"{batch}:0")]
    assert any("hello from call 5" in line for line in lines), lines
    assert any("logged 5" in line for line in lines), lines
    quiet = fn.submit("fnlib.handlers.double", [{"x": 1}], code="handlers.zip")
    fn.results(quiet, 1)
    assert fn.api.logs(fn.project_id, fn.task_id, f"{quiet}:0") == []


@pytest.mark.one_db
def test_a_timeout_fails_the_call_and_the_next_calls_run(fn: Functions) -> None:
    events = [{"x": 0, "sleep": 30}, {"x": 1}, {"x": 2}]
    batch = fn.submit("fnlib.handlers.sleepy", events, code="handlers.zip", execTimeoutSeconds=1)
    items = fn.results(batch, 3)
    assert items[0]["status"] == "FAILED"
    assert items[0]["failureCode"] == "ErrorTimeout"
    assert items[0]["error"]["type"] == "TimeoutError"
    assert [item["result"] for item in items[1:]] == [1, 2]


@pytest.mark.one_db
def test_a_worker_crash_fails_its_call_and_is_replaced(fn: Functions) -> None:
    events = [{"x": i, "crash": 3} for i in range(10)]
    batch = fn.submit("fnlib.handlers.crash_on", events, code="handlers.zip", maxVCpus=1)
    items = fn.results(batch, 10)
    assert items[3]["status"] == "FAILED"
    assert items[3]["failureCode"] == "ErrorNonZeroContainerExitCode"
    assert "exited with code 3" in items[3]["error"]["message"]
    assert [item["result"] for item in items if item["index"] != 3] == [i for i in range(10) if i != 3]


@pytest.mark.one_db
def test_a_crash_is_retried_per_the_retry_strategy(fn: Functions, tmp_path: Any) -> None:
    # Crashes on its first attempt only (a marker file in the task folder says it already did).
    source = (
        "import os\n"
        "def once(event, context):\n"
        "    marker = os.path.join(os.environ['TASK_SHARED_FOLDER'], 'crashed')\n"
        "    if not os.path.exists(marker):\n"
        "        open(marker, 'w').close()\n"
        "        os._exit(9)\n"
        "    return context.attempt\n"
    )
    from tests.functions.conftest import handlers_zip

    fn.upload_code("once.zip", handlers_zip(source))
    batch = fn.submit("fnlib.handlers.once", [{}], code="once.zip", retryStrategy={"maxRetries": 1})
    (item,) = fn.results(batch, 1)
    assert item["status"] == "SUCCEEDED" and item["result"] == 2 and item["attempt"] == 2


@pytest.mark.one_db
def test_cancel_stops_running_calls_and_the_queued_ones(fn: Functions) -> None:
    events = [{"x": i} for i in range(20)]
    batch = fn.submit("fnlib.handlers.pid_then_sleep", events, code="handlers.zip", execTimeoutSeconds=120)
    pids_dir = fn.server.data_dir / "storage" / "projects" / fn.project_id / "tasks" / fn.task_id / "pids"
    deadline = time.monotonic() + 60
    while not pids_dir.exists() or not [f for f in pids_dir.iterdir() if not f.name.endswith(".tmp")]:
        assert time.monotonic() < deadline, fn.server.log_tail()
        time.sleep(0.1)
    assert fn.cancel(batch) == 20
    items = fn.results(batch, 20, timeout=30)  # well before any sleep could end
    assert {item["status"] for item in items} == {"FAILED"}
    # The running calls were stopped: the processes that ran them are gone.
    pids = [int(f.read_text()) for f in pids_dir.iterdir() if not f.name.endswith(".tmp")]
    deadline = time.monotonic() + 30
    while alive := [pid for pid in pids if os.path.exists(f"/proc/{pid}")]:
        assert time.monotonic() < deadline, f"cancelled calls still run in {alive}"
        time.sleep(0.1)


@pytest.mark.one_db
def test_a_large_result_is_kept_in_task_storage_and_returned_inline(fn: Functions) -> None:
    size = 10 * 1024 * 1024
    batch = fn.submit("fnlib.handlers.big", [{"size": size}, {"size": 10}], code="handlers.zip")
    items = fn.results(batch, 2)
    assert items[0]["status"] == "SUCCEEDED"
    assert items[0]["result"] == "y" * size
    assert items[1]["result"] == "y" * 10


@pytest.mark.one_db
def test_bad_submissions_are_refused_and_create_nothing(fn: Functions) -> None:
    bad: list[dict[str, Any]] = [
        {"image": "python3", "handler": "nodots", "events": [1]},
        {"image": "python3", "handler": "a.b", "events": []},
        {"image": "Not An Image", "handler": "a.b", "events": [1]},
        {"image": "python3", "handler": "a.b", "events": [1] * 100_001},
        {"image": "python3", "handler": "a.b", "events": "not a list"},
        {"image": "python3", "handler": "a.b", "code": "../escape.zip", "events": [1]},
    ]
    for body in bad:
        fn.api.post(fn.base, body, expect=400)
    assert fn.api.jobs(fn.project_id, fn.task_id) == []
    fn.api.request("GET", f"{fn.base}/no-such-batch/results", expect=404)


@pytest.mark.one_db
def test_ten_thousand_events(fn: Functions) -> None:
    batch = fn.submit("fnlib.handlers.double", [{"x": i} for i in range(10_000)], code="handlers.zip")
    items = fn.results(batch, 10_000, timeout=300)
    assert [item["result"] for item in items] == [2 * i for i in range(10_000)]


@pytest.mark.one_db
def test_function_calls_and_ordinary_jobs_share_the_executor(fn: Functions) -> None:
    # A slot's next job may be of the other kind: each still runs on its own path.
    jobs = fn.api.submit(fn.project_id, fn.task_id, fn.api.job_request(["true"], batch_size=200))
    batch = fn.submit("fnlib.handlers.double", [{"x": i} for i in range(400)], code="handlers.zip")
    more = fn.api.submit(fn.project_id, fn.task_id, fn.api.job_request(["true"], batch_size=200))
    assert [item["result"] for item in fn.results(batch, 400)] == [2 * i for i in range(400)]
    deadline = time.monotonic() + 120
    while (summary := fn.api.summary(fn.project_id, fn.task_id)).get("SUCCEEDED", 0) < 800:
        assert time.monotonic() < deadline, summary
        assert summary.get("FAILED", 0) == 0, summary
        time.sleep(0.2)
    assert len(jobs) == len(more) == 1


def test_results_of_a_batch_outside_the_path_are_not_found(fn: Functions) -> None:
    """The results route reads the project, the task and the batch together; each that is not
    there, or not where the path says, is a 404 naming it (never another task's results)."""
    batch = fn.submit("fnlib.handlers.double", [{"x": 1}], code="handlers.zip")
    assert fn.results(batch, 1)[0]["result"] == 2
    api, url = fn.api, fn.server.url
    other_project, other_task = api.project_and_task()
    job_batch = api.submit_one(
        fn.project_id, fn.task_id, {"htcJobDefinition": {"imageName": "bb", "commands": ["true"]}}
    )

    def path(project: str, task: str, of: str) -> str:
        return f"{url}/openhtc/v1/projects/{project}/tasks/{task}/functions/{of}/results"

    cases = {
        path(fn.project_id, other_task, batch): "not found in project",
        path(other_project, other_task, batch): f"function batch {batch}",
        path("nosuch", fn.task_id, batch): "project nosuch",
        path(fn.project_id, fn.task_id, "nosuch"): "function batch nosuch",
        path(fn.project_id, fn.task_id, job_batch["parentJobId"]): "function batch",
    }
    for where, said in cases.items():
        answer = api.request("GET", where, params={"wait": 1})
        assert answer.status_code == 404 and said in answer.text, (where, answer.status_code, answer.text)


def test_a_submit_with_wait_answers_its_first_results(fn: Functions) -> None:
    """POST …/functions?wait=S also answers the results from index 0 that end within S (one
    request for a lone call, as Task.map sends), and what has not ended by then is read after."""
    body = {"image": "python3", "handler": "fnlib.handlers.double", "code": "handlers.zip"}
    quick = fn.api.post(fn.base, {**body, "events": [{"x": 21}]}, expect=201, wait=30)
    assert quick["results"]["items"][0]["result"] == 42 and quick["results"]["next"] is None
    assert (quick["results"]["done"], quick["results"]["total"]) == (1, 1)
    slow = {**body, "handler": "fnlib.handlers.sleepy", "events": [{"x": 1, "sleep": 3}, {"x": 2}]}
    held = fn.api.post(fn.base, slow, expect=201, wait=0.5)
    assert held["results"]["items"] == [] and held["results"]["next"] == 0  # call 0 still runs
    assert [item["result"] for item in fn.results(held["batchId"], 2)] == [1, 2]
    plain = fn.api.post(fn.base, {**body, "events": [{"x": 1}]}, expect=201)
    assert "results" not in plain  # without wait: the answer as before
