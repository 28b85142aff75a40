"""Function calls' results reported by agents: a real server with no executor of its own.

What a user notices: a result an agent reports that is not what the executor writes (text that
is not JSON, an error that is not the {type, message, traceback} object, a large result's key
that is not its call's) is refused with a 400 naming it, and nothing of that exchange is applied
(the call is not ended, no result is stored): the results page never serves invalid JSON. A
result over the server's size limit (an agent whose limit is stale) fails its call, saying so,
and the rest of the exchange applies. And ``htc agent``'s transport keeps a call's result until
its report is in the outbox: a report that could not be written there (a full disk) carries its
result when the executor retries it.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
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


def _two_leases(agent: FakeAgent) -> list[dict[str, Any]]:
    """The batch's two calls, claimed by ``agent``, by index."""
    leases: list[dict[str, Any]] = []
    deadline = time.monotonic() + 30
    while len(leases) < 2 and time.monotonic() < deadline:
        leases += agent.exchange(max_jobs=2 - len(leases))["leases"]
    return sorted(leases, key=lambda lease: lease["array_index"])


def _page(api: HtcApi, results: str) -> list[tuple[int, str, Any, Any]]:
    page = api.get(results, **{"from": 0, "wait": 0})
    return [(i["index"], i["status"], i["result"], i["error"]) for i in page["items"]]


def test_an_invalid_reported_result_is_a_400_naming_it_and_changes_nothing(srv: HtcServer) -> None:
    api = srv.api()
    results, parent = _batch(api, [{"x": 7}, {"x": 8}])
    agent = FakeAgent(srv)
    first, second = _two_leases(agent)

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
        ({"error": "Traceback (most recent call last): ..."}, "result.error"),
        ({"error": json.dumps({"type": "E", "message": 3, "traceback": ""})}, "result.error"),
        ({"error": json.dumps(["E", "no", ""])}, "result.error"),
        ({"result": "1", "error": ERROR}, "result"),  # one of them, not both
        ({"result_key": None}, "result"),  # nor none
        ({"result_key": "../../../other-task/stolen.json"}, "result.result_key"),
        # another call's key, of the same batch: where the executor puts that call's result
        ({"result_key": f"function-results/{parent}/{second['array_index']}.json"}, "result.result_key"),
    ]
    for result, field in invalid:
        # a valid report of the other call rides along: not applied either
        body = [*ends(first, result), _report(second, 1, JobStatus.STARTING)]
        resp = agent.post_exchange(body)
        assert resp.status_code == 400, (result, resp.status_code, resp.text[:300])
        assert resp.json()["message"].startswith(f"reports.2.{field}: "), (result, resp.text[:300])
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
    # a report for an attempt not this agent's: refused, its key not checked (an answer saying
    # whether it is another job's key would tell of jobs not the caller's)
    other = {**second, "attempt": second["attempt"] + 1}
    key = f"function-results/{parent}/{first['array_index']}.json"
    stale = _report(other, 1, JobStatus.SUCCEEDED, result={"result_key": key})
    assert agent.exchange([stale])["refused"] == [[second["job_id"], second["attempt"] + 1]]
    log = srv.log_path.read_text(errors="replace")
    assert '" 500' not in log and "Traceback" not in log, log[-3000:]


