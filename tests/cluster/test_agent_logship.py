"""The agent's log shipper and jobs shorter than its interval (a W1 of `true` jobs on agents).

A job can be claimed, run and end between two ships, so the shipper never sees it among the
executor's held attempts. Its log must still be shipped to its end, and the attempt then
forgotten: kept, it was read again at every ship for the agent's whole life, so each ship cost
more than the last and the agent's memory grew with every job it ever ran.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

from openhtc.agent.logship import LogShipper
from openhtc.services.logs import LogStore


class _Transport:
    """What the shipper uses of HttpTransport: the launches it made, and the logs POST."""

    def __init__(self) -> None:
        self.launched: dict[tuple[int, int], Any] = {}
        self.sent: list[dict[str, Any]] = []

    def send_logs(self, chunks: list[dict[str, Any]]) -> list[tuple[int, int, int]]:
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
