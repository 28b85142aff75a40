"""Leadership and the cluster notifier's messages, as pure code (fake lock, fake channel)."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Sequence

import pytest

from openhtc.services.leadership import Leadership
from openhtc.services.notify import EVERYTHING, MAX_PAYLOAD, ClusterNotifier, job_key, task_key
from openhtc.services.wakeups import Wakeups

pytestmark = pytest.mark.unit


class FakeLock:
    def __init__(self) -> None:
        self.free = True
        self.released = 0

    def hold(self) -> bool:
        if isinstance(self.free, Exception):
            raise self.free
        return self.free

    def release(self) -> None:
        self.released += 1


def test_leadership_follows_the_lock_and_tells_its_listeners() -> None:
    lock = FakeLock()
    leadership = Leadership(lock)
    changes: list[bool] = []
    leadership.on_change(changes.append)
    assert not leadership.is_leader
    assert leadership.check() and leadership.is_leader
    assert leadership.check()  # still held: no second change
    lock.free = False  # the connection was lost
    assert not leadership.check() and not leadership.is_leader
    lock.free = RuntimeError("adapter bug")  # type: ignore[assignment]
    assert not leadership.check()  # a failing check never leaves a stale leader
    lock.free = True
    leadership.check()
    assert changes == [True, False, True]
    leadership.stop()
    assert not leadership.is_leader and lock.released == 1


def test_always_leads_without_a_thread() -> None:
    leadership = Leadership.always()
    assert leadership.is_leader
    leadership.start()
    assert leadership._thread is None
    leadership.stop()


class FakeChannel:
    def __init__(self) -> None:
        self.sent: list[str] = []

    def send(self, payloads: Sequence[str]) -> None:
        self.sent.extend(payloads)

    def listen(self, deliver: Callable[[str | None], None], stopping: threading.Event) -> None:
        stopping.wait()

    def close(self) -> None:
        pass


def _notifier(is_leader: bool = False) -> tuple[ClusterNotifier, Wakeups, list[str]]:
    wakeups = Wakeups()
    kicks: list[str] = []
    wakeups.on_executor_work(lambda: kicks.append("kick"))
    notifier = ClusterNotifier(FakeChannel(), wakeups, lambda: is_leader)
    notifier.connected = True  # as if started, without its threads: the tests take messages by hand
    return notifier, wakeups, kicks


def test_keys_and_wake_ups_go_out_in_one_message() -> None:
    notifier, wakeups, _ = _notifier()
    assert notifier.message() is None
    notifier.publish((job_key(7), task_key("t1")))
    notifier.publish((job_key(7),))
    wakeups.schedule_round.set()  # a follower's submit: the leader must run a round
    wakeups.queued()
    body = json.loads(notifier.message() or "")
    assert sorted(map(tuple, body["k"])) == [("job", 7), ("task", "t1")]
    assert body["w"] == ["queued", "round"]
    assert notifier.message() is None  # taken


def test_a_leaders_own_rounds_stay_local_and_big_messages_say_everything() -> None:
    notifier, wakeups, _ = _notifier(is_leader=True)
    wakeups.schedule_round.set()
    assert notifier.message() is None
    notifier.publish(job_key(i) for i in range(MAX_PAYLOAD))
    body = json.loads(notifier.message() or "")
    assert body["k"] == [list(EVERYTHING)]


def test_received_messages_wake_this_server_but_its_own_are_ignored() -> None:
    notifier, wakeups, kicks = _notifier()
    other, _, _ = _notifier()
    other.publish((job_key(1),))
    other.wakeups.queued()
    notifier.receive(other.message())
    assert kicks == ["kick"]
    other.wakeups.schedule_round.set()
    notifier.receive(other.message())
    assert wakeups.schedule_round.wait(0)
    notifier.publish((job_key(2),))
    notifier.wakeups.queued()
    kicks.clear()
    notifier.receive(notifier.message())  # its own, echoed by PostgreSQL: ignored
    assert kicks == []
    notifier.receive("not json")  # malformed: ignored
    notifier.receive(None)  # reconnected: may have missed messages, so everything wakes
    assert kicks == ["kick", "kick"] and wakeups.schedule_round.wait(0)