def test_a_result_over_the_limit_fails_its_call_and_the_rest_of_the_exchange_applies(
    srv: HtcServer,
) -> None:
    """An agent whose limit is stale (the server's was lowered, and it restarted) sends a result
    over it inline: not a 400 (the agent would resend it for ever, every report behind it),
    not stored either; its call fails saying why, and every other report is applied."""
    api = srv.api()
    results, _ = _batch(api, [{"x": 1}, {"x": 2}])
    agent = FakeAgent(srv)
    first, second = _two_leases(agent)
    big = json.dumps("é" * LIMIT)  # bytes, not characters, count
    size = len(big.encode())
    steps = ((1, JobStatus.STARTING), (2, JobStatus.RUNNING))
    body = [
        *(_report(lease, seq, step) for lease in (first, second) for seq, step in steps),
        _report(first, 3, JobStatus.SUCCEEDED, exit_code=0, result={"result": big}),
        _report(second, 3, JobStatus.SUCCEEDED, exit_code=0, result={"result": "2"}),
    ]
    answer = agent.exchange(body)
    assert len(answer["acked"]) == 6
    assert answer["function_result_max_bytes"] == LIMIT  # the agent learns the limit now
    (index, status, result, error), rest = _page(api, results)
    assert (index, status, result, error["type"]) == (0, "FAILED", None, "ResultTooLarge")
    assert f"{size} bytes" in error["message"] and f"({LIMIT})" in error["message"], error
    assert rest == (1, "SUCCEEDED", 2, None)
    job = next(j for j in api.jobs(*_ids(results)) if j["jobUUID"].endswith(":0"))
    assert (job["status"], job["failureCode"]) == ("FAILED", "ErrorUnknownFailure"), job
    assert job["statusReason"].startswith("ResultTooLarge: "), job


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


def test_an_agent_learns_the_servers_limit_from_each_exchange(srv: HtcServer, tmp_path: Path) -> None:
    """Its limit from registration may be stale (the server's was lowered, and it restarted:
    the agent does not register again): each exchange's answer says the limit now, and the
    agent's pool puts larger results in task storage from then on."""
    with _transport(srv, tmp_path) as transport:
        assert transport.functions is not None
        pool = SimpleNamespace(result_max_bytes=16 * LIMIT)  # as learned from an older server
        transport.functions.pool = pool  # type: ignore[assignment]
        transport.heartbeat(AGENT, [])
        assert pool.result_max_bytes == LIMIT


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


def _ended_report(job_id: int) -> AttemptReport:
    return AttemptReport(job_id, 1, JobStatus.SUCCEEDED, time.time(), 0)


def test_the_outbox_adds_nothing_it_could_not_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A report the outbox could not write (a full disk) is not pending: were it, it would be
    sent while the executor retries it, and the retry would be numbered after it."""
    outbox = Outbox(tmp_path / "outbox")
    outbox.open()

    def full(*args: Any, **kwargs: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(outbox, "_append", full)
    with pytest.raises(OSError):
        outbox.add([_ended_report(7)])
    assert outbox.pending() == []
    monkeypatch.undo()
    outbox.add([_ended_report(7)])  # the executor's retry
    assert [(r.job_id, r.seq) for r in outbox.pending()] == [(7, 1)]
    outbox.close()


class _FailsHalfway:
    """An outbox's file whose next write puts half its text on disk and fails (a full disk)."""

    def __init__(self, fh: Any) -> None:
        self._fh = fh
        self._failed = False

    def write(self, text: str) -> int:
        if self._failed:
            return int(self._fh.write(text))
        self._failed = True
        self._fh.write(text[: len(text) // 2])
        self._fh.flush()
        raise OSError(28, "No space left on device")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fh, name)


def test_a_report_written_after_a_torn_line_is_replayed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write that failed halfway leaves part of a line in the file; the next report written
    must not be glued to it (replay would skip both: the report lost at the agent's restart)."""
    outbox = Outbox(tmp_path / "outbox")
    outbox.open()
    outbox.add([_ended_report(1)])  # opens the file
    monkeypatch.setattr(outbox, "_fh", _FailsHalfway(outbox._fh))
    with pytest.raises(OSError):
        outbox.add([_ended_report(2)])
    outbox.add([_ended_report(2)])  # the executor's retry, on a disk with room again
    outbox.close()
    again = Outbox(tmp_path / "outbox")
    again.open()  # as at the agent's restart
    assert sorted((r.job_id, r.seq) for r in again.pending()) == [(1, 1), (2, 1)]
    again.close()
