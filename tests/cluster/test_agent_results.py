"""Function calls' results reported by agents: a real server with no executor of its own.

What a user notices: a result an agent reports that is not what the executor writes (text that
is not JSON, an error that is not the {type, message, traceback} object, a result over the
server's size limit, a large result's key that is not its call's) is refused with a 400 naming
it, and nothing of that exchange is applied (the call is not ended, no result is stored): the
results page never serves invalid JSON. And ``htc agent``'s transport keeps a call's result
until its report is in the outbox: a report that could not be written there (a full disk)
carries its result when the executor retries it; a result the server refuses (its limit was
lowered meanwhile, say) fails its call rather than holding up every report behind it.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.cluster.test_agent_functions import IMAGE, LIMIT, FakeAgent, _report
from tests.cluster.test_agent_protocol import agent_token

from openhtc.agent.functions import AgentFunctions, _bounded
from openhtc.agent.outbox import Outbox
from openhtc.agent.transport import HttpTransport
from openhtc.domain.enums import JobStatus
from openhtc.domain.models import AttemptReport, Capacity, JobLaunch
from openhtc.store.functions import CallResult
from openhtc.testing.server import DEFAULT_REGION, HtcApi, HtcServer

AGENT = "agent-r"
ERROR = json.dumps({"type": "ValueError", "message": "no", "traceback": "Traceback ..."})


@pytest.fixture
def srv(start_server: Callable[..., HtcServer]) -> HtcServer:
    return start_server(args=("--no-executor",), env={"OPENHTC_FUNCTION_RESULT_MAX_BYTES": str(LIMIT)})


def _batch(api: HtcApi, events: list[Any]) -> tuple[str, str]:
    """A function batch's results URL and its batch id (its parent job's id)."""
    pid, tid = api.project_and_task()
    base = f"{api.root_url}/openhtc/v1/projects/{pid}/tasks/{tid}/functions"
    batch = api.post(base, {"image": IMAGE, "handler": "m.f", "events": events}, expect=201)
    return f"{base}/{batch['batchId']}/results", str(batch["batchId"])


def _page(api: HtcApi, results: str) -> list[tuple[int, str, Any, Any]]:
    page = api.get(results, **{"from": 0, "wait": 0})
    return [(i["index"], i["status"], i["result"], i["error"]) for i in page["items"]]


def test_an_invalid_reported_result_is_a_400_naming_it_and_changes_nothing(srv: HtcServer) -> None:
    api = srv.api()
    results, parent = _batch(api, [{"x": 7}, {"x": 8}])
    agent = FakeAgent(srv)
    leases: list[dict[str, Any]] = []
    deadline = time.monotonic() + 30
    while len(leases) < 2 and time.monotonic() < deadline:
        leases += agent.exchange(max_jobs=2 - len(leases))["leases"]
    first, second = sorted(leases, key=lambda lease: lease["array_index"])

    def ends(lease: dict[str, Any], result: dict[str, Any]) -> list[dict[str, Any]]:
        status = JobStatus.FAILED if "error" in result else JobStatus.SUCCEEDED
        return [
            _report(lease, 1, JobStatus.STARTING),
            _report(lease, 2, JobStatus.RUNNING),
            _report(lease, 3, status, exit_code=0, result=result),
        ]

    invalid = [
        ({"result": "not json"}, "result.result"),
        ({"result": "NaN"}, "result.result"),  # Python's parser takes it; JSON has no NaN
        ({"result": '{"a": 1'}, "result.result"),
        ({"result": json.dumps("y" * LIMIT)}, "result.result"),  # over function_result_max_bytes
        ({"error": "Traceback (most recent call last): ..."}, "result.error"),
        ({"error": json.dumps({"type": "E", "message": 3, "traceback": ""})}, "result.error"),
        ({"error": json.dumps(["E", "no", ""])}, "result.error"),
        ({"result": "1", "error": ERROR}, "result"),  # one of them, not both
        ({"result_key": "../../../other-task/stolen.json"}, "result.result_key"),
        # another call's key, of the same batch: where the executor puts that call's result
        ({"result_key": f"function-results/{parent}/{second['array_index']}.json"}, "result.result_key"),
    ]
    for result, field in invalid:
        # a valid report of the other call rides along: not applied either
        body = [*ends(first, result), _report(second, 1, JobStatus.STARTING)]
        resp = agent.post_exchange(body)
        assert resp.status_code == 400, (result, resp.status_code, resp.text[:300])
        assert f"reports.2.{field}" in resp.json()["message"], (result, resp.text[:300])
    statuses = sorted(job["status"] for job in api.jobs(*_ids(results)))
    assert "SUCCEEDED" not in statuses and "FAILED" not in statuses and "STARTING" not in statuses
    assert _page(api, results) == []
    # valid ones still work, an error as well as a result
    assert len(agent.exchange(ends(first, {"result": '{"y": 14}'}))["acked"]) == 3
    assert len(agent.exchange(ends(second, {"error": ERROR}))["acked"]) == 3
    assert _page(api, results) == [
        (0, "SUCCEEDED", {"y": 14}, None),
        (1, "FAILED", None, json.loads(ERROR)),
    ]
    log = srv.log_path.read_text(errors="replace")
    assert '" 500' not in log and "Traceback" not in log, log[-3000:]


def _ids(results_url: str) -> tuple[str, str]:
    parts = results_url.split("/")
    return parts[parts.index("projects") + 1], parts[parts.index("tasks") + 1]


@contextlib.contextmanager
def _transport(srv: HtcServer, tmp_path: Path) -> Iterator[HttpTransport]:
    """``htc agent``'s transport with its functions part, registered (no executor: the test is)."""
    outbox = Outbox(tmp_path / "outbox")
    outbox.open()
    transport = HttpTransport(srv.url, agent_token(srv), outbox, labels={}, runtime="process", version="test")
    functions = transport.functions = AgentFunctions(srv.url)
    try:
        transport.register(AGENT, "inc-1", DEFAULT_REGION, ["X86"], Capacity(2, 4096))
        yield transport
    finally:
        transport.close()
        functions.close()
        outbox.close()


