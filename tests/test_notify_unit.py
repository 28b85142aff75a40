"""The change notifier (services/notify.py) on its own: who is woken, from which thread."""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from typing import Any

import pytest

from openhtc.services.notify import EVERYTHING, NOTHING_ENDED, LocalNotifier, job_key, task_key

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


def test_a_writers_facts_reach_only_the_subscribers_of_their_key_and_are_built_only_for_them() -> None:
    """A writer may say what its commit made of a key (a job's new row); the notifier asks for
    it on the event loop, only for keys someone waits on, and hands it to those subscriptions.
    Keys nobody waits on wake nothing (the loop is not even called), and ``published`` counts
    every publish, so a waiter can tell that nothing changed while it read."""
    asked: list[object] = []

    def facts(key: object) -> object:
        asked.append(key)
        return {"of": key}

    async def scenario() -> None:
        notify = LocalNotifier()
        before = notify.published()
        async with notify.subscribe([job_key(1)]) as one, notify.subscribe([task_key("t")]) as task:
            thread = threading.Thread(target=notify.publish, args=([job_key(1), job_key(2)], facts))
            thread.start()
            thread.join()
            assert await one.wait(5)
            assert one.facts == {job_key(1): {"of": job_key(1)}}
            assert asked == [job_key(1)]  # job 2 has no waiter: no fact built for it
            notify.publish([job_key(3)], facts)  # nobody waits on it
            assert not await task.wait(0.05) and asked == [job_key(1)] and not task.facts
        assert notify.published() == before + 2

    asyncio.run(scenario())


def test_a_writer_that_found_nobody_waiting_still_wakes_a_waiter_that_kept_its_read() -> None:
    """A report checks ``idle`` (nobody waits yet), a waiter subscribes and, seeing nothing
    published since its read, keeps that read; the report's ``()`` publish must wake it to read
    again, or a pushed wait sleeps through the job's end until its timeout."""

    async def main() -> bool:
        notifier = LocalNotifier()
        key = job_key(7)
        seen = notifier.published()  # the wait: before its read (the job still RUNNING)
        idle = notifier.idle  # the report, committed now: nobody subscribed yet
        async with notifier.subscribe((key,)) as sub:
            assert notifier.published() == seen  # the wait keeps its read
            writer = threading.Thread(target=lambda: notifier.publish(() if idle else (key,)))
            writer.start()
            writer.join()
            return await sub.wait(2.0)

    assert asyncio.run(main()), "the waiter was not woken: it would answer RUNNING at its timeout"


def test_writers_publishing_at_once_each_move_the_counter() -> None:
    """``published()`` counts every publish, whichever threads race: a lost count (two writers
    read the same value) or one moved back (a writer preempted between its read and its write)
    lets a waiter keep a read from before a commit and sleep through it. The tracer hands the
    GIL to the other writers between any two bytecodes of ``publish``, as a free-threaded build
    (or an unlucky switch) would."""
    notifier = LocalNotifier()
    code = LocalNotifier.publish.__code__

    def each_opcode(frame: Any, event: str, _arg: Any) -> Any:
        if event == "opcode":
            time.sleep(0.0002)  # the others run now
        return each_opcode

    def tracer(frame: Any, _event: str, _arg: Any) -> Any:
        if frame.f_code is not code:
            return None
        frame.f_trace_opcodes = True
        return each_opcode

    def writer() -> None:
        sys.settrace(tracer)
        try:
            for _ in range(40):
                notifier.publish(())
        finally:
            sys.settrace(None)

    writers = [threading.Thread(target=writer) for _ in range(4)]
    for thread in writers:
        thread.start()
    for thread in writers:
        thread.join()
    assert notifier.published() == 4 * 40


def test_a_claims_nothing_ended_never_hides_a_change_nobody_described() -> None:
    """A claim says of its tasks' keys that nothing ended (a results waiter woken by it keeps
    its page); any publish that says nothing of the key, before or after it and not yet seen
    by the waiter, leaves the waiter no fact, so it reads again."""

    def nothing(key: object) -> str:
        return NOTHING_ENDED

    async def scenario() -> None:
        notify = LocalNotifier()
        key = task_key("t")
        async with notify.subscribe([key]) as sub:
            notify.publish([key], nothing)  # a claim alone: the fact stands
            await asyncio.sleep(0)
            assert await sub.wait(1) and sub.facts.pop(key) == NOTHING_ENDED
            notify.publish([key])  # a report, then a claim, before the waiter looks
            notify.publish([key], nothing)
            await asyncio.sleep(0)
            assert await sub.wait(1) and key not in sub.facts
            notify.publish([key], nothing)  # a claim, then a report
            notify.publish([key])
            await asyncio.sleep(0)
            assert await sub.wait(1) and key not in sub.facts
            notify.publish([key], nothing)  # a claim, then a recovery (everything)
            notify.publish([EVERYTHING])
            await asyncio.sleep(0)
            assert await sub.wait(1) and not sub.facts
            notify.publish([key], lambda _: "a described change")  # a change with its fact, then
            notify.publish([key], nothing)  # a claim before the waiter looks: the fact stands
            await asyncio.sleep(0)
            assert await sub.wait(1) and sub.facts.pop(key) == "a described change"

    asyncio.run(scenario())
