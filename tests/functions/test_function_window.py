"""A window of calls in a slot (docs/functions.md, "Warm workers") holds up nothing but its
own calls: a call cancelled while it waits in the executor never runs, and a call of another
kind next in line runs in any slot that frees, not behind the window's long call.

The server has 4 vCPUs: two slots for calls of ``maxVCpus: 2``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest
from tests.functions.conftest import Functions, functions_on, server_with

from openhtc.testing.server import HtcServer

# Each call writes when it began and ended ("{tag}{x}": "began ended") in the task folder.
SOURCE = """
import os, time

def _write(path, text):  # whole, for a reader at any time
    with open(path + ".part", "w") as out:
        out.write(text)
    os.replace(path + ".part", path)

def _span(tag, event):
    folder = os.path.join(os.environ["TASK_SHARED_FOLDER"], "spans")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "%s%d" % (tag, event["x"]))
    began = time.time()
    _write(path, "%f" % began)
    time.sleep(event["sleep"])
    _write(path, "%f %f" % (began, time.time()))
    return event["x"]

def a(event, context):
    return _span(event.get("tag", "a"), event)

def b(event, context):
    return _span("b", event)
"""
ENV = {
    "OPENHTC_FUNCTION_WORKER_WINDOW": "16",
    "OPENHTC_EXECUTOR_PREFETCH": "64",
    "OPENHTC_EXECUTOR_VCPUS": "4",
}


@pytest.fixture(scope="module")
def window_server(
    tmp_path_factory: pytest.TempPathFactory, db_kind: str, request: pytest.FixtureRequest
) -> Iterator[HtcServer]:
    yield from server_with(tmp_path_factory, db_kind, request, ENV)


@pytest.fixture
def fn(window_server: HtcServer) -> Functions:
    return functions_on(window_server, "window.zip", SOURCE)


def _submit(fn: Functions, handler: str, events: list[dict[str, object]]) -> str:
    return fn.submit(
        f"fnlib.handlers.{handler}", events, code="window.zip", maxVCpus=2, execTimeoutSeconds=100
    )


def _spans(fn: Functions) -> dict[str, list[float]]:
    folder = fn.server.data_dir / "storage" / "projects" / fn.project_id / "tasks" / fn.task_id / "spans"
    if not folder.exists():
        return {}
    names = (name for name in os.listdir(folder) if not name.endswith(".part"))
    return {name: [float(t) for t in (folder / name).read_text().split()] for name in names}


def _cancel_y_while_x_runs(fn: Functions, x_sleeps: tuple[float, ...]) -> float:
    """Z (two calls) keeps both slots busy, so X (calls of ``x_sleeps``) and Y (ten calls of the
    same handler) are claimed together and Y's calls wait in X's window behind x0. Y is cancelled
    0.5 s after x0 begins, while Z's slot frees; every batch is then waited for. The cancel's time."""
    z = _submit(fn, "a", [{"tag": "z", "x": 0, "sleep": 3}, {"tag": "z", "x": 1, "sleep": 3.5}])
    time.sleep(1.0)
    x = _submit(fn, "a", [{"tag": "x", "x": i, "sleep": s} for i, s in enumerate(x_sleeps)])
    y = _submit(fn, "a", [{"tag": "y", "x": i, "sleep": 3} for i in range(10)])
    deadline = time.monotonic() + 60
    while "x0" not in _spans(fn):
        assert time.monotonic() < deadline, fn.server.log_tail()
        time.sleep(0.05)
    time.sleep(0.5)
    cancelled_at = time.time()
    assert fn.cancel(y) > 0
    fn.results(y, 10, timeout=60)
    fn.results(x, len(x_sleeps), timeout=60)
    fn.results(z, 2, timeout=60)
    return cancelled_at


def test_calls_cancelled_while_they_wait_in_a_window_never_run(fn: Functions) -> None:
    # Z keeps both slots busy, so X (one long call) and Y (same handler) are claimed together
    # and Y's calls wait in X's window, unsent behind it. Y is cancelled while X runs; the
    # other slot frees meanwhile: Y's waiting calls end stopped, none is run elsewhere.
    cancelled_at = _cancel_y_while_x_runs(fn, (6,))
    time.sleep(1.0)  # a call taken back at the cancel would have begun by now
    # y0 was in X's worker's pipe, behind x0: it may begin (then it is killed); none after it may
    late = sorted(k for k, v in _spans(fn).items() if k[0] == "y" and k != "y0" and v[0] > cancelled_at + 0.5)
    assert not late, f"cancelled calls began after the cancel: {late}"


def test_a_call_of_another_kind_next_in_line_runs_in_a_slot_that_frees(fn: Functions) -> None:
    # a0 and a1 keep both slots busy; then a2 (long) and b3 (another handler) come in line
    # together. a2's window must not keep b3 behind it: a1's slot frees long before a2 ends.
    busy = _submit(fn, "a", [{"x": 0, "sleep": 2.0}, {"x": 1, "sleep": 3.0}])
    time.sleep(1.0)
    long = _submit(fn, "a", [{"x": 2, "sleep": 8.0}])
    short = _submit(fn, "b", [{"x": 3, "sleep": 0.1}])
    fn.results(busy, 2, timeout=120)
    fn.results(long, 1, timeout=120)
    fn.results(short, 1, timeout=120)
    spans = _spans(fn)
    assert spans["b3"][0] < spans["a2"][1], f"b3 waited behind a2 although a slot was free: {spans}"


def test_calls_before_a_cancelled_one_are_still_taken_back_for_a_free_slot(fn: Functions) -> None:
    # X's long call heads a window that also holds X's short calls and, behind them, Y's calls,
    # which are cancelled: the cancelled ones end stopped where they wait, and X's waiting short
    # call is still taken back for the slot that frees (not held behind the long one).
    cancelled_at = _cancel_y_while_x_runs(fn, (12, 0.2, 0.2))
    spans = _spans(fn)
    late = sorted(k for k, v in spans.items() if k[0] == "y" and v[0] > cancelled_at + 0.5)
    assert not late, f"cancelled calls began after the cancel: {late}"
    # x1 is in x0's pipe (it may wait for it); x2 waits unsent and goes to the slot Z frees
    assert spans["x2"][0] < spans["x0"][1], f"x2 waited behind x0 although a slot was free: {spans}"
