"""The embedded local executor: runs jobs on this machine through a runtime.

A driver around the executor's state (``state.py``, no I/O): one control thread claims work,
flushes reports and heartbeats; a thread pool runs attempts. Every decision (what to claim,
what fits where, which job follows which, when a held job is withdrawn, what the journal must
hold) is the state's; this module does the I/O it asks for, under one lock around it.
"""

from __future__ import annotations

import hashlib
import logging
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from openhtc import __version__
from openhtc.config import Settings
from openhtc.domain.enums import FailureCode, JobStatus
from openhtc.domain.errors import InsufficientStorage, Unavailable
from openhtc.domain.models import Capacity, JobLaunch
from openhtc.domain.recovery import EveryAttempt
from openhtc.executor.capacity import local_capacity
from openhtc.executor.journal import AttemptJournal
from openhtc.executor.state import HOLD_SECONDS, Attempt, ExecutorState, Prefetch
from openhtc.executor.transport import ExecutorPort
from openhtc.functions.pool import FunctionCall, FunctionPool, is_function, same_kind
from openhtc.runtimes.base import JobLog, Outcome, Pipelined, RunHandle, Runtime, Surviving
from openhtc.runtimes.launcher import dismiss_launchers
from openhtc.services.logs import LogStore
from openhtc.services.wakeups import Wakeups
from openhtc.storage.staging import NoStager, Stager

log = logging.getLogger("openhtc.executor")
# A job killed by a clean stop: it may have run, as after a crash (architecture.md, Crash guarantee).
STOP_REASON = "Infrastructure fault: the server stopped while the job ran"
DRAIN_REPORT_SECONDS = 5.0  # a stop that waits for running jobs says so this often
# A function call running this long has the calls waiting behind it taken back for a free slot.
CALL_HOLD_SECONDS = 0.25


@dataclass(slots=True)
class _Begun:
    """A job handed to the runtime: its staged launch and log, and how far it got."""

    launch: JobLaunch
    log: JobLog
    staged: bool = False
    started: Any = None  # what a pipelined runtime's start() returned
    outcome: Outcome | None = None  # set if it ended before it started
    refused: bool = False  # not handed over: the executor is stopping


def embedded_executor_id(data_dir: Path) -> str:
    """``local-<host>-<6 hex digits of the data directory>``: several servers on one host (and
    one database) each have their own executor, whose restart recovers only its own jobs."""
    digest = hashlib.sha256(str(data_dir.resolve()).encode()).hexdigest()[:6]
    return f"local-{socket.gethostname()}-{digest}"


