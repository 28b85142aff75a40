"""The executor's state, sans I/O: what it holds, and what to do next.

A plain class with no threads, locks, database or clock: every event comes in as a call (jobs
claimed, an attempt handed over or ended, a held job's wait, a heartbeat's answer, a tick with
the current time) and the answer says what to do (claim N jobs for this free capacity, launch
this attempt in a fresh slot, hand this one to the launcher behind the slot's current job,
withdraw it, kill these, journal these attempts before their hand-off, send these reports).
The local executor (``local.py``) is one driver: threads and a lock around it, the runtime and
the in-process service. ``htc agent`` is to be another, over HTTP.

Capacity: a *slot* is a reservation of vCPUs and memory taken from the free capacity when a
job starts fresh. A pipelined successor runs in its predecessor's slot (it fits in its
reservation) and takes the slot over when the predecessor ends; the slot's capacity is given
back only when its last job ends without a successor. So ``used`` is always the sum of the
live slots' reservations.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

from openhtc.domain.enums import JobStatus
from openhtc.domain.models import AttemptReport, Capacity, JobLaunch

Key = tuple[int, int]  # (job id, attempt)
_ENDS = (JobStatus.SUCCEEDED, JobStatus.FAILED)
# A turn (report flush + claim) costs about a millisecond of CPU whatever it carries. Turns come
# at most every TURN_SECONDS, so a lone job is seen finished within ~10 ms; while jobs finish
# faster than BUSY_RATE a second, every BUSY_TURN_SECONDS, so each turn carries ten or more.
TURN_SECONDS = 0.01
BUSY_TURN_SECONDS = 0.05
BUSY_RATE = 200.0
# A job held behind a running one looks for a free slot elsewhere after this long.
HOLD_SECONDS = 0.05
# The attempt journal is written ahead for the jobs expected to start before the turn after next.
PREMARK_SECONDS = BUSY_TURN_SECONDS


@dataclass(slots=True, eq=False)
class Attempt:
    """An attempt the executor took from the prefetched ones: handed over, or about to be."""

    launch: JobLaunch
    slot: int
    reserved: Capacity  # the slot's reservation: its own request, or its predecessor's
    marked: bool = False  # in the attempt journal: its process may have started
    begun: bool = False  # a worker took it up (else its turn was cancelled at stop)
    held_at: float | None = None  # when it was handed over behind the slot's running job
    handoff: Any = None  # what a pipelined runtime's start returned: a clean stop withdraws it
    driver: Any = None  # the driver's own data (the local executor's RunHandle)
    cancelled: bool = False  # the heartbeat stopped it: never queued again (``withdrawn``)

    @property
    def key(self) -> Key:
        return (self.launch.job_id, self.launch.attempt)


class Claim(NamedTuple):
    """Claim up to ``max_jobs`` jobs. ``free``: the capacity free right now; ``bound``: what the
    claim may take in all (jobs are packed into the real capacity when they start)."""

    max_jobs: int
    free: Capacity
    bound: Capacity
    idle: bool = False  # nothing held: an agent's claim may wait for work (a long poll)


class Stop(NamedTuple):
    """A heartbeat's answer applied: attempts to kill, and prefetched ones dropped whose
    journal records (written ahead) must be ended."""

    kill: list[Attempt]
    unjournal: list[Key]


class ExecutorState:
    def __init__(
        self,
        capacity: Capacity,
        max_running: int,
        prefetch: Prefetch,
        heartbeat_seconds: float,
        new_driver: Callable[[], Any] = lambda: None,
    ) -> None:
        self.capacity = capacity
        self.max_running = max_running
        self.prefetch = prefetch
        self.heartbeat_seconds = heartbeat_seconds
        self.new_driver = new_driver  # each attempt's driver data, made when it is taken
        self.used = Capacity(0, 0)
        self.completed = 0
        self.stopping = False
        self.pending: deque[JobLaunch] = deque()  # claimed (RUNNABLE), not taken yet
        self.running: dict[int, Attempt] = {}  # job id -> attempt taken, handed over or about to be
        self.reports: list[AttemptReport] = []
        # pending attempts journaled ahead of their hand-off: True once on disk
        self.premarked: dict[Key, bool] = {}
        self._slots = itertools.count(1)
        self._next_heartbeat = 0.0

    @property
    def free(self) -> Capacity:
        return self.capacity.minus(self.used.vcpus, self.used.memory_mb)

    # -- turns and claims -----------------------------------------------------------------------

    def next_turn(self, last_turn: float) -> float:
        """When the next turn may start, given when the last one did. At once when nothing
        runs or waits: a lone job's end has nothing to share its turn with, and a client waits
        for it (W5)."""
        if not self.running and not self.pending:
            return last_turn
        busy = self.prefetch.rate >= BUSY_RATE
        return last_turn + (BUSY_TURN_SECONDS if busy else TURN_SECONDS)

    def heartbeat_due(self, now: float, forced: bool = False) -> bool:
        """Whether to heartbeat now (every ``heartbeat_seconds``, or at once when ``forced``:
        a cancel arrived). A True answer schedules the next one."""
        if now < self._next_heartbeat and not forced:
            return False
        self._next_heartbeat = now + self.heartbeat_seconds
        return True

    def claim(self, now: float) -> Claim | None:
        """How many jobs to claim: the prefetch target beyond one per vCPU, less what is held."""
        if self.stopping:
            return None
        target = self.prefetch.target(self.completed, now)
        want = target + self.capacity.vcpus - len(self.pending) - len(self.running)
        if want <= 0:
            return None
        bound = Capacity(want * self.capacity.vcpus, want * self.capacity.memory_mb)
        return Claim(want, self.free, bound, not (self.pending or self.running or self.reports))

    def turn_took(self, seconds: float, polled: bool) -> None:
        """A turn (flush and claim) took ``seconds``. One whose claim was made holding nothing
        may have long-polled for work (htc agent: up to the server's poll seconds): how long
        it took says how long the fleet was idle, not how slow turns are, and would make the
        prefetch hoard a rate times two polls' worth (and journal it ahead) at the next burst."""
        if not polled:
            self.prefetch.turn_took(seconds)

    def claimed(self, launches: Iterable[JobLaunch]) -> None:
        self.pending.extend(launches)

    # -- launches -------------------------------------------------------------------------------

    def launch(self) -> Attempt | None:
        """The next prefetched job, in a fresh slot, if it fits in the free capacity."""
        if self.stopping or not self.pending or len(self.running) >= self.max_running:
            return None
        launch = self.pending[0]
        if not self.free.fits(launch.vcpus, launch.memory_mb):
            return None
        reserved = Capacity(launch.vcpus, launch.memory_mb)
        self.used = self.used.plus(reserved.vcpus, reserved.memory_mb)
        return self._take(next(self._slots), reserved)

    def successor(self, current: Attempt, now: float) -> Attempt | None:
        """The next prefetched job, to hand over behind ``current`` in its slot, if it fits in
        the slot's reservation: the capacity in use stays the same."""
        if self.stopping or not self.pending:
            return None
        launch = self.pending[0]
        if not current.reserved.fits(launch.vcpus, launch.memory_mb):
            return None
        successor = self._take(current.slot, current.reserved)
        successor.held_at = now
        return successor

    def _take(self, slot: int, reserved: Capacity) -> Attempt:
        launch = self.pending.popleft()
        # journaled ahead and on disk: marked already (else the driver journals it: ``to_mark``)
        marked = self.premarked.pop((launch.job_id, launch.attempt), False)
        attempt = Attempt(launch, slot, reserved, marked, driver=self.new_driver())
        self.running[launch.job_id] = attempt
        return attempt

    def adopted(self, launch: JobLaunch, driver: Any) -> Attempt:
        """An attempt a crashed predecessor handed over and the runtime still has (running, or
        ended with its exit code): it runs in a fresh slot of its own request, journaled and
        begun already, and ends as any other (``ended``)."""
        reserved = Capacity(launch.vcpus, launch.memory_mb)
        self.used = self.used.plus(reserved.vcpus, reserved.memory_mb)
        attempt = Attempt(launch, next(self._slots), reserved, marked=True, begun=True, driver=driver)
        self.running[launch.job_id] = attempt
        return attempt

    def should_withdraw(self, held: Attempt, now: float) -> bool:
        """Whether ``held``, waiting behind its slot's running job, should be taken back: it
        has waited HOLD_SECONDS and it fits in the free capacity (no job waits behind a long
        one while the machine has room)."""
        if held.held_at is None or now - held.held_at < HOLD_SECONDS:
            return False
        return self.free.fits(held.launch.vcpus, held.launch.memory_mb)

    def withdrawn(self, held: Attempt) -> None:
        """``held`` was taken back before it started: queued first again, out of its slot.
        (Its journal record is ended first: ``to_unmark``.) At stop, also an attempt that was
        never handed over; its slot is not given back then (nothing launches any more)."""
        self.running.pop(held.launch.job_id, None)
        if not held.cancelled:  # a stop decided under the same lock: taken back, it is dropped
            self.pending.appendleft(held.launch)

    def ended(self, attempt: Attempt, successor: Attempt | None) -> Attempt | None:
        """``attempt`` ended (its outcome is reported). ``successor``, handed over behind it,
        takes its slot over; without one, the slot's capacity is given back, and the next job
        that fits (in a fresh slot) is returned for the same worker."""
        self.completed += 1
        self.running.pop(attempt.launch.job_id, None)
        if successor is not None:
            return None
        self.used = self.used.minus(attempt.reserved.vcpus, attempt.reserved.memory_mb)
        return self.launch()

    # -- the attempt journal --------------------------------------------------------------------

    def to_premark(self) -> list[Key]:
        """The attempts next in line, to journal at once ahead of their hand-off: those that fit
        in the free vCPUs, plus the work expected at the observed rate until the turn after next
        (two of PREMARK_SECONDS plus a turn's duration): a window that ran out before the next
        turn's would have the workers sync the journal themselves, between two calls."""
        if self.stopping:
            return []
        ahead = self.prefetch.rate * 2 * (PREMARK_SECONDS + self.prefetch.turn)
        window = max(0, self.capacity.vcpus - self.used.vcpus) + int(ahead)
        keys = []
        for launch in itertools.islice(self.pending, window):
            key = (launch.job_id, launch.attempt)
            if key not in self.premarked:
                self.premarked[key] = False
                keys.append(key)
        return keys

    def premarked_on_disk(self, keys: Iterable[Key]) -> None:
        for key in keys:
            if key in self.premarked:  # else a worker took it meanwhile (and journaled it itself)
                self.premarked[key] = True

    @staticmethod
    def to_mark(attempt: Attempt) -> Key | None:
        """The journal record to make durable before ``attempt`` is handed to the runtime."""
        return None if attempt.marked else attempt.key

    @staticmethod
    def journaled(attempt: Attempt) -> None:
        """``to_mark``'s record is durable."""
        attempt.marked = True

    def to_unmark(self, attempt: Attempt) -> Key | None:
        """The journal record to end for an attempt taken back before it started."""
        if not attempt.marked:
            return None
        attempt.marked = False
        return attempt.key

    # -- reports, heartbeats, stop --------------------------------------------------------------

    def report(
        self,
        launch: JobLaunch,
        status: JobStatus,
        at: float,
        exit_code: int | None = None,
        failure_code: str | None = None,
        reason: str | None = None,
    ) -> None:
        self.reports.append(
            AttemptReport(launch.job_id, launch.attempt, status, at, exit_code, failure_code, reason)
        )

    def take_reports(self) -> list[AttemptReport]:
        reports, self.reports = self.reports, []
        return reports

    def reports_failed(self, reports: list[AttemptReport]) -> None:
        """Not delivered: kept for the next flush (the store ignores duplicates)."""
        self.reports[:0] = reports

    @staticmethod
    def reports_delivered(reports: Iterable[AttemptReport]) -> list[Key]:
        """The journal records to end: these attempts' ends are committed, a crash can no
        longer re-run them."""
        return [(r.job_id, r.attempt) for r in reports if r.status in _ENDS]

    def held(self) -> list[Key]:
        """Every attempt under this executor's lease, for the heartbeat."""
        keys = [(j.job_id, j.attempt) for j in self.pending]
        keys += [a.key for a in self.running.values()]
        return keys

    def stop_attempts(self, keys: Iterable[Key]) -> Stop:
        """The heartbeat's answer: these attempts are no longer this executor's (cancelled,
        or leased elsewhere). Prefetched ones are dropped, running ones are to be killed."""
        stop = set(keys)
        if not stop:
            return Stop([], [])
        self.pending = deque(j for j in self.pending if (j.job_id, j.attempt) not in stop)
        kill = [a for a in self.running.values() if a.key in stop]
        for attempt in kill:
            attempt.cancelled = True
        unjournal = [key for key in stop if self.premarked.pop(key, None) is not None]
        return Stop(kill, unjournal)

    def stop(self) -> None:
        """Take no more work: no claims, launches, successors or journaling ahead."""
        self.stopping = True

    def held_in_runtime(self) -> list[Any]:
        """At stop: what the runtime holds behind running jobs (their ``handoff``), to withdraw
        before those are killed, since a job's end starts what waits behind it. Some may have
        started meanwhile: their withdrawal fails and they are killed with the rest."""
        return [a.handoff for a in self.running.values() if a.held_at is not None and a.handoff is not None]

    def handed_over(self) -> int:
        """At stop: how many attempts a worker has taken up and not yet ended or taken back."""
        return sum(1 for a in self.running.values() if a.begun)

    def never_started(self) -> list[Key]:
        """At stop: the attempts journaled ahead or taken and never handed over, whose journal
        records are to be ended (a restart re-queues them free)."""
        keys, self.premarked = list(self.premarked), {}
        keys += [a.key for a in self.running.values() if not a.begun]
        return keys


class Prefetch:
    """How many RUNNABLE jobs to hold beyond those running: about ``seconds`` of work.

    Short jobs finish faster than a claim round trip, so the executor keeps a buffer sized by
    the observed completion rate (at least two per vCPU; two turns' worth when turns are slow).
    Long jobs keep it small, so a project that submits later waits behind little prefetched
    work. A fixed size overrides this.
    """

    def __init__(self, fixed: int | None, seconds: float, vcpus: int, ceiling: int = 4096) -> None:
        self.fixed = fixed
        self.seconds = seconds
        self.floor = 2 * vcpus
        self.ceiling = ceiling
        self.rate = 0.0
        self.turn = 0.0  # how long the executor's turns (report and claim) take, smoothed
        self._last: tuple[int, float] | None = None

    def turn_took(self, seconds: float) -> None:
        """A turn's duration: the buffer must last until the next turn's claim lands."""
        self.turn = max(seconds, 0.5 * self.turn + 0.5 * seconds)

    def target(self, completed: int, now: float) -> int:
        if self._last is None:
            self._last = (completed, now)
        elif now - self._last[1] >= 0.1:  # the rate is kept even with a fixed size: turns use it
            rate = (completed - self._last[0]) / (now - self._last[1])
            self.rate = 0.5 * self.rate + 0.5 * rate
            self._last = (completed, now)
        if self.fixed is not None:
            return self.fixed
        # Enough for ``seconds``, and for two turns when turns take longer (a loaded database):
        # else the slots run dry while a slow turn's claim is still on its way.
        held = self.rate * max(self.seconds, 2 * (self.turn + BUSY_TURN_SECONDS))
        return max(self.floor, min(self.ceiling, int(held)))
