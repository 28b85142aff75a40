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


class _Leadership:
    """Leadership the test switches; it tells when the loop has asked it three times."""

    def __init__(self) -> None:
        self.leading = False
        self.asked = 0
        self.asked_thrice = threading.Event()

    @property
    def is_leader(self) -> bool:
        self.asked += 1
        if self.asked == 3:
            self.asked_thrice.set()
        return self.leading


def test_rounds_run_only_while_leading_and_a_failed_round_is_logged_and_the_loop_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    leadership = _Leadership()
    loop = _Counting(SimpleNamespace(leadership=leadership))
    with caplog.at_level(logging.ERROR, "openhtc.test.periodic"):
        loop.start()
        try:
            # three periods went by (the loop asked each time), and not the leader: nothing ran
            assert leadership.asked_thrice.wait(30), "the loop never asked whether it leads"
            assert loop.rounds == 0
            leadership.leading = True
            assert loop.third.wait(30), "no rounds after becoming the leader"
        finally:
            loop.stop()
    assert loop._thread is not None and not loop._thread.is_alive()
    assert "counting round failed" in caplog.text and "the first round breaks" in caplog.text


def test_retention_and_allocation_run_on_it() -> None:
    from openhtc.services.allocation import AllocationLoop

    assert issubclass(RetentionSweeper, LeaderLoop) and issubclass(AllocationLoop, LeaderLoop)
    assert (RetentionSweeper.name, AllocationLoop.name) == ("retention", "allocation")