class LocalExecutor:
    def __init__(
        self,
        service: ExecutorPort,  # ExecutorService in-process; htc agent's HTTP transport
        runtime: Runtime,
        settings: Settings,
        logs: LogStore,
        wakeups: Wakeups,
        region: str,
        architectures: list[str],
        stager: Stager | None = None,
        functions: FunctionPool | None = None,
        executor_id: str | None = None,  # htc agent names itself (default: embedded_executor_id)
        lazy_journal: bool = False,  # the service takes EveryAttempt: see below
    ) -> None:
        self.service = service
        self.functions = functions  # runs function calls (warm workers) instead of the runtime
        self.stager: Stager = stager or NoStager()
        self.runtime = runtime
        self.settings = settings
        self.logs = logs
        self.wakeups = wakeups
        self.region = region
        self.architectures = architectures
        self.executor_id = executor_id or embedded_executor_id(settings.data_dir)
        self.incarnation = uuid.uuid4().hex
        self.capacity: Capacity = local_capacity(settings)
        self._pipeline = runtime if isinstance(runtime, Pipelined) else None
        # Attempts handed to the runtime, written before the hand-off (see journal.py). A
        # runtime that never blocks (noop) starts no process, so it needs none. Lazy: no sync
        # before a hand-off; after a machine crash its start says it cannot tell which attempts
        # may have started (EveryAttempt): the in-process service takes it, and htc agent's
        # server is told so over the wire (journal_untrusted).
        self.journal: AttemptJournal | None = None
        if runtime.blocking:
            path = settings.data_dir / "executor" / f"attempts-{self.executor_id}.journal"
            sync = settings.executor_journal_sync
            self.journal = AttemptJournal(path, sync=sync, lazy=sync and lazy_journal)
        prefetch = Prefetch(
            settings.executor_prefetch,
            settings.executor_prefetch_seconds,
            self.capacity.vcpus,
            settings.executor_prefetch_max,
        )
        self.state = ExecutorState(
            self.capacity, settings.max_running_jobs, prefetch, settings.heartbeat_seconds, RunHandle
        )
        self._lock = threading.Lock()  # around every call into self.state
        self._flushing = threading.Lock()  # around a report flush (control thread, or a worker's)
        # Every hand-off to the runtime passes this gate; a stop closes it, then withdraws or
        # kills what was handed over, knowing that nothing more will be.
        self._gate = threading.Lock()
        self._gate_closed = False
        self._wake = threading.Event()
        self._drained = threading.Event()  # a job ended: a draining stop looks again
        self._hurried = False  # the draining stop is to kill what runs now
        # The last claim got fewer jobs than it asked for: the queue ran dry (see _calls)
        self._queue_dry = True
        self._stopping = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=settings.max_running_jobs, thread_name_prefix="job")
        self._reporter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="executor-report")
        self._thread = threading.Thread(target=self._loop, name="local-executor", daemon=True)

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        self.wakeups.on_executor_work(self.kick)
        # The tag names this installation too: several servers may share one host.
        owner = f"{self.executor_id}@{self.settings.data_dir.resolve()}"
        # First the jobs a crashed predecessor's launchers kept running (process runtime):
        # they are taken back, not recovered. Then whatever else it left is killed (adopt).
        survived = self.runtime.survivors(RunHandle) if isinstance(self.runtime, Surviving) else None
        if survived is None:  # another runtime now: what a process runtime left must not run on
            gone = dismiss_launchers(str(self.settings.data_dir / "executor" / "launchers"))
            if gone:
                log.warning("ended %d job(s) of the process runtime a previous start left running", gone)
        orphans = self.runtime.adopt(owner, self.incarnation)
        if orphans:
            log.warning("killed %d process(es) left running by a previous start of this executor", orphans)
        # What the previous start handed to its runtime and never saw end may have run: its
        # orphans are dead now (adopt), and recovery fails those attempts instead of re-queueing.
        may_have_started = self.journal.replay() if self.journal is not None else set()
        kept = self._kept(survived, may_have_started)
        may_have_started -= kept.keys()
        if survived is not None:
            may_have_started -= set(survived.dropped)  # held behind another, dropped unstarted
        if self.journal is not None and not self.journal.trusted:  # lazy, and the machine crashed
            log.warning(
                "the machine restarted under the executor's last start (no clean stop): "
                "every job it held counts as one that may have started"
            )
        recovered = self.service.register(
            self.executor_id,
            self.incarnation,
            self.region,
            self.architectures,
            self.capacity,
            may_have_started if self.journal is None or self.journal.trusted else EveryAttempt(),
            __version__,
            socket.gethostname(),
            adopted=kept.keys(),
        )
        if recovered:
            log.warning("recovered %d job(s) left running by a previous start of this executor", recovered)
        if self.journal is not None:
            self.journal.open()  # only now: the recovery that needed the old one is committed
            self.journal.begin_many(kept)  # a second crash must know these may have run
        self._resume(kept)
        self._thread.start()

    def _resume(self, kept: dict[tuple[int, int], tuple[Any, bool]]) -> None:
        """Watch the attempts taken back, each in a slot of its own, and report their ends."""
        if not kept:
            return
        running = sum(1 for _, ran in kept.values() if ran)
        log.warning(
            "took back %d job(s) a previous start of this executor left: %d still running, "
            "%d ended meanwhile (reported now)",
            len(kept),
            running,
            len(kept) - running,
        )
        for started, _ in kept.values():
            launch = started.launch
            self._report(launch, JobStatus.STARTING)
            self._report(launch, JobStatus.RUNNING)  # a duplicate of what was reported is ignored
            with self._lock:
                attempt = self.state.adopted(launch, started.handle)
            parent = launch.job_uuid.rpartition(":")[0]
            log_ = self.logs.attempt_log(launch.task_id, parent, launch.array_index, launch.attempt)
            attempt.handoff = started
            self._pool.submit(self._work, attempt, _Begun(launch, log_, staged=True, started=started))

    @staticmethod
    def _kept(survived: Any, journaled: set[tuple[int, int]]) -> dict[tuple[int, int], tuple[Any, bool]]:
        """The attempts to take back: every job still running, and those that ended while no
        server was there and whose end the journal says was never committed."""
        if survived is None:
            return {}
        return {
            (launch.job_id, launch.attempt): (started, ran)
            for launch, started, ran in survived.jobs
            if ran or (launch.job_id, launch.attempt) in journaled
        }

    def stop(self) -> None:
        """Stop taking work; take back what has not started, let what runs finish for
        ``executor_stop_grace_seconds``, kill the rest, report it, and leave.

        The order matters: a job held in the runtime behind a running one starts the moment
        that one ends, so the held jobs are withdrawn before anything is killed (or drained).
        What was taken and never started stays this executor's, out of the journal: the next
        start re-queues it free. What was killed fails as an infrastructure fault.
        """
        began = time.monotonic()
        with self._lock:
            self.state.stop()
            prefetched = len(self.state.pending)
        with self._gate:  # from here on, nothing is handed to the runtime
            self._gate_closed = True
        with self._lock:
            held = self.state.held_in_runtime()
            handed = self.state.handed_over()
        taken: set[int] = set()  # ids of the withdrawn hand-offs (their workers take them back)
        taken = {id(started) for started in held if (p := self._pipe_of(started)) and p.withdraw(started)}
        log.info(
            "executor stopping: %d job(s) handed to the runtime (%d held, not started, taken back), "
            "%d prefetched and not started",
            handed,
            len(taken),
            prefetched,
        )
        self._drain(self.settings.executor_stop_grace_seconds)
        self._stopping.set()
        self._wake.set()
        self._thread.join(timeout=10)
        with self._lock:
            running = [a for a in self.state.running.values() if a.begun]
        killed = 0
        for attempt in running:
            killed += attempt.driver.attached and id(attempt.handoff) not in taken
            attempt.driver.stop()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._reporter.shutdown(wait=True)
        self._flush()
        if self.functions is not None:
            self.functions.close()
        with self._lock:
            unstarted = len(self.state.pending) + sum(not a.begun for a in self.state.running.values())
            never_started = self.state.never_started()
        if self.journal is not None:  # journaled ahead or taken, never started: out of the journal
            self.journal.end(never_started)
            self.journal.close()
        log.info(
            "executor stopped in %.1f s: %d job(s) killed, %d not started (re-queued free at the next start)",
            time.monotonic() - began,
            killed,
            unstarted,
        )

    def _drain(self, grace: float) -> None:
        """Wait up to ``grace`` seconds for the jobs handed over to end, while the control
        thread still reports and heartbeats (it claims and launches nothing any more)."""
        if grace <= 0:
            return
        deadline = time.monotonic() + grace
        report_at = time.monotonic() + DRAIN_REPORT_SECONDS
        while True:
            with self._lock:
                left = self.state.handed_over()
            if not left:
                return
            now = time.monotonic()
            if now >= deadline or self._hurried:
                log.info("executor stopping: killing the %d job(s) still running", left)
                return
            if now >= report_at:
                log.info("executor stopping: %d job(s) still running, %.0f s left", left, deadline - now)
                report_at = now + DRAIN_REPORT_SECONDS
            self._drained.wait(min(0.1, max(0.0, deadline - time.monotonic())))
            self._drained.clear()

    def hurry(self) -> None:
        """End a draining stop's wait: what still runs is killed now (a second SIGTERM)."""
        self._hurried = True
        self._drained.set()

    def kick(self) -> None:
        self._wake.set()

    def held(self) -> list[tuple[int, int]]:
        """The attempts this executor holds (prefetched or running)."""
        with self._lock:
            return self.state.held()

    def reporting(self) -> list[tuple[int, int]]:
        """The attempts with reports not flushed yet (some may have ended since)."""
        with self._lock:
            return [(r.job_id, r.attempt) for r in self.state.reports]

    def want(self) -> tuple[Capacity, int] | None:
        """What a claim would ask for now (its bound and max jobs; None: none): htc agent's
        exchanges of reports claim it too."""
        with self._lock:
            claim = self.state.claim(time.monotonic())
        return None if claim is None else (claim.bound, claim.max_jobs)

    def leased(self, launches: list[JobLaunch]) -> None:
        """Jobs claimed by another call than the control thread's claim (htc agent's exchange
        of reports): held like any claimed job, started at the next turn or by a freed slot."""
        with self._lock:
            self.state.claimed(launches)
        self._wake.set()

    def idle(self) -> bool:
        """Nothing held and nothing to report: a claim may wait for work (htc agent's long poll)."""
        with self._lock:
            return not (self.state.running or self.state.pending or self.state.reports)

    # -- control loop ---------------------------------------------------------------------------

    def _loop(self) -> None:
        last_turn = 0.0
        while not self._stopping.is_set():
            self._wake.wait(timeout=0.25)
            # Completions that arrive between two turns share one report and one claim;
            # prefetched jobs keep the machine busy in between.
            pause = self.state.next_turn(last_turn) - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            self._wake.clear()
            last_turn = time.monotonic()
            try:
                polled = self._report_and_claim()
                with self._lock:
                    self.state.turn_took(time.monotonic() - last_turn, polled)
                if self.state.heartbeat_due(time.monotonic(), self.wakeups.cancelled.wait(0)):
                    self._heartbeat()
                self._premark()
                self._start_pending()
            except (Unavailable, InsufficientStorage) as exc:  # an outage: one line, not a traceback
                log.warning("executor: %s", exc.message)
                time.sleep(0.5)
            except Exception:  # keep the executor alive; the lease protects the jobs
                log.exception("executor loop error")
                time.sleep(0.5)

    def _report_and_claim(self) -> bool:
        """Flush the reports and claim more jobs at once, each in its own transaction.

        On PostgreSQL each is a few round trips and most of their time is the server's work, so
        overlapping them shortens a turn. They lock disjoint job rows (reported jobs are held by
        this executor, claimed ones were queued) and the counter rows in one order
        (``bump_counters``), so they cannot deadlock. SQLite has one write lock: there the
        second would only wait for the first, so they run one after the other. Returns whether
        the claim was made holding nothing (htc agent's may then wait for work: a long poll).
        """
        with self._lock:
            has_reports = bool(self.state.reports)
        if not has_reports or not self.service.concurrent_writes:
            self._flush()
            return self._claim()
        flushed = self._reporter.submit(self._flush)
        try:
            return self._claim()
        finally:
            flushed.result()

    def _claim(self) -> bool:
        with self._lock:
            claim = self.state.claim(time.monotonic())
        if claim is None:
            return False
        launches = self.service.claim(
            self.executor_id, self.region, self.architectures, claim.bound, claim.max_jobs
        )
        self._queue_dry = len(launches) < claim.max_jobs
        if launches:
            with self._lock:
                self.state.claimed(launches)
        return claim.idle

    def _start_pending(self) -> None:
        """Start prefetched jobs while they fit in the free capacity."""
        while True:
            with self._lock:
                attempt = self.state.launch()
            if attempt is None:
                return
            if self.runtime.blocking:
                self._pool.submit(self._work, attempt)
            else:
                self._work(attempt)  # finishes at once, and drains what else fits

    def _work(self, first: Attempt, adopted: _Begun | None = None) -> None:
        """Run a job, then the next prefetched one that fits, on this same thread.

        Taking the next job here, rather than handing it to another thread, keeps the gap
        between two short jobs to a lock acquisition. A pipelined runtime gets the next job
        (the slot's successor) while the current one still runs, and starts it the moment the
        current one ends.
        """
        item: Attempt | None = first
        begun: _Begun | None = adopted or self._begin(first, None)
        while item is not None and begun is not None:
            if begun.refused:  # the executor is stopping: the job stays unstarted
                self._take_back(item)
                return
            if self.functions is not None and is_function(item.launch):
                item, begun = self._calls(item, begun)  # function calls: a window per worker
                if item is not None and begun is None:
                    begun = self._begin(item, None)
                continue
            successor: Attempt | None = None
            if self._pipeline_for(item.launch) is not None:
                with self._lock:
                    successor = self.state.successor(item, time.monotonic())
            after: _Begun | None = None
            if successor is not None and self._pipeline_for(successor.launch) is not self._pipeline_for(
                item.launch
            ):
                pass  # a job and a function call: the successor is begun once the item has ended
            elif successor is not None:
                after = self._begin(successor, begun.started)
                if after.refused:
                    self._take_back(successor)
                    successor = after = None
                elif self._withdrawn(begun, successor, after):
                    successor = after = None
            if not self._end(item, begun):
                self._take_back(item)
                return
            if successor is not None and self._taken_by_stop(after):
                self._take_back(successor)
                successor = after = None
            with self._lock:
                fresh = self.state.ended(item, successor)
                alone = successor is None and not (self.state.running or self.state.pending)
            if successor is not None:  # it took over the slot
                item, begun = successor, after
            else:
                item, begun = fresh, None
            if item is not None and begun is None:
                begun = self._begin(item, None)
            if alone and not self._gate_closed:
                self._report_alone()
            else:
                self._wake.set()
            if self._gate_closed:
                self._drained.set()

    def _report_alone(self) -> None:
        """The executor's last job ended: its report goes now, from this thread, instead of
        after the control thread's wake-up (a lone job's client waits for it: W5). Nothing else
        could share the turn; the flush lock keeps reports in order with the control thread's.
        Its turn follows (a claim for the capacity this job gave back), off the job's path."""
        try:
            self._flush()
        except Exception as exc:  # kept for the control thread's turn, which retries it
            log.warning("executor: a report will be retried (%s)", exc)
        self._wake.set()

    def _calls(self, first: Attempt, begun: _Begun) -> tuple[Attempt | None, None]:
        """Run function calls in ``first``'s slot, a window of them queued in its warm worker
        (``FunctionPool.window_depth``), each a successor of the one before in the slot;
        topped up when half has ended, so the pool writes them a chunk at a time. Returns what
        the slot runs next (to begin): a fresh attempt."""
        assert self.functions is not None
        window: deque[tuple[Attempt, _Begun]] = deque([(first, begun)])
        fresh: Attempt | None = None
        full = False  # the window takes no more calls (the next in line is of another key)
        while window:
            if self._gate_closed:  # stopping: the calls not yet written to a worker stay unstarted
                for queued in reversed(list(window)):
                    if queued[1].started is not None and self.functions.withdraw(queued[1].started):
                        window.remove(queued)
                        self._take_back(queued[0])
                if not window:
                    break
            else:
                depth = self.functions.window_depth(self.state.prefetch.rate, self.capacity.vcpus)
                if not full and len(window) <= depth // 2:
                    full = self._fill(window, depth)
            item, begun_ = window.popleft()
            if isinstance(begun_.started, FunctionCall):
                if not self.functions.take_up(begun_.started):
                    self._take_back(item)  # a stop withdrew it: it never ran
                    continue
                if window and not self._gate_closed:
                    self._hold(begun_.started, window)
            if not self._end(item, begun_):
                self._take_back(item)
                continue
            following = window[0][0] if window else None
            with self._lock:
                fresh = self.state.ended(item, following)
                alone = following is None and not (self.state.running or self.state.pending)
            if alone and self._queue_dry and not self._gate_closed:
                # A lone call (nothing held, nothing more queued when last looked): its report
                # now, its turn's claim after it. A stream of calls keeps its turns: their
                # report and claim go together, and the claim is what keeps the slots busy.
                self._report_alone()
            else:
                self._wake.set()
            if self._gate_closed:
                self._drained.set()
        return fresh, None

    def _hold(self, head: FunctionCall, window: deque[tuple[Attempt, _Begun]]) -> None:
        """While ``head`` runs, the calls of the window still waiting here (not yet written to
        its worker's pipe) are taken back, last first, once it has run CALL_HOLD_SECONDS and
        another slot is free: no call waits behind a long one while the machine has room."""
        assert self.functions is not None
        pool = self.functions
        last = window[-1][1].started
        if not isinstance(last, FunctionCall) or not pool.unsent(last):
            return  # all in the pipe (short calls): nothing to take back
        since = time.monotonic()
        while not pool.wait(head, HOLD_SECONDS):
            now = time.monotonic()
            if now - since < CALL_HOLD_SECONDS:  # a loaded machine delays short calls this long
                continue
            with self._lock:
                if not self.state.should_withdraw(window[-1][0], now):
                    continue
            for entry in reversed(list(window)):
                queued, begun = entry
                if not isinstance(begun.started, FunctionCall):
                    break
                if begun.started.handle.stopped:
                    continue  # a cancelled call ends STOPPED in its window: taken back, it would run
                if not pool.withdraw(begun.started):
                    break
                window.remove(entry)
                self._take_back(queued)
            self._wake.set()
            return

    def _fill(self, window: deque[tuple[Attempt, _Begun]], depth: int) -> bool:
        """Queue the calls next in line behind the window's last, in its worker, up to ``depth``
        and while as many stay in line as the window holds. True if the window is to take no
        more calls: next in line is a job or a call of another kind (handler, image, code or
        limits). That one stays in line, for any free slot (or this one's when the window
        ends): nothing waits behind the window but the calls in it."""
        while len(window) < depth:
            last = window[-1][0]
            with self._lock:  # at most half of what is in line: the other slots get their share
                if len(self.state.pending) < len(window):
                    return False
                following = self.state.pending[0]
                if not is_function(following) or not same_kind(last.launch, following):
                    return True
                successor = self.state.successor(last, time.monotonic())
            if successor is None:
                return False
            calls = (b.started for _, b in reversed(window) if isinstance(b.started, FunctionCall))
            after = self._begin(successor, next(calls, None))
            if after.refused:  # stopping, or another key once staged (the pool declined it)
                self._take_back(successor)
                return True
            window.append((successor, after))
        return False

    def _pipeline_for(self, launch: JobLaunch) -> Pipelined | None:
        """The pipelined runtime, or the function pool for a function call."""
        if self.functions is not None and is_function(launch):
            return self.functions
        return self._pipeline

    def _pipe_of(self, started: Any) -> Pipelined | None:
        """What took a hand-off: the function pool (a call) or the pipelined runtime."""
        return self.functions if isinstance(started, FunctionCall) else self._pipeline

    def _taken_by_stop(self, after: _Begun | None) -> bool:
        """Whether a stop withdrew this held job (before it killed the one it waited for)."""
        if not self._gate_closed or after is None or after.started is None:
            return False
        pipeline = self._pipe_of(after.started)
        assert pipeline is not None
        return pipeline.withdraw(after.started)  # at once if withdrawn: it has ended

    def _take_back(self, item: Attempt) -> None:
        """``item`` never started (withdrawn, or refused at stop): out of the journal, queued again."""
        self._unmark(item)  # it never started: out of the journal before it is queued again
        with self._lock:
            self.state.withdrawn(item)
        self._drained.set()

    def _withdrawn(self, current: _Begun, successor: Attempt, after: _Begun) -> bool:
        """Wait while ``successor`` is held behind the running ``current``; when the state says
        so (it waited long enough and fits elsewhere), take it back from the runtime and queue
        it first again, for a thread of its own. True if it was taken back."""
        if current.started is None or after.started is None:
            return False  # nothing runs that it could wait for
        pipeline = self._pipe_of(after.started)
        assert pipeline is not None
        while not pipeline.wait(current.started, HOLD_SECONDS):
            if successor.driver.stopped:  # cancelled: it ends STOPPED here (taken back, it would run)
                continue
            with self._lock:
                if not self.state.should_withdraw(successor, time.monotonic()):
                    continue
            if not pipeline.withdraw(after.started):
                return False  # it started meanwhile: the current job has just ended
            self._take_back(successor)
            self._wake.set()
            return True
        return False

    def _begin(self, item: Attempt, after: Any) -> _Begun:
        """Report STARTING and stage the job's storage; a pipelined runtime starts it now
        (behind the job that returned ``after``, if given)."""
        launch = item.launch
        item.begun = True
        if self._gate_closed:  # stopping: not even STARTING (the gate below is what decides)
            return _Begun(launch, JobLog(""), refused=True)
        if self.functions is None or not is_function(launch):  # a call has nothing to set up
            self._report(launch, JobStatus.STARTING)
        parent = launch.job_uuid.rpartition(":")[0]
        begun = _Begun(
            launch, self.logs.attempt_log(launch.task_id, parent, launch.array_index, launch.attempt)
        )
        try:
            # Storage folders first (PROJECT_SHARED_FOLDER, TASK_SHARED_FOLDER), then the job.
            begun.launch = launch._replace(mounts=self.stager.prepare(launch))
            begun.staged = True
            if (pipeline := self._pipeline_for(launch)) is not None:
                self._mark(item)
                with self._gate:
                    if self._gate_closed:
                        begun.refused = True
                        return begun
                    started = pipeline.start(
                        begun.launch, item.driver, begun.log, self._on_running(begun.launch), after
                    )
                    if isinstance(started, Outcome):
                        begun.outcome = started
                    elif started is None:  # a call that does not join ``after``'s window
                        begun.refused = True
                    else:
                        begun.started = item.handoff = started
        except Exception as exc:
            log.exception("runtime failed on job %s", launch.job_uuid)
            begun.outcome = Outcome(None, FailureCode.ErrorUnknownFailure.value, f"Runtime error: {exc}")
        return begun

    def _end(self, item: Attempt, begun: _Begun) -> bool:
        """Run the job to its end (or wait for it), finish its storage, report the outcome.
        False if it never started: the executor is stopping (nothing is reported)."""
        launch, outcome = begun.launch, begun.outcome
        handle: RunHandle = item.driver
        if outcome is None:
            try:
                if (pipeline := self._pipeline_for(launch)) is not None:
                    outcome = pipeline.finish(begun.started)
                else:
                    if self._gate_closed:  # a stop racing past this is caught by the handle below
                        return False
                    self._mark(item)
                    outcome = self.runtime.run(launch, handle, begun.log, self._on_running(launch))
            except Exception as exc:
                log.exception("runtime failed on job %s", launch.job_uuid)
                outcome = Outcome(None, FailureCode.ErrorUnknownFailure.value, f"Runtime error: {exc}")
            if handle.stopped and not handle.timed_out and self._gate_closed and not outcome.succeeded:
                if not handle.attached:
                    return False  # stopped before the runtime started anything
                outcome = Outcome(outcome.exit_code, FailureCode.ErrorInfrastructureFault.value, STOP_REASON)
        if begun.staged:  # before the report: a finished job's outputs are already in task storage
            self.stager.finish(launch, handle.stopped, begun.log)
        status = JobStatus.SUCCEEDED if outcome.succeeded else JobStatus.FAILED
        self._report(launch, status, outcome.exit_code, outcome.failure_code, outcome.reason)
        return True

    # -- the attempt journal --------------------------------------------------------------------

    def _premark(self) -> None:
        """Journal the attempts next in line, all with one sync, ahead of their hand-off.

        A sync costs about a millisecond, as much as a whole `true` job: paid by a worker thread
        per job, between a job's end and its successor's hand-off, it cut W1 by ~30 %. Journaled
        here, once a turn, for the jobs likely to start before the turn after next (the state's
        ``to_premark``), it is off their path; a job beyond that window is journaled by its
        worker (with the next window). The price: a crash also fails the attempts journaled
        ahead and not yet started (they may have started, as far as recovery can tell), about
        a hundred at a thousand jobs a second. A lazy journal (no sync) is written ahead too:
        one write a turn instead of one per job (function calls come by the ten thousand).
        """
        if self.journal is None or not (self.journal.sync or self.journal.lazy):
            return
        with self._lock:
            keys = self.state.to_premark()
        if not keys:
            return
        self.journal.begin_many(keys)
        with self._lock:
            self.state.premarked_on_disk(keys)

    def _mark(self, item: Attempt) -> None:
        """Record durably that the attempt may start: before any hand-off to the runtime.

        A worker that got ahead of the journaled window syncs the next window with it, so it
        pays one sync for them all, not one per job (short function calls outran it)."""
        if self.journal is None or (key := self.state.to_mark(item)) is None:
            return
        ahead: list[tuple[int, int]] = []
        if self.journal.sync or self.journal.lazy:
            with self._lock:
                ahead = self.state.to_premark()
        self.journal.begin_many([key, *ahead])
        self.state.journaled(item)
        if ahead:
            with self._lock:
                self.state.premarked_on_disk(ahead)

    def _unmark(self, item: Attempt) -> None:
        if self.journal is not None and (key := self.state.to_unmark(item)) is not None:
            self.journal.end([key])

    # -- reports and heartbeats -----------------------------------------------------------------

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
        at = time.time()
        with self._lock:
            self.state.report(launch, status, at, exit_code, failure_code, reason)

    def _flush(self) -> None:
        with self._flushing:  # one at a time: a job's reports are committed in their order
            self._flush_held()

    def _flush_held(self) -> None:
        with self._lock:
            reports = self.state.take_reports()
        if reports:
            # After the take: the pool holds the results of these calls. They go with the
            # reports (in-process: in their transaction, so an ended call has its result), and
            # back with them if the report fails: both are retried together.
            results = self.functions.take_results() if self.functions is not None else []
            try:
                self.service.report(self.executor_id, reports, results)
            except Exception:
                if self.functions is not None:
                    self.functions.put_back(results)
                with self._lock:
                    self.state.reports_failed(reports)
                raise
            if self.journal is not None:  # their end is committed: a crash can no longer re-run them
                self.journal.end(self.state.reports_delivered(reports))

    def _heartbeat(self) -> None:
        with self._lock:
            held = self.state.held()
        stop = self.service.heartbeat(self.executor_id, held)
        if not stop:
            return
        with self._lock:
            answer = self.state.stop_attempts(stop)
        if self.journal is not None and answer.unjournal:
            self.journal.end(answer.unjournal)  # taken from the queue before they started
        # Last first: in a slot's chain (function calls queued in a worker) the ones waiting are
        # stopped before the one running is killed, whose worker's death would move them on.
        for victim in reversed(answer.kill):
            victim.driver.stop()
