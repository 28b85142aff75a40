"""The embedded local executor: runs jobs on this machine through a runtime.

One control thread claims work, flushes reports and heartbeats; a thread pool runs attempts.
Jobs are packed into the machine's capacity by vCPUs and memory. A few extra jobs are held
RUNNABLE (prefetched) so a finishing job is replaced at once, without waiting for the database.
"""

from __future__ import annotations

import itertools
import logging
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from openhtc.config import Settings
from openhtc.domain.enums import FailureCode, JobStatus
from openhtc.domain.errors import InsufficientStorage, Unavailable
from openhtc.domain.models import AttemptReport, Capacity, JobLaunch
from openhtc.executor.capacity import local_capacity
from openhtc.executor.journal import AttemptJournal
from openhtc.runtimes.base import JobLog, Outcome, Pipelined, RunHandle, Runtime
from openhtc.services.executors import ExecutorService
from openhtc.services.logs import LogStore
from openhtc.services.wakeups import Wakeups
from openhtc.storage.staging import NoStager, Stager

log = logging.getLogger("openhtc.executor")
# A turn (report flush + claim) costs about a millisecond of CPU whatever it carries. Turns come
# at most every TURN_SECONDS, so a lone job is seen finished within ~10 ms; while jobs finish
# faster than BUSY_RATE a second, every BUSY_TURN_SECONDS, so each turn carries ten or more.
TURN_SECONDS = 0.01
BUSY_TURN_SECONDS = 0.05
BUSY_RATE = 200.0
# A job held behind a running one (see _work) looks for a free slot elsewhere this often.
HOLD_SECONDS = 0.05
# The attempt journal is written ahead for the jobs expected to start before the next turn.
PREMARK_SECONDS = BUSY_TURN_SECONDS
_ENDS = (JobStatus.SUCCEEDED, JobStatus.FAILED)


@dataclass(slots=True)
class _Running:
    launch: JobLaunch
    handle: RunHandle
    reserved: Capacity  # what it holds of the machine: its own request, or its predecessor's
    marked: bool = False  # in the attempt journal: its process may have started
    begun: bool = False  # a worker took it up (else its turn was cancelled at stop)


@dataclass(slots=True)
class _Begun:
    """A job handed to the runtime: its staged launch and log, and how far it got."""

    launch: JobLaunch
    log: JobLog
    staged: bool = False
    started: Any = None  # what a pipelined runtime's start() returned
    outcome: Outcome | None = None  # set if it ended before it started


