"""Change notification: the server tells clients that wait (long polls, event streams) that a job
or a task changed, the moment the store has committed it.

A port with one in-process implementation. Writers (the executor protocol's reports and claims,
submits, cancels, recoveries) call ``publish`` after their transaction commits, from any thread;
waiters are coroutines on the server's event loop that ``subscribe`` to keys, then re-read what
they wait for. A notification says only "look again": a waiter always re-reads the store, so a
spurious or coalesced wake-up is harmless, and a waiter subscribes before its first read, so no
change between that read and its wait is lost.

Several servers on one PostgreSQL back the same port with ``LISTEN``/``NOTIFY``
(:class:`ClusterNotifier`): ``publish`` wakes this server's waiters and sends the keys, batched, in
a ``NOTIFY openhtc_changes`` after the commit; one listening connection per server feeds the keys
the others send into its local waiters. The same messages carry the wake-ups of the loops
(services/wakeups.py), so a submit on one server wakes the leader's scheduler on another.

When nobody waits, ``publish`` is one dictionary test: writers pay nothing for the feature.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Protocol

from openhtc.services.wakeups import CANCEL, QUEUED, ROUND, Wakeups

log = logging.getLogger("openhtc.notify")

Key = tuple[str, object]  # ("job", job row id) | ("task", task id)
Facts = Callable[[Key], Any]  # see Notifier.publish
EVERYTHING: Key = ("*", None)  # every waiter is woken: recoveries, cancels
# A claim's fact for its tasks' keys: jobs were claimed and none ended (a results waiter, woken
# by it, need not read: what it answers, the ended calls, did not change)
NOTHING_ENDED = "nothing ended"


def nothing_ended(key: Key) -> str:
    """The fact of a commit that ended no call, for every key it publishes (a claim's, a
    submit's): a results waiter woken by it need not read."""
    return NOTHING_ENDED


def job_key(job_id: int) -> Key:
    return ("job", job_id)


def task_key(task_id: str) -> Key:
    return ("task", task_id)


class Subscription:
    """A waiter's wake-up: level-triggered, consumed by ``wait``. ``facts``: what a writer said
    about a key along with its wake-up (see ``Notifier.publish``), taken by the waiter."""

    __slots__ = ("_event", "facts", "keys")

    def __init__(self, keys: frozenset[Key]) -> None:
        self.keys = keys
        self._event = asyncio.Event()
        self.facts: dict[Key, Any] = {}

    def fire(self) -> None:
        self._event.set()

    def pending(self) -> bool:
        """Whether a wake-up is waiting to be consumed by ``wait``."""
        return self._event.is_set()

    async def wait(self, timeout: float) -> bool:
        """True if a change was published since the last wait, waiting up to ``timeout`` s."""
        if self._event.is_set():
            self._event.clear()
            return True
        if timeout <= 0:
            return False
        try:
            await asyncio.wait_for(self._event.wait(), timeout)
        except TimeoutError:
            return False
        self._event.clear()
        return True


class Notifier(Protocol):
    @property
    def idle(self) -> bool:
        """True when nobody waits: writers may skip building their keys."""
        ...

    def publish(self, keys: Iterable[Key], facts: Facts | None = None) -> None:
        """Called after a commit, from any thread. ``facts``: what the commit made of a key, for
        its waiters (called on the event loop, only for keys someone here waits on; None: look
        again), so that a waiter can answer without reading it back."""
        ...

    def subscribe(self, keys: Iterable[Key]) -> AbstractAsyncContextManager[Subscription]:
        """Called on the event loop; wakes the subscription on every publish of one of ``keys``
        (and of ``EVERYTHING``) until the context exits."""
        ...

    def waiters(self) -> int:
        """How many subscriptions are open."""
        ...

    def published(self) -> int:
        """How many publishes this process has seen (it only grows): a waiter that read
        something while it stayed the same, then subscribed, need not read it again. So every
        commit a waiter could wait for publishes, if only ``()`` when ``idle``."""
        ...

    @property
    def closing(self) -> bool:
        """True once the server stops: every waiter answers now and every stream ends."""
        ...

    def close(self) -> None:
        """The server stops: wake every waiter (on the event loop), now and on subscribe."""
        ...


class LocalNotifier:
    """Waiters of this process; ``publish`` hands the keys to the event loop thread."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._subs: dict[Key, set[Subscription]] = {}
        self._closing = False
        # see published(). Writers publish from many threads: ``+= 1`` is a read and a write, so
        # two racing ones would count once, and a thread preempted between them would move the
        # counter back; either lets a waiter trust a read made before a commit (a lost wake-up)
        self._published = 0
        self._count_lock = threading.Lock()

    @property
    def closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        self._closing = True
        self._fire(frozenset((EVERYTHING,)))

    @property
    def idle(self) -> bool:
        return not self._subs

    def publish(self, keys: Iterable[Key], facts: Facts | None = None) -> None:
        with self._count_lock:
            self._published += 1
        loop = self._loop
        if not self._subs or loop is None:  # nobody waits: the common case costs this test
            return
        # A writer that found nobody waiting publishes (): a waiter that subscribed since then
        # may hold a read from before the commit and trust it (published() had not moved yet):
        # wake everyone to read again (rare: only that race gets here with subscribers).
        wanted = frozenset(keys) or frozenset((EVERYTHING,))
        # Only keys someone waits for wake the event loop (a claim publishes its tasks' keys while
        # a lone job's client waits on the job's). Racing a new subscription is harmless: it
        # reads after subscribing, so it sees what was committed before this publish.
        subs = self._subs
        if not wanted or (EVERYTHING not in wanted and not any(key in subs for key in wanted)):
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._fire(wanted, facts)
        else:
            with contextlib.suppress(RuntimeError):  # a closed loop: the server is stopping
                loop.call_soon_threadsafe(self._fire, wanted, facts)

    def _fire(self, keys: frozenset[Key], facts: Facts | None = None) -> None:
        for key in keys:  # every subscription is also under EVERYTHING
            subs = self._subs.get(key, ())
            fact = facts(key) if facts is not None and subs and key != EVERYTHING else None
            for sub in subs:
                if fact is None:
                    if sub.facts:  # a change nobody described: what an earlier one said no longer holds
                        if key == EVERYTHING:
                            sub.facts.clear()
                        else:
                            sub.facts.pop(key, None)
                # "nothing ended" adds to what the waiter has not seen yet: never over a change
                # it has not seen (a wake-up pending with no fact, or with another fact). Sound
                # only while the waiter reads as soon as it wakes (api/routes/functions.py:
                # RESULTS_GAP = 0): a claim published during a pause would hide a report.
                elif fact != NOTHING_ENDED or not sub.pending() or sub.facts.get(key) == NOTHING_ENDED:
                    sub.facts[key] = fact
                sub.fire()

    @asynccontextmanager
    async def subscribe(self, keys: Iterable[Key]) -> AsyncIterator[Subscription]:
        self._loop = asyncio.get_running_loop()
        sub = Subscription(frozenset(keys) | {EVERYTHING})
        for key in sub.keys:
            self._subs.setdefault(key, set()).add(sub)
        if self._closing:  # subscribed while the server stops: answer at once
            sub.fire()
        try:
            yield sub
        finally:
            for key in sub.keys:
                subs = self._subs.get(key)
                if subs is not None:
                    subs.discard(sub)
                    if not subs:
                        del self._subs[key]

    def waiters(self) -> int:
        """How many subscriptions are open (every one is under EVERYTHING)."""
        return len(self._subs.get(EVERYTHING, ()))

    def published(self) -> int:
        return self._published


class ChangeChannel(Protocol):
    """Messages between the servers on one database (store/pg_notify.py: LISTEN/NOTIFY)."""

    def send(self, payloads: Sequence[str]) -> None: ...

    def listen(self, deliver: Callable[[str | None], None], stopping: threading.Event) -> None: ...

    def close(self) -> None: ...


MAX_PAYLOAD = 7000  # bytes; PostgreSQL's NOTIFY payload limit is 8000
SEND_INTERVAL = 0.01  # seconds: what is published meanwhile goes out in one message


class ClusterNotifier:
    """The notifier of several servers on one PostgreSQL: this server's waiters are told at once
    (a :class:`LocalNotifier`), and a sender thread passes the keys and the relayed wake-ups
    (services/wakeups.py) to every other server in one NOTIFY per ``SEND_INTERVAL``; a listener
    thread applies what the others send. Keys too many for one message become ``EVERYTHING``."""

    def __init__(
        self, channel: ChangeChannel, wakeups: Wakeups, is_leader: Callable[[], bool] = lambda: False
    ) -> None:
        self.local = LocalNotifier()
        self.channel = channel
        self.wakeups = wakeups
        self.sender_id = uuid.uuid4().hex[:12]  # a server ignores its own messages
        self._lock = threading.Lock()
        self._keys: set[Key] = set()
        self._wakes: set[str] = set()
        self._pending = threading.Event()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self.connected = False  # start() sets it: then what is published goes to the others
        wakeups.relay_to(self._relay, round_wanted=lambda: not is_leader())

    # -- the Notifier port ---------------------------------------------------------------------

    @property
    def idle(self) -> bool:
        return False  # waiters on other servers are not known here: writers always say what changed

    @property
    def closing(self) -> bool:
        return self.local.closing

    def close(self) -> None:
        self.local.close()

    def publish(self, keys: Iterable[Key], facts: Facts | None = None) -> None:
        keys = frozenset(keys)
        self.local.publish(keys, facts)  # the other servers' waiters read again
        if not keys or not self.connected:  # not started (a command, a test's services): nobody to tell
            return
        with self._lock:
            self._keys |= keys
        self._pending.set()

    def subscribe(self, keys: Iterable[Key]) -> AbstractAsyncContextManager[Subscription]:
        return self.local.subscribe(keys)

    def waiters(self) -> int:
        return self.local.waiters()

    def published(self) -> int:
        return self.local.published()  # what the others send is published locally too

    # -- between servers -----------------------------------------------------------------------

    def _relay(self, kind: str) -> None:
        if not self.connected:
            return
        with self._lock:
            self._wakes.add(kind)
        self._pending.set()

    def start(self) -> None:
        self.connected = True
        for target, name in ((self._send_loop, "notify-send"), (self._listen, "notify-listen")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stopping.set()
        self._pending.set()
        for thread in self._threads:
            thread.join(timeout=5)
        self.channel.close()

    def message(self) -> str | None:
        """The pending keys and wake-ups as one payload (None when there are none); taken."""
        with self._lock:
            keys, self._keys = self._keys, set()
            wakes, self._wakes = self._wakes, set()
        if not keys and not wakes:
            return None
        body = {"s": self.sender_id, "w": sorted(wakes), "k": [list(k) for k in keys]}
        payload = json.dumps(body, separators=(",", ":"))
        if len(payload) > MAX_PAYLOAD:
            body["k"] = [list(EVERYTHING)]
            payload = json.dumps(body, separators=(",", ":"))
        return payload

    def _send_loop(self) -> None:
        while not self._stopping.is_set():
            self._pending.wait()
            self._pending.clear()
            payload = self.message()
            if payload is not None:
                try:
                    self.channel.send([payload])
                except Exception as exc:  # a hint lost: the loops' and waiters' timers cover it
                    log.debug("notify: not sent (%s)", exc)
            self._stopping.wait(SEND_INTERVAL)

    def _listen(self) -> None:
        self.channel.listen(self.receive, self._stopping)

    def receive(self, payload: str | None) -> None:
        """A message from another server (None: messages may have been missed: look at all)."""
        if payload is None:
            self.local.publish((EVERYTHING,))
            for kind in (ROUND, QUEUED, CANCEL):
                self.wakeups.apply(kind)
            return
        try:
            body = json.loads(payload)
            if body.get("s") == self.sender_id:
                return
            keys = [(str(k[0]), k[1]) for k in body.get("k", ())]
            wakes = [str(w) for w in body.get("w", ())]
        except (ValueError, TypeError, IndexError, AttributeError):
            log.warning("notify: ignored a malformed message %r", payload[:200])
            return
        if keys:
            self.local.publish(keys)
        for kind in wakes:
            self.wakeups.apply(kind)
