"""The agent's log shipper and jobs shorter than its interval (a W1 of `true` jobs on agents).

A job can be claimed, run and end between two ships, so the shipper never sees it among the
executor's held attempts. Its log must still be shipped to its end, and the attempt then
forgotten: kept, it was read again at every ship for the agent's whole life, so each ship cost
more than the last and the agent's memory grew with every job it ever ran.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from tests.cluster.test_agent_protocol import agent_token, submit

from openhtc.agent.logship import LogShipper
from openhtc.agent.outbox import Outbox
from openhtc.agent.transport import HttpTransport
from openhtc.domain.models import Capacity, JobLaunch
from openhtc.services.logs import LogStore
from openhtc.testing.server import DEFAULT_REGION, HtcServer


class _Transport:
    """What the shipper uses of HttpTransport: the launches it made, and the logs POST."""

    def __init__(self) -> None:
        self.launched: dict[tuple[int, int], Any] = {}
        self.refused_logs: set[tuple[int, int]] = set()  # attempts the server refused (409)
        self.sent: list[dict[str, Any]] = []

    def send_logs(
        self, chunks: list[dict[str, Any]], timeout: float | None = None
    ) -> list[tuple[int, int, int]]:
        self.sent.extend(chunks)
        return [(c["job_id"], c["attempt"], c["offset"] + len(c["data"].encode())) for c in chunks]


def test_a_job_that_ended_between_two_ships_is_shipped_then_forgotten(tmp_path: Path) -> None:
    logs = LogStore(tmp_path / "logs")
    transport = _Transport()
    held: list[tuple[int, int]] = []
    shipper = LogShipper(transport, logs, lambda: list(held))  # type: ignore[arg-type]
    for job_id in range(1, 51):
        launch = SimpleNamespace(
            job_uuid=f"task:parent:{job_id}", task_id="task", array_index=job_id, attempt=1
        )
        transport.launched[(job_id, 1)] = launch
        path = logs.path("task", "task:parent", job_id, 1)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"line of job {job_id}\n")  # it ran and ended before the first ship

    for _ in range(4):
        shipper.ship()

    assert sorted(c["job_id"] for c in transport.sent) == list(range(1, 51))  # each shipped, once
    assert all(c["data"].endswith("\n") for c in transport.sent)
    assert transport.launched == {}  # and then forgotten
    assert shipper._tails == {}


def test_a_job_still_held_is_kept_and_its_new_lines_shipped(tmp_path: Path) -> None:
    logs = LogStore(tmp_path / "logs")
    transport = _Transport()
    held = [(7, 2)]
    shipper = LogShipper(transport, logs, lambda: list(held))  # type: ignore[arg-type]
    transport.launched[(7, 2)] = SimpleNamespace(job_uuid="t:p:7", task_id="t", array_index=7, attempt=2)
    path = logs.path("t", "t:p", 7, 2)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("one\n")
    for _ in range(4):
        shipper.ship()
    with open(path, "a") as fh:
        fh.write("two\n")
    shipper.ship()
    assert [c["data"] for c in transport.sent] == ["one\n", "two\n"]
    assert (7, 2) in transport.launched  # running: kept
    held.clear()  # it ended
    for _ in range(3):
        shipper.ship()
    assert transport.launched == {}


class _HangingServer(_Transport):
    """A server that takes the logs POST and never answers (until ``answer`` is set), then one
    that fails it (None: not taken)."""

    def __init__(self) -> None:
        super().__init__()
        self.answer = threading.Event()
        self.inside = threading.Event()
        self.posts = 0

    def send_logs(self, chunks: list[dict[str, Any]], timeout: float | None = None) -> None:
        self.posts += 1
        self.inside.set()
        self.answer.wait()
        return None


def _ended_job(logs: LogStore, transport: _Transport, job_id: int) -> SimpleNamespace:
    launch = SimpleNamespace(
        job_id=job_id, job_uuid=f"t:p:{job_id}", task_id="t", array_index=job_id, attempt=1
    )
    transport.launched[(job_id, 1)] = launch
    path = logs.path("t", "t:p", job_id, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"last line of {job_id}\n")
    return launch


def test_a_hanging_server_holds_up_no_worker_flushing_an_ended_jobs_log(tmp_path: Path) -> None:
    logs = LogStore(tmp_path / "logs")
    server = _HangingServer()
    shipper = LogShipper(server, logs, list)  # type: ignore[arg-type]
    _ended_job(logs, server, 1)
    shipping = threading.Thread(target=shipper.ship, daemon=True)  # the shipping thread's POST hangs
    shipping.start()
    assert server.inside.wait(30)
    # a worker ends job 2 and flushes its log before reporting it: it must go on with its next
    # job (the shipping thread sends the lines later), not wait behind the hanging POST
    worker = threading.Thread(target=shipper.flush, args=(_ended_job(logs, server, 2),), daemon=True)
    worker.start()
    worker.join(timeout=60)
    finished = not worker.is_alive()
    server.answer.set()  # the server answers: a failure (nothing taken)
    shipping.join(timeout=60)
    assert finished, "the worker waited for the shipping thread's POST"
    assert server.posts == 1
    # After that failure, flushes leave the logs to the shipping thread for a while: a failing
    # server does not cost each ending job a POST of its own.
    server.posts = 0
    shipper._flush_after = 0.0
    shipper.flush(_ended_job(logs, server, 3))  # fails (the server takes nothing)
    shipper.flush(_ended_job(logs, server, 4))
    shipper.flush(_ended_job(logs, server, 5))
    assert server.posts == 1


def test_a_chunk_the_server_refuses_is_sent_once_and_the_other_jobs_logs_go_on(
    start_server: Callable[..., HtcServer], tmp_path: Path
) -> None:
    """Against a real server: an attempt that is not this agent's (here a stale one, the attempt
    after the one it was leased) is refused with 409. Its pending lines are dropped, not sent
    again at every ship for ever; the lines of the agent's other job, refused with it in the
    same POST, are sent again and reach the server."""
    srv = start_server(args=("--no-executor",), env={"OPENHTC_AGENT_LIVENESS_SECONDS": "600"})
    api = srv.api()
    project_id, task_id = submit(api, 2)
    outbox = Outbox(tmp_path / "outbox")
    outbox.open()
    transport = HttpTransport(srv.url, agent_token(srv), outbox, labels={}, runtime="process", version="test")
    try:
        transport.register("agent-logs", "inc-1", DEFAULT_REGION, ["X86"], Capacity(2, 4096))
        launches: list[JobLaunch] = []
        deadline = time.monotonic() + 30
        while len(launches) < 2 and time.monotonic() < deadline:
            launches += transport.claim("agent-logs", DEFAULT_REGION, ["X86"], Capacity(2, 4096), 2)
        kept, other = sorted(launches, key=lambda launch: launch.array_index)
        stale = other._replace(attempt=other.attempt + 1)  # the server knows attempt 1 only
        transport.launched[(stale.job_id, stale.attempt)] = stale
        logs = LogStore(tmp_path / "logs")
        for launch in (kept, stale):
            path = logs.path(
                launch.task_id, launch.job_uuid.rpartition(":")[0], launch.array_index, launch.attempt
            )
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f"{time.time()}\tline of {launch.array_index} attempt {launch.attempt}\n")
        posts: list[set[tuple[int, int]]] = []
        send = transport.send_logs

        def counted(chunks: list[dict[str, Any]], timeout: float | None = None) -> Any:
            posts.append({(c["job_id"], c["attempt"]) for c in chunks})
            return send(chunks, timeout)

        transport.send_logs = counted  # type: ignore[method-assign]
        held = [(kept.job_id, kept.attempt), (stale.job_id, stale.attempt)]
        shipper = LogShipper(transport, logs, lambda: list(held))
        for _ in range(6):
            shipper.ship()
        refused = (stale.job_id, stale.attempt)
        assert sum(refused in sent for sent in posts) == 1, posts
        assert refused not in transport.launched and refused not in shipper._tails
        kept_uuid = kept.job_uuid
        assert api.log_lines(project_id, task_id, kept_uuid) == [f"line of {kept.array_index} attempt 1"]
    finally:
        transport.close()
        outbox.close()