def _claim(transport: HttpTransport, count: int) -> list[JobLaunch]:
    launches: list[JobLaunch] = []
    deadline = time.monotonic() + 30
    while len(launches) < count and time.monotonic() < deadline:
        launches += transport.claim(AGENT, DEFAULT_REGION, ["X86"], Capacity(2, 4096), count - len(launches))
    assert len(launches) == count
    return sorted(launches, key=lambda launch: launch.array_index)


def _ended(launch: JobLaunch, value: str) -> tuple[list[AttemptReport], CallResult]:
    """A call's reports, as the executor makes them, and its result."""
    now = time.time()
    steps = (JobStatus.STARTING, JobStatus.RUNNING, JobStatus.SUCCEEDED)
    reports = [AttemptReport(launch.job_id, launch.attempt, step, now, 0) for step in steps]
    return reports, CallResult(launch.batch_id, launch.array_index, launch.attempt, value, None)


def test_a_result_whose_report_the_outbox_could_not_write_goes_with_the_retry(
    srv: HtcServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    api = srv.api()
    results, _ = _batch(api, [{"x": 21}])
    with _transport(srv, tmp_path) as transport:
        (launch,) = _claim(transport, 1)
        reports, result = _ended(launch, "42")
        real_add = Outbox.add
        failures = []

        def full_disk_once(self: Outbox, *args: Any, **kwargs: Any) -> None:
            if not failures:
                failures.append(1)
                raise OSError(28, "No space left on device")
            real_add(self, *args, **kwargs)

        monkeypatch.setattr(Outbox, "add", full_disk_once)
        with pytest.raises(OSError):
            transport.report(AGENT, reports, [result])
        # the executor retries the reports with their results (LocalExecutor._flush_held)
        transport.report(AGENT, reports, [result])
        transport.heartbeat(AGENT, [])
        (job,) = api.wait_terminal(*_ids(results), 1, timeout=30)
        assert job["status"] == "SUCCEEDED", job
        assert _page(api, results) == [(0, "SUCCEEDED", 42, None)]


def test_a_result_the_server_refuses_fails_its_call_and_holds_up_no_other_report(
    srv: HtcServer, tmp_path: Path
) -> None:
    """Say the server's function_result_max_bytes was lowered after the agent made a result
    under the old limit: the server refuses it (400), and resending it as it was would hold
    every report of the agent behind it for ever. The agent reports that call's end as its
    failure, saying why, and the rest go through."""
    api = srv.api()
    results, _ = _batch(api, [{"x": 1}, {"x": 2}])
    with _transport(srv, tmp_path) as transport:
        first, second = _claim(transport, 2)
        too_large, took = _ended(first, json.dumps("y" * LIMIT))
        fine, kept = _ended(second, "2")
        transport.report(AGENT, too_large + fine, [took, kept])
        transport.heartbeat(AGENT, [])
        api.wait_terminal(*_ids(results), 2, timeout=30)
        (index, status, result, error), other = _page(api, results)
        assert (index, status, result, error["type"]) == (0, "FAILED", None, "ResultRefused")
        assert "function_result_max_bytes" in error["message"], error
        assert other == (1, "SUCCEEDED", 2, None)


def test_a_long_non_ascii_error_is_cut_to_what_a_report_may_carry() -> None:
    """A handler's error is cut to the inline limit as sent (JSON escapes each non-ASCII
    character in six): else its report is over the server's string limit, refused."""
    message = "é" * 400_000
    trace = f"Traceback (most recent call last):\n  ...\nValueError: {message}\n"
    error = json.dumps({"type": "ValueError", "message": message, "traceback": trace})
    limit = 256 * 1024
    cut = _bounded(error, limit)
    assert len(cut) <= limit
    found = json.loads(cut)
    assert found["type"] == "ValueError"
    assert found["message"].startswith("é" * 1000) and found["message"].endswith("(cut)")
    assert found["traceback"].startswith("Traceback (most recent call last):")
    assert found["traceback"].endswith("é\n")
