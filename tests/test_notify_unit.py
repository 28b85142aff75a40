"""The change notifier (services/notify.py) on its own: who is woken, from which thread."""

from __future__ import annotations

import asyncio
import threading

import pytest

from openhtc.services.notify import EVERYTHING, LocalNotifier, job_key, task_key

pytestmark = pytest.mark.unit


def test_a_publish_from_another_thread_wakes_only_the_subscribers_of_its_keys() -> None:
    async def scenario() -> None:
        notify = LocalNotifier()
        assert notify.idle
        async with notify.subscribe([job_key(1)]) as one, notify.subscribe([task_key("t")]) as task:
            assert not notify.idle and notify.waiters() == 2
            thread = threading.Thread(target=notify.publish, args=([job_key(1)],))
            thread.start()
            thread.join()
            assert await one.wait(5)
            assert not await task.wait(0.05)
            notify.publish([EVERYTHING])
            assert await one.wait(5) and await task.wait(5)
            assert not await one.wait(0)  # consumed
        assert notify.idle and notify.waiters() == 0

    asyncio.run(scenario())


def test_a_change_published_between_subscribing_and_waiting_is_not_lost() -> None:
    async def scenario() -> None:
        notify = LocalNotifier()
        async with notify.subscribe([task_key("t")]) as sub:
            notify.publish([task_key("t")])  # after the waiter's first read, before its wait
            await asyncio.sleep(0)
            assert await sub.wait(0)

    asyncio.run(scenario())


def test_publishing_with_nobody_waiting_does_nothing() -> None:
    notify = LocalNotifier()
    notify.publish([job_key(1), EVERYTHING])  # no loop, no subscriber: no error, no effect
    assert notify.idle
