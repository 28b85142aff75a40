"""services/periodic.py: the one leader-only loop behind retention and allocation queues."""

from __future__ import annotations

import logging
import threading
from types import SimpleNamespace
from typing import Any

import pytest

from openhtc.services.periodic import LeaderLoop
from openhtc.services.retention import RetentionSweeper

pytestmark = pytest.mark.unit


class _Counting(LeaderLoop):
    name = "counting"

    def __init__(self, services: Any) -> None:
        super().__init__(services, 0.01, logging.getLogger("openhtc.test.periodic"))
        self.rounds = 0
        self.third = threading.Event()

    def round(self) -> None:
        self.rounds += 1
        if self.rounds == 3:
            self.third.set()
        if self.rounds == 1:
            raise RuntimeError("the first round breaks")


def test_rounds_run_only_while_leading_and_a_failed_round_is_logged_and_the_loop_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    leadership = SimpleNamespace(is_leader=False)
    loop = _Counting(SimpleNamespace(leadership=leadership))
    with caplog.at_level(logging.ERROR, "openhtc.test.periodic"):
        loop.start()
        try:
            assert not loop.third.wait(0.1) and loop.rounds == 0  # not the leader: nothing runs
            leadership.is_leader = True
            assert loop.third.wait(30), "no rounds after becoming the leader"
        finally:
            loop.stop()
    assert loop._thread is not None and not loop._thread.is_alive()
    assert "counting round failed" in caplog.text and "the first round breaks" in caplog.text


def test_retention_and_allocation_run_on_it() -> None:
    from openhtc.services.allocation import AllocationLoop

    assert issubclass(RetentionSweeper, LeaderLoop) and issubclass(AllocationLoop, LeaderLoop)
    assert (RetentionSweeper.name, AllocationLoop.name) == ("retention", "allocation")
