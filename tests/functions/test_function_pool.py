"""The function pool on its own, with real workers (the process runtime, the handler in a code
zip), driven as an executor slot drives it: the calls of a window queued in one worker and
finished in order, at the pace the test sets. So the executor can lag behind its worker on
purpose, which a server only does under load (docs/functions.md, "Warm workers").
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.functions.conftest import handlers_zip

from openhtc.domain.enums import FailureCode
from openhtc.domain.models import JobLaunch, Mount
from openhtc.functions.pool import DatabaseResults, FunctionCall, FunctionPool
from openhtc.runtimes.base import JobLog, RunHandle
from openhtc.runtimes.process import ProcessRuntime
from openhtc.services.functions import FUNCTION_COMMAND
from openhtc.storage.layout import PROJECT_SHARED_ENV, TASK_SHARED_ENV

# Each call leaves a file per execution ({x}.{pid}) in the task folder before it sleeps.
SOURCE = """
import os, time

def run(event, context):
    folder = os.path.join(os.environ["TASK_SHARED_FOLDER"], "runs")
    os.makedirs(folder, exist_ok=True)
    open(os.path.join(folder, "%d.%d" % (event["x"], os.getpid())), "w").close()
    time.sleep(event.get("sleep", 0))
    return event["x"]
"""


class Slot:
    """A pool over the process runtime, and the calls of one batch."""

    def __init__(self, root: Path) -> None:
        self.shared, self.task = root / "shared", root / "task"
        self.shared.mkdir()
        self.task.mkdir()
        (self.shared / "m.zip").write_bytes(handlers_zip(SOURCE))
        self.events: dict[int, str] = {}
        self.runtime = ProcessRuntime(str(root / "runtime"))
        self.pool = FunctionPool(
            self.runtime,
            root / "functions",
            lambda batch, start, stop: {i: e for i, e in self.events.items() if start <= i < stop},
            DatabaseResults(),
            result_max_bytes=1 << 20,
            idle_seconds=60,
            max_idle=4,
        )

    def start(self, x: int, after: FunctionCall | None = None, sleep: float = 0) -> FunctionCall:
        self.events[x] = json.dumps({"x": x, "sleep": sleep})
        mounts = (
            Mount(PROJECT_SHARED_ENV, str(self.shared), "/shared", False),
            Mount(TASK_SHARED_ENV, str(self.task), "/task", False),
        )
        launch = JobLaunch(
            x + 1, 1, f"job:{x}", 7, x, "p", "t", "r", "python3",
            (FUNCTION_COMMAND, "fnlib.handlers.run", "m.zip"), (), 1, 512, 1, 60, None, mounts,
        )  # fmt: skip
        started = self.pool.start(launch, RunHandle(), JobLog(os.devnull), lambda: None, after)
        assert isinstance(started, FunctionCall)
        return started

    def runs(self) -> Counter[int]:
        folder = self.task / "runs"
        return Counter(int(n.split(".")[0]) for n in os.listdir(folder)) if folder.exists() else Counter()

    def until_running(self, x: int) -> None:
        deadline = time.monotonic() + 60
        while self.runs()[x] == 0:
            assert time.monotonic() < deadline, f"call {x} never started"
            time.sleep(0.02)


@pytest.fixture
def slot(tmp_path: Path) -> Iterator[Slot]:
    made = Slot(tmp_path)
    try:
        yield made
    finally:
        made.pool.close()
        made.runtime.close()


def test_a_stop_after_a_call_answered_kills_nothing_and_the_next_call_runs_once(slot: Slot) -> None:
    # The worker has answered A and runs B; the executor, behind, has not read A's reply yet
    # when A is stopped (a cancel that comes late). Only a call the worker runs is killed for
    # a stop: B is not killed, and it runs once.
    a = slot.start(0, sleep=0.3)
    b = slot.start(1, a, sleep=2)
    c = slot.start(2, b)
    assert not slot.pool.wait(a, 0.01)  # as a slot does: A and B written to the pipe
    slot.until_running(1)
    a.handle.stop()
    assert slot.pool.finish(a).succeeded  # it had answered: its answer stands
    assert slot.pool.finish(b).succeeded
    assert slot.pool.finish(c).succeeded
    assert slot.runs() == Counter([0, 1, 2])
    assert [(r.idx, r.result) for r in slot.pool.take_results()] == [(0, "0"), (1, "1"), (2, "2")]


def test_a_stopped_running_call_fails_alone_and_the_calls_in_its_pipe_run_once(slot: Slot) -> None:
    a = slot.start(0, sleep=30)
    b = slot.start(1, a)
    c = slot.start(2, b)
    assert not slot.pool.wait(a, 0.01)  # A and B in the pipe
    slot.until_running(0)
    a.handle.stop()
    stopped = slot.pool.finish(a)
    assert not stopped.succeeded and "stopped" in (stopped.reason or "")
    assert slot.pool.finish(b).succeeded
    assert slot.pool.finish(c).succeeded
    assert slot.runs() == Counter([0, 1, 2])
    assert [(r.idx, r.result) for r in slot.pool.take_results()] == [(1, "1"), (2, "2")]


def test_a_call_killed_for_the_one_before_it_may_have_run_and_is_not_run_again(slot: Slot) -> None:
    # A timed-out call's worker is killed; had A answered just before, the call after it is
    # the one running at the kill: it fails as an infrastructure fault (it may have run; the
    # server re-runs it on max_infrastructure_retries), and those behind it run once.
    a = slot.start(0, sleep=0.3)
    b = slot.start(1, a, sleep=30)
    c = slot.start(2, b)
    assert not slot.pool.wait(a, 0.01)  # A and B in the pipe
    slot.until_running(1)
    slot.pool._kill(a.worker, a)  # the kill for A lands as the worker is on B
    assert slot.pool.finish(a).succeeded
    lost = slot.pool.finish(b)
    assert lost.failure_code == FailureCode.ErrorInfrastructureFault.value
    assert "may have run" in (lost.reason or "")
    assert slot.pool.finish(c).succeeded
    assert slot.runs() == Counter([0, 1, 2])


def test_a_call_cancelled_while_it_waits_unsent_ends_at_once_and_never_runs(slot: Slot) -> None:
    # B waits in the executor behind A (not yet in the pipe) when its batch is cancelled. Once
    # A has answered, B is the head: a slot waiting on it hears at once that it has ended (it
    # does not wait out B's timeout), B ends stopped, and the worker goes on with C.
    a = slot.start(0, sleep=0.3)
    b = slot.start(1, a)
    c = slot.start(2, b)
    slot.until_running(0)
    b.handle.stop()
    assert slot.pool.finish(a).succeeded
    assert slot.pool.take_up(b) and slot.pool.unsent(c)  # as the slot's ``_hold`` sees them
    assert slot.pool.wait(b, 10), "a cancelled call waiting unsent is waited for"
    stopped = slot.pool.finish(b)
    assert not stopped.succeeded and "stopped" in (stopped.reason or "")
    assert slot.pool.finish(c).succeeded
    assert slot.runs() == Counter([0, 2])


def test_a_worker_emptied_by_a_stop_and_its_call_at_once_is_given_back_once(
    slot: Slot, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A stop takes B back (from the control thread) just as A's slot finishes A: its worker is
    # idle once, so two calls started next go to two workers, not both to that one.
    a = slot.start(0, sleep=0.3)
    b = slot.start(1, a)
    slot.until_running(0)
    done = slot.pool._done

    def racing(call: FunctionCall) -> bool:
        emptied = done(call)
        if call is a:  # between A leaving its worker's queue and the slot seeing what is left
            assert slot.pool.withdraw(b)
        return emptied

    monkeypatch.setattr(slot.pool, "_done", racing)
    assert slot.pool.finish(a).succeeded
    c, d = slot.start(2), slot.start(3)
    assert c.worker is not d.worker, "one worker was given back twice: two slots share it"
    assert slot.pool.finish(c).succeeded and slot.pool.finish(d).succeeded
    assert slot.runs() == Counter([0, 2, 3])