class LocalExecutor:
    def __init__(
        self,
        service: ExecutorService,
        runtime: Runtime,
        settings: Settings,
        logs: LogStore,
        wakeups: Wakeups,
        region: str,
        architectures: list[str],
        stager: Stager | None = None,
    ) -> None:
        self.service = service
        self.stager: Stager = stager or NoStager()
        self.runtime = runtime
        self.settings = settings
        self.logs = logs
        self.wakeups = wakeups
        self.region = region
        self.architectures = architectures
        self.executor_id = f"local-{socket.gethostname()}"
        self.incarnation = uuid.uuid4().hex
        self.capacity: Capacity = local_capacity(settings)
        self._pipeline = runtime if isinstance(runtime, Pipelined) else None
        # Attempts handed to the runtime, on disk before the hand-off (see journal.py). A
        # runtime that never blocks (noop) starts no process, so it needs none.
        self.journal: AttemptJournal | None = None
        if runtime.blocking:
            path = settings.data_dir / "executor" / f"attempts-{self.executor_id}.journal"
            self.journal = AttemptJournal(path, sync=settings.executor_journal_sync)
        self.prefetch = Prefetch(
            settings.executor_prefetch, settings.executor_prefetch_seconds, self.capacity.vcpus
        )
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._pending: deque[JobLaunch] = deque()
        # pending attempts journaled ahead of their hand-off (see _premark): True once on disk
        self._premarked: dict[tuple[int, int], bool] = {}
        self._running: dict[int, _Running] = {}
        self._used = Capacity(0, 0)
        self._completed = 0
        self._reports: list[AttemptReport] = []
        self._pool = ThreadPoolExecutor(max_workers=settings.max_running_jobs, thread_name_prefix="job")
        self._reporter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="executor-report")
        self._thread = threading.Thread(target=self._loop, name="local-executor", daemon=True)

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        self.wakeups.on_executor_work(self.kick)
        # The tag names this installation too: several servers may share one host.
        owner = f"{self.executor_id}@{self.settings.data_dir.resolve()}"
        orphans = self.runtime.adopt(owner, self.incarnation)
        if orphans:
            log.warning("killed %d process(es) left running by a previous start of this executor", orphans)
        # What the previous start handed to its runtime and never saw end may have run: its
        # orphans are dead now (adopt), and recovery fails those attempts instead of re-queueing.
        may_have_started = self.journal.replay() if self.journal is not None else set()
        recovered = self.service.register(
            self.executor_id,
            self.incarnation,
            self.region,
            self.architectures,
            self.capacity,
            may_have_started,
        )
        if recovered:
            log.warning("recovered %d job(s) left running by a previous start of this executor", recovered)
        if self.journal is not None:
            self.journal.open()  # only now: the recovery that needed the old one is committed
        self._thread.start()

    def stop(self) -> None:
        """Stop claiming, kill what runs, report it, and leave."""
        self._stopping.set()
        self._wake.set()
        self._thread.join(timeout=10)
        with self._lock:
            running = list(self._running.values())
        for item in running:
            item.handle.stop()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._reporter.shutdown(wait=True)
        self._flush()
        if self.journal is not None:
            with self._lock:  # journaled ahead, never started: a restart re-queues them free
                ahead, self._premarked = list(self._premarked), {}
                # taken from the queue, but their worker's turn was cancelled by the shutdown
                ahead += [(r.launch.job_id, r.launch.attempt) for r in self._running.values() if not r.begun]
            self.journal.end(ahead)
            self.journal.close()

    def kick(self) -> None:
        self._wake.set()

    # -- control loop ---------------------------------------------------------------------------

    def _loop(self) -> None:
        next_heartbeat = 0.0
        last_turn = 0.0
        while not self._stopping.is_set():
            self._wake.wait(timeout=0.25)
            # Completions that arrive between two turns share one report and one claim;
            # prefetched jobs keep the machine busy in between.
            busy = self.prefetch.rate >= BUSY_RATE
            pause = last_turn + (BUSY_TURN_SECONDS if busy else TURN_SECONDS) - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            self._wake.clear()
            last_turn = time.monotonic()
            try:
                self._report_and_claim()
                now = time.monotonic()
                if now >= next_heartbeat or self._cancel_requested():
                    self._heartbeat()
                    next_heartbeat = now + self.settings.heartbeat_seconds
                self._premark()
                self._start_pending()
            except (Unavailable, InsufficientStorage) as exc:  # an outage: one line, not a traceback
                log.warning("executor: %s", exc.message)
                time.sleep(0.5)
            except Exception:  # keep the executor alive; the lease protects the jobs
                log.exception("executor loop error")
                time.sleep(0.5)

    def _report_and_claim(self) -> None:
        """Flush the reports and claim more jobs at once, each in its own transaction.

        On PostgreSQL each is a few round trips and most of their time is the server's work, so
        overlapping them shortens a turn. They lock disjoint job rows (reported jobs are held by
        this executor, claimed ones were queued) and the counter rows in one order
        (``bump_counters``), so they cannot deadlock. SQLite has one write lock: there the
        second would only wait for the first, so they run one after the other.
        """
        with self._lock:
            has_reports = bool(self._reports)
        if not has_reports or not self.service.concurrent_writes:
            self._flush()
            self._claim()
            return
        flushed = self._reporter.submit(self._flush)
        try:
            self._claim()
        finally:
            flushed.result()

    def _cancel_requested(self) -> bool:
        return self.wakeups.cancelled.wait(0)

    def _claim(self) -> None:
        if self._stopping.is_set():
            return
        with self._lock:
            target = self.prefetch.target(self._completed, time.monotonic())
            want = target + self.capacity.vcpus - len(self._pending) - len(self._running)
        if want <= 0:
            return
        # Claims are bounded by count; jobs are packed into the real capacity when they start.
        unbounded = Capacity(want * self.capacity.vcpus, want * self.capacity.memory_mb)
        launches = self.service.claim(self.executor_id, self.region, self.architectures, unbounded, want)
        if launches:
            with self._lock:
                self._pending.extend(launches)

    def _start_pending(self) -> None:
        """Start prefetched jobs while they fit in the free capacity."""
        while True:
            with self._lock:
                item = self._take_next()
            if item is None:
                return
            if self.runtime.blocking:
                self._pool.submit(self._work, item)
            else:
                self._work(item)  # finishes at once, and drains what else fits

    def _take_next(self) -> _Running | None:
        """Pop the next prefetched job if it fits in the free capacity (hold ``_lock``)."""
        if not self._pending or len(self._running) >= self.settings.max_running_jobs:
            return None
        launch = self._pending[0]
        free = self.capacity.minus(self._used.vcpus, self._used.memory_mb)
        if not free.fits(launch.vcpus, launch.memory_mb):
            return None
        self._used = self._used.plus(launch.vcpus, launch.memory_mb)
        return self._pop_pending(Capacity(launch.vcpus, launch.memory_mb))

    def _take_successor(self, current: _Running) -> _Running | None:
        """Pop the next prefetched job if it fits in ``current``'s reservation, which it takes
        over when ``current`` ends: the capacity in use stays the same."""
        with self._lock:
            if not self._pending or self._stopping.is_set():
                return None
            launch = self._pending[0]
            if not current.reserved.fits(launch.vcpus, launch.memory_mb):
                return None
            return self._pop_pending(current.reserved)

    def _pop_pending(self, reserved: Capacity) -> _Running:
        """Move the first prefetched job to the running ones, holding ``reserved`` (hold ``_lock``)."""
        launch = self._pending.popleft()
        # journaled ahead and on disk: marked already (in the sync, or not ahead: _mark does it)
        item = _Running(
            launch, RunHandle(), reserved, self._premarked.pop((launch.job_id, launch.attempt), False)
        )
        self._running[launch.job_id] = item
        return item

    def _work(self, first: _Running) -> None:
        """Run a job, then the next prefetched one that fits, on this same thread.

        Taking the next job here, rather than handing it to another thread, keeps the gap
        between two short jobs to a lock acquisition. A pipelined runtime gets the next job
        while the current one still runs, and starts it the moment the current one ends.
        """
        item: _Running | None = first
        begun: _Begun | None = self._begin(first, None)
        while item is not None and begun is not None:
            successor = self._take_successor(item) if self._pipeline is not None else None
            after = self._begin(successor, begun.started) if successor is not None else None
            if successor is not None and after is not None and self._withdrawn(begun, successor, after):
                successor = after = None
            self._end(item, begun)
            with self._lock:
                self._completed += 1
                self._running.pop(item.launch.job_id, None)
                if successor is not None:  # it took over the reservation
                    item, begun = successor, after
                else:
                    self._used = self._used.minus(item.reserved.vcpus, item.reserved.memory_mb)
                    item, begun = None if self._stopping.is_set() else self._take_next(), None
            if item is not None and begun is None:
                begun = self._begin(item, None)
            self._wake.set()

    def _withdrawn(self, current: _Begun, successor: _Running, after: _Begun) -> bool:
        """Wait while ``successor`` is held behind the running ``current``. Every HOLD_SECONDS
        it looks for a free slot; given one, it is taken back from the runtime and queued first
        again, for a thread of its own: no job waits behind a long one while the machine has
        room. True if it was taken back."""
        assert self._pipeline is not None
        if current.started is None or after.started is None:
            return False  # nothing runs that it could wait for
        launch = successor.launch
        while not self._pipeline.wait(current.started, HOLD_SECONDS):
            with self._lock:
                free = self.capacity.minus(self._used.vcpus, self._used.memory_mb)
                if not free.fits(launch.vcpus, launch.memory_mb):
                    continue
            if not self._pipeline.withdraw(after.started):
                return False  # it started meanwhile: the current job has just ended
            self._unmark(successor)  # it never started
            with self._lock:
                self._running.pop(launch.job_id, None)
                self._pending.appendleft(launch)
            self._wake.set()
            return True
        return False

    def _begin(self, item: _Running, after: Any) -> _Begun:
        """Report STARTING and stage the job's storage; a pipelined runtime starts it now
        (behind the job that returned ``after``, if given)."""
        launch = item.launch
        item.begun = True
        self._report(launch, JobStatus.STARTING)
        parent = launch.job_uuid.rpartition(":")[0]
        begun = _Begun(
            launch, self.logs.attempt_log(launch.task_id, parent, launch.array_index, launch.attempt)
        )
        try:
            # Storage folders first (PROJECT_SHARED_FOLDER, TASK_SHARED_FOLDER), then the job.
            begun.launch = launch._replace(mounts=self.stager.prepare(launch))
            begun.staged = True
            if self._pipeline is not None:
                self._mark(item)
                started = self._pipeline.start(
                    begun.launch, item.handle, begun.log, self._on_running(begun.launch), after
                )
                if isinstance(started, Outcome):
                    begun.outcome = started
                else:
                    begun.started = started
        except Exception as exc:
            log.exception("runtime failed on job %s", launch.job_uuid)
            begun.outcome = Outcome(None, FailureCode.ErrorUnknownFailure.value, f"Runtime error: {exc}")
        return begun

    def _end(self, item: _Running, begun: _Begun) -> None:
        """Run the job to its end (or wait for it), finish its storage, report the outcome."""
        launch, outcome = begun.launch, begun.outcome
        if outcome is None:
            try:
                if self._pipeline is not None:
                    outcome = self._pipeline.finish(begun.started)
                else:
                    self._mark(item)
                    outcome = self.runtime.run(launch, item.handle, begun.log, self._on_running(launch))
            except Exception as exc:
                log.exception("runtime failed on job %s", launch.job_uuid)
                outcome = Outcome(None, FailureCode.ErrorUnknownFailure.value, f"Runtime error: {exc}")
        if begun.staged:  # before the report: a finished job's outputs are already in task storage
            self.stager.finish(launch, item.handle.stopped, begun.log)
        status = JobStatus.SUCCEEDED if outcome.succeeded else JobStatus.FAILED
        self._report(launch, status, outcome.exit_code, outcome.failure_code, outcome.reason)

    def _premark(self) -> None:
        """Journal the attempts next in line, all with one sync, ahead of their hand-off.

        A sync costs about a millisecond, as much as a whole `true` job: paid by a worker thread
        per job, between a job's end and its successor's hand-off, it cut W1 by ~30 %. Journaled
        here, once a turn, for the jobs likely to start before the next turn (those that fit in
        the free vCPUs, plus PREMARK_SECONDS of work at the observed rate), it is off their
        path; a job beyond that window is journaled by its worker. The price: a crash also fails
        the attempts journaled ahead and not yet started (they may have started, as far as
        recovery can tell), a few dozen at a thousand jobs a second.
        """
        if self.journal is None or not self.journal.sync:
            return
        with self._lock:
            free = max(0, self.capacity.vcpus - self._used.vcpus)
            window = free + int(self.prefetch.rate * PREMARK_SECONDS)
            keys = []
            for launch in itertools.islice(self._pending, window):
                key = (launch.job_id, launch.attempt)
                if key not in self._premarked:
                    self._premarked[key] = False
                    keys.append(key)
        if not keys:
            return
        self.journal.begin_many(keys)
        with self._lock:
            for key in keys:
                if key in self._premarked:  # else a worker took it meanwhile (and synced itself)
                    self._premarked[key] = True

    def _mark(self, item: _Running) -> None:
        """Record durably that the attempt may start: before any hand-off to the runtime."""
        if self.journal is not None and not item.marked:
            self.journal.begin(item.launch.job_id, item.launch.attempt)
            item.marked = True

    def _unmark(self, item: _Running) -> None:
        if self.journal is not None and item.marked:
            self.journal.end([(item.launch.job_id, item.launch.attempt)])
            item.marked = False

    def _on_running(self, launch: JobLaunch) -> Callable[[], None]:
        return lambda: self._report(launch, JobStatus.RUNNING)

    def _report(
        self,
        launch: JobLaunch,
        status: JobStatus,
        exit_code: int | None = None,
        failure_code: str | None = None,
        reason: str | None = None,
    ) -> None:
        report = AttemptReport(
            launch.job_id, launch.attempt, status, time.time(), exit_code, failure_code, reason
        )
        with self._lock:
            self._reports.append(report)

    def _flush(self) -> None:
        with self._lock:
            reports, self._reports = self._reports, []
        if reports:
            try:
                self.service.report(self.executor_id, reports)
            except Exception:
                with self._lock:  # keep them for the next flush; the store ignores duplicates
                    self._reports[:0] = reports
                raise
            if self.journal is not None:  # their end is committed: a crash can no longer re-run them
                self.journal.end((r.job_id, r.attempt) for r in reports if r.status in _ENDS)

    def _heartbeat(self) -> None:
        with self._lock:
            held = [(j.job_id, j.attempt) for j in self._pending]
            held += [(r.launch.job_id, r.launch.attempt) for r in self._running.values()]
        stop = set(self.service.heartbeat(self.executor_id, held))
        if not stop:
            return
        with self._lock:
            self._pending = deque(j for j in self._pending if (j.job_id, j.attempt) not in stop)
            victims = [r for r in self._running.values() if (r.launch.job_id, r.launch.attempt) in stop]
            dropped = [key for key in stop if self._premarked.pop(key, None) is not None]
        if self.journal is not None and dropped:
            self.journal.end(dropped)  # taken from the queue before they started
        for victim in victims:
            victim.handle.stop()


class Prefetch:
    """How many RUNNABLE jobs to hold beyond those running: about ``seconds`` of work.

    Short jobs finish faster than a claim round trip, so the executor keeps a buffer sized by
    the observed completion rate (at least two per vCPU). Long jobs keep it small, so a project
    that submits later waits behind little prefetched work. A fixed size overrides this.
    """

    def __init__(self, fixed: int | None, seconds: float, vcpus: int, ceiling: int = 4096) -> None:
        self.fixed = fixed
        self.seconds = seconds
        self.floor = 2 * vcpus
        self.ceiling = ceiling
        self.rate = 0.0
        self._last: tuple[int, float] | None = None

    def target(self, completed: int, now: float) -> int:
        if self._last is None:
            self._last = (completed, now)
        elif now - self._last[1] >= 0.1:  # the rate is kept even with a fixed size: turns use it
            rate = (completed - self._last[0]) / (now - self._last[1])
            self.rate = 0.5 * self.rate + 0.5 * rate
            self._last = (completed, now)
        if self.fixed is not None:
            return self.fixed
        return max(self.floor, min(self.ceiling, int(self.rate * self.seconds)))
