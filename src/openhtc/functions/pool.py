"""Warm workers for function tasks: the executor hands each function call (a job whose commands
are ``openhtc-function HANDLER [CODE]``) here instead of to its runtime.

Per (task, image, code, handler, limits) the pool keeps idle workers (worker.py); a call takes
one (or starts one through the runtime), sends its event, waits for the reply within the call's
timeout, and gives the worker back. Nothing per call touches the database or starts a process:
events are read a chunk at a time, results are kept here and handed to the result sink once per
executor turn (``flush``, just before the turn's reports, so a call that reads as ended always
has its result): the embedded executor writes them to the database in one transaction, ``htc
agent`` sends each with its call's report. A call writes a log only if it printed or logged.

A worker that crashes or runs out of memory fails the call it held with the runtime's usual
code (the retry strategy applies as to any job); one that overruns the call's timeout is killed
(``ErrorTimeout``, error type ``TimeoutError``). Either way the next call starts a new one.
Idle workers exit after ``idle_seconds``.

A worker answers its calls in order; each answer is kept on its call as it is read. When a
worker ends, all it answered is read first; the first call without an answer is the one it ran
(it fails), and those behind it never ran (they move to a new worker). A stop kills a worker
only while the stopped call is the one it runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import os
import shutil
import struct
import sys
import threading
import time
import uuid
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import orjson

from openhtc.domain.enums import FailureCode
from openhtc.domain.models import JobLaunch, Mount
from openhtc.functions.worker import FRAME_HEAD, Worker, WorkerGone, worker_launch
from openhtc.runtimes.base import JobLog, Outcome, RunHandle, Runtime
from openhtc.runtimes.joblog import LogWriter
from openhtc.services.functions import FUNCTION_COMMAND, result_key
from openhtc.storage.layout import PROJECT_SHARED_ENV, TASK_SHARED_ENV
from openhtc.store.functions import CallResult

log = logging.getLogger("openhtc.functions")
EVENT_CHUNK = 2000  # events read per query
PIPE_BUDGET = 16 * 1024  # bytes of calls in a worker's pipe not answered yet (a pipe holds 64 KiB)
STOPPED = "Job stopped by the executor"
# Calls in a worker's pipe (answered or not, the running one included): about this long of its
# calls, at least 2; until it has answered one, 2. The rest of its window waits in the executor,
# where another slot may take it (LocalExecutor._hold): a long call holds at most that many.
AHEAD_SECONDS = 0.05
_SECONDS = struct.Struct(">d")
# A worker's window (calls queued in it, executor/local.py): about this long of its calls at the
# observed rate, between 2 (one running, the next in its pipe) and WINDOW_MAX.
WINDOW_SECONDS = 0.02
WINDOW_MAX = 64
START_SECONDS = 120.0  # a worker's start (image, sandbox, imports) may take this long
CODE_CHECK_SECONDS = 1.0  # a code zip's file is looked at again after this long
RUNNER = Path(__file__).with_name("runner.py")

Events = Callable[[int, int, int], dict[int, str]]  # (batch id, start, stop) -> {index: event}


class ResultSink(Protocol):
    """Where a call's result over ``result_max_bytes`` goes: the embedded executor's into the
    task folder (``DatabaseResults``), an agent's to the task's storage (agent/functions.py).
    The others go with their calls' reports (``FunctionPool.take_results``)."""

    def store_large(self, launch: JobLaunch, key: str, payload: bytes) -> str | None:
        """Keep a result over ``result_max_bytes`` at ``key`` of the task's storage; None once
        it is kept, else why it could not be."""
        ...


class DatabaseResults:
    """The embedded executor's sink: a large result into the task folder (the attempt's,
    uploaded with its outputs on S3); the others are written with their calls' reports."""

    def store_large(self, launch: JobLaunch, key: str, payload: bytes) -> str | None:
        task_dir = next((m.host_path for m in launch.mounts if m.env_name == TASK_SHARED_ENV), None)
        if task_dir is None:
            return "no task storage for a large result"
        path = os.path.join(task_dir, key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".part", "wb") as out:
            out.write(payload)
        os.replace(path + ".part", path)
        return None


def is_function(launch: JobLaunch) -> bool:
    return launch.commands[:1] == (FUNCTION_COMMAND,)


def same_kind(one: JobLaunch, other: JobLaunch) -> bool:
    """Whether two calls, as claimed, can share a worker (the pool's key is decided only once
    their storage is staged: ``start`` declines a call of another key)."""
    return (one.task_id, one.image, one.commands, one.vcpus, one.memory_mb) == (
        other.task_id,
        other.image,
        other.commands,
        other.vcpus,
        other.memory_mb,
    )


@dataclass(slots=True, eq=False)
class FunctionCall:
    """A call queued in a worker (waiting in the executor, in its pipe, running, or answered)."""

    launch: JobLaunch
    handle: RunHandle
    open_log: JobLog
    on_running: Callable[[], None]
    key: tuple[object, ...]
    handler: str
    code_dir: str | None
    payload: bytes
    timeout: float
    worker: Worker = field(init=False)
    current: bool = False  # the executor has taken it up (RUNNING)
    withdrawn: bool = False  # taken back before it was written to the worker
    deadline: float | None = None  # monotonic, once it is its worker's current call
    reply: tuple[bytes, bytes] | None = None  # its R or E frame, once read (maybe ahead)

    def kill(self) -> None:
        """A stop (cancel, lost lease, server stop): the executor's thread waiting on this
        worker looks again; it kills the worker only if this call is the one it runs."""
        self.worker.poke()


class FunctionPool:
    def __init__(
        self,
        runtime: Runtime,
        work_root: Path,
        events: Events,
        results: ResultSink,
        *,
        result_max_bytes: int,
        idle_seconds: float,
        max_idle: int,
        max_log_bytes: int | None = None,
        window: int | None = None,
    ) -> None:
        self.max_log_bytes = max_log_bytes
        self.window = window  # calls a slot queues in its worker; None: by the observed rate
        self.runtime = runtime
        self.local = runtime.name == "process"  # no sandbox: the host's paths and this Python
        self.root = work_root
        self._events = events
        self._sink = results
        self.result_max_bytes = result_max_bytes
        self.idle_seconds = idle_seconds
        self.max_idle = max_idle
        self._lock = threading.Lock()
        self._idle: dict[tuple[object, ...], list[Worker]] = {}
        self._chunks: dict[tuple[int, int], dict[int, str]] = {}
        self._results: list[CallResult] = []
        self._codes: dict[tuple[str, int, int], str] = {}
        self._recent: dict[tuple[str | None, str], tuple[float, str]] = {}  # code checked when
        # The last mounts seen, with what the calls take from them: a task's calls share one
        # tuple (the stager's), so most calls find theirs here by identity, with no scan.
        self._last_mounts: tuple[object, str | None, tuple[Mount, ...]] = ((), None, ())
        self._closed = False
        shutil.rmtree(self.root, ignore_errors=True)  # pipes and code of an earlier start
        runner_dir = self.root / "runner"
        runner_dir.mkdir(parents=True)
        shutil.copyfile(RUNNER, runner_dir / "runner.py")
        self.runner_dir = str(runner_dir)
        self._reaper = threading.Thread(target=self._reap, name="function-reaper", daemon=True)
        self._reaper.start()

    # -- the executor's side --------------------------------------------------------------------

    def window_depth(self, rate: float, vcpus: int) -> int:
        """How many calls a slot queues in its worker: WINDOW_SECONDS of calls at the observed
        rate (completions a second, the executor's) shared by its vCPUs, 2 to WINDOW_MAX (or the
        fixed ``window``). Short calls then go a chunk per pipe write; long ones are not held
        behind each other while another slot could run them."""
        if self.window is not None:
            return self.window
        return max(2, min(WINDOW_MAX, int(rate / max(1, vcpus) * WINDOW_SECONDS)))

    def run(
        self, launch: JobLaunch, handle: RunHandle, open_log: JobLog, on_running: Callable[[], None]
    ) -> Outcome:
        """Run one call to its end, as ``Runtime.run`` runs a job."""
        started = self.start(launch, handle, open_log, on_running, None)
        assert started is not None  # (only a call given an ``after`` is declined)
        return started if isinstance(started, Outcome) else self.finish(started)

    # The executor queues calls in a worker as a window (``executor/local.py``, ``window_depth``):
    # while one runs, the next ones are in its pipe, so it goes from call to call without waiting
    # for the executor, and the executor writes them a chunk at a time (``_pump``: up to
    # PIPE_BUDGET bytes not yet answered, so a write never blocks on a full pipe). A worker
    # replies in the order it was sent calls, and the executor finishes them in that order.

    def start(
        self,
        launch: JobLaunch,
        handle: RunHandle,
        open_log: JobLog,
        on_running: Callable[[], None],
        after: object = None,
    ) -> FunctionCall | Outcome | None:
        """Queue the call in a worker: ``after``'s, if given (the last call of its slot's
        window), else an idle or new one. Returns what ``finish`` takes, an Outcome if it
        cannot run, or None if ``after`` is a call of another key: it does not join that
        window (the slot takes it up once the window is done)."""
        handler = launch.commands[1] if len(launch.commands) > 1 else ""
        code = launch.commands[2] if len(launch.commands) > 2 else None
        project_dir, shared = self._shared(launch.mounts)
        code_dir: str | None = None
        if code is not None:
            found = self._code(project_dir, code)
            if isinstance(found, Outcome):
                return found
            code_dir = found
        key = (launch.task_id, launch.image, code_dir, handler, launch.vcpus, launch.memory_mb, shared)
        if isinstance(after, FunctionCall) and after.key != key:
            return None  # before its event is taken from the chunk read ahead
        event = self._event(launch)
        if event is None:
            return Outcome(None, FailureCode.ErrorStartingContainer.value, "The call's event is missing")
        timeout = float(launch.timeout_s or 60)
        header = {
            "index": launch.array_index,
            "attempt": launch.attempt,
            "taskId": launch.task_id,
            "requestId": launch.job_uuid,
            "functionName": handler,
            "memoryMb": launch.memory_mb,
            "timeoutMs": int(timeout * 1000),
        }
        payload = orjson.dumps(header) + b"\n" + event.encode()
        call = FunctionCall(launch, handle, open_log, on_running, key, handler, code_dir, payload, timeout)
        # A window's calls stay in one worker, dead or alive: a dead one's calls that never ran
        # move to a new worker together (``_move``), so one slot never runs two at once.
        self._dispatch(call, after.worker if isinstance(after, FunctionCall) else None)
        handle.attach_kill(call.kill)
        return call

    def wait(self, started: FunctionCall, timeout: float) -> bool:
        """Whether the call, its worker's first, has answered (or its worker ended, or its time
        is up: ``finish`` tells which) within ``timeout``."""
        worker = started.worker
        if started.reply is not None:
            return True
        if self._waiting(started) and (started.handle.stopped or worker.closed or not worker.alive):
            return True  # ``finish`` ends it STOPPED (never written: it never runs), or moves it
        self._pump(worker)  # it, if not sent yet, and what fits behind it
        self._arm(started)
        assert started.deadline is not None
        limit = time.monotonic() + timeout
        try:
            while started.reply is None:
                if time.monotonic() >= started.deadline:
                    return True
                if not self._read(worker, min(limit, started.deadline)):
                    return time.monotonic() >= started.deadline
        except WorkerGone:
            return True
        return True

    def unsent(self, call: FunctionCall) -> bool:
        """Whether the call waits in the executor, not yet written to its worker's pipe (a
        stop, or another slot, may take it back: ``withdraw``)."""
        return not call.withdrawn and self._waiting(call)

    def _waiting(self, call: FunctionCall) -> bool:
        """Whether the call is in its worker's queue past what was written to its pipe."""
        worker = call.worker
        with self._lock:
            if worker.calls and worker.calls[0] is call:  # the head: the common case
                return worker.sent == 0
            return any(c is call for c in itertools.islice(worker.calls, worker.sent, None))

    def withdraw(self, started: FunctionCall) -> bool:
        """Take back a call not yet written to its worker's pipe (it never runs there)."""
        worker = started.worker
        with self._lock:
            if started.withdrawn:
                return True
            if started.current:
                return False
            try:
                at = worker.calls.index(started)
            except ValueError:
                return False
            if at < worker.sent:
                return False
            del worker.calls[at]
            started.withdrawn = True
            idle = not worker.calls
        if idle:
            self._give(started.key, worker)
        return True

    def take_up(self, call: FunctionCall) -> bool:
        """The executor is about to finish the call: from now on no stop withdraws it. False if
        one already has (it never ran; the executor takes it back)."""
        with self._lock:
            if call.withdrawn:
                return False
            first, call.current = not call.current, True
        if first:
            call.on_running()  # RUNNING from now: its worker runs it (it is the worker's first)
        return True

    def finish(self, call: FunctionCall) -> Outcome:
        """Wait for the call's reply (within its timeout, from now: it is the worker's current
        call); keep its result; how it ended."""
        launch = call.launch
        if not self.take_up(call):  # withdrawn at stop (the executor takes up calls first)
            return Outcome(None, FailureCode.ErrorUnknownFailure.value, STOPPED)
        while call.reply is None:
            worker = call.worker
            if self._waiting(call):  # not in its worker's pipe yet
                if call.handle.stopped:  # cancelled while queued: it never runs
                    if self._done(call):
                        self._give(call.key, worker)
                    return Outcome(None, FailureCode.ErrorUnknownFailure.value, STOPPED)
                if worker.closed or not worker.alive:
                    self._move(worker)  # none of them ran: on a new worker, in order
                    continue
                self._pump(worker)  # this call, and what fits behind it
            self._arm(call)
            worker = call.worker
            try:  # a killed worker's end is waited for: all it answered is read
                if not self._read(worker, None if worker.killed else call.deadline):
                    self._kill(worker, call)  # over time: its worker goes
            except WorkerGone:
                if call.reply is None and not self._waiting(call):  # it ran when its worker ended
                    return self._lost(call)
        worker = call.worker
        tag, payload = call.reply
        emptied = self._done(call)
        call.current = False
        if emptied:
            self._give(call.key, worker)
        if tag == b"R":
            why = self._keep_result(launch, payload)
            if why is None:
                return Outcome(0, None, "Completed")
            # a result that could not be kept is no success (its error says why; retries apply)
            return Outcome(None, FailureCode.ErrorUnknownFailure.value, f"ResultTooLarge: {why}"[:1000])
        self._keep(CallResult(launch.batch_id, launch.array_index, launch.attempt, None, payload.decode()))
        try:
            error = json.loads(payload)
            reason = f"{error['type']}: {error['message']}"
        except (ValueError, KeyError, TypeError):
            reason = "the handler raised"
        return Outcome(1, FailureCode.ErrorFunction.value, reason[:1000])

    def _lost(self, call: FunctionCall) -> Outcome:
        """The call's worker ended (every reply it wrote read) and the call has none: the worker
        was running it. The calls behind it never ran: they wait to move to a new worker."""
        worker = call.worker
        self._done(call)
        with self._lock:
            worker.sent = worker.answered = worker.inflight = 0
        if worker.killed_for is None:  # it crashed or ran out of memory during the call
            return self._failed(worker, call.launch, None)
        worker.close()
        if worker.killed_for is call:
            if call.handle.stopped:
                return Outcome(None, FailureCode.ErrorUnknownFailure.value, STOPPED)
            return self._timed_out(call.launch, call.timeout)
        # killed for the call before it, which answered meanwhile: this one had begun
        reason = (
            "Infrastructure fault: the function worker was killed while it ran this call (it may have run)"
        )
        return Outcome(None, FailureCode.ErrorInfrastructureFault.value, reason)

    def _kill(self, worker: Worker, call: FunctionCall) -> None:
        """Kill the worker for ``call`` (over time, or stopped) while it runs it."""
        if not worker.killed:
            worker.killed, worker.killed_for = True, call
            worker.kill()

    @staticmethod
    def _arm(call: FunctionCall) -> None:
        """The call's deadline, from when it is its worker's current call (a worker that has
        not said it is ready yet: its start is not the call's time)."""
        if call.deadline is None:
            ready = call.worker.ready
            call.deadline = time.monotonic() + (call.timeout if ready else max(START_SECONDS, call.timeout))

    def _running(self, worker: Worker) -> FunctionCall | None:
        """The worker's current call: the first in its pipe without a reply."""
        with self._lock:
            return worker.calls[worker.answered] if worker.answered < worker.sent else None

    def _read(self, worker: Worker, deadline: float | None) -> bool:
        """Read the worker's next frame and give it to its call (``_take``). First, a stopped
        call that is the one it runs has it killed. False at ``deadline``; WorkerGone once the
        worker has ended and all it wrote was read."""
        if self._stop_running(worker):
            return True
        frame = worker.receive(deadline)
        if frame is None:
            return False
        self._handle(worker, frame)
        return True

    def _stop_running(self, worker: Worker) -> bool:
        """If the call the worker runs (as far as its replies tell) was stopped, kill it; what
        it has answered already is read first, so a stop kills only the call it runs. Whether
        it read a frame."""
        read = False
        while not worker.killed and (running := self._running(worker)) is not None:
            if not running.handle.stopped:
                break
            frame = worker.receive(time.monotonic())  # only what is there now
            if frame is None:
                self._kill(worker, running)
                break
            self._handle(worker, frame)
            read = True
        return read

    def _handle(self, worker: Worker, frame: tuple[bytes, bytes]) -> None:
        """A frame from the worker, for the call it runs: replies come in the order the calls
        were written, so each is the first unanswered call's."""
        tag, payload = frame
        running = self._running(worker)
        if tag == b"D":
            worker.took(_SECONDS.unpack(payload)[0])
        elif tag == b"H":
            worker.ready = True
            if running is not None and running.deadline is not None:
                running.deadline = time.monotonic() + running.timeout
        elif tag == b"P":  # poked: a call was stopped (the next read looks)
            pass
        elif running is None:
            log.warning("a function worker wrote a %r frame with no call in its pipe", tag)
        elif tag == b"L":  # the call printed or logged: its log gets that, only then
            writer = LogWriter(running.open_log, self.max_log_bytes)
            writer.feed(payload)
            writer.close()
        else:
            running.reply = (tag, payload)
            with self._lock:
                worker.answered += 1

    def _dispatch(self, call: FunctionCall, worker: Worker | None) -> None:
        """Queue the call in ``worker``, or in an idle or new one; an idle worker is sent it at
        once (a lone call waits for nothing), a busy one with the next chunk (``_pump``)."""
        if worker is None:
            worker = self._take(call.key) or self._start(call.launch, call.handler, call.code_dir)
        call.worker = worker
        with self._lock:
            worker.calls.append(call)
            first = len(worker.calls) == 1
        if first:
            self._pump(worker)

    def _pump(self, worker: Worker) -> None:
        """Write the worker's queued calls to its pipe, in one write, while the bytes it has not
        answered stay within PIPE_BUDGET (the first at any size when it has none): a full pipe
        never blocks the executor while the worker writes a large reply nobody reads. A stopped
        call is not written (nor what follows it): it never runs."""
        payloads: list[bytes] = []
        known = worker.call_seconds
        ahead = 2 if known is None else max(2, int(AHEAD_SECONDS / max(known, 1e-6)))
        if worker.killed or worker.closed or not worker.alive:
            return  # its calls not in its pipe move to a new worker
        with self._lock:  # counted as sent first: from now on no withdraw takes them
            calls, at, inflight = worker.calls, worker.sent, worker.inflight
            while at < min(len(calls), ahead):
                size = len(calls[at].payload) + FRAME_HEAD
                if (inflight and inflight + size > PIPE_BUDGET) or calls[at].handle.stopped:
                    break
                payloads.append(calls[at].payload)
                inflight += size
                at += 1
            first, worker.sent, worker.inflight = worker.sent, at, inflight
        if not payloads:
            return
        whole = worker.send(*payloads)
        if whole < len(payloads):  # it ended first: a call not written whole never ran
            with self._lock:
                worker.sent = first + whole
                unsent = itertools.islice(worker.calls, worker.sent, at)
                worker.inflight -= sum(len(c.payload) + FRAME_HEAD for c in unsent)

    def _done(self, call: FunctionCall) -> bool:
        """The call, its worker's first, is finished: out of its queue. True if that emptied
        the queue: decided under the lock, so a worker is given back once (a stop's
        ``withdraw`` from another thread may empty it too)."""
        worker = call.worker
        with self._lock:
            if not worker.calls or worker.calls[0] is not call:
                return False
            worker.calls.popleft()
            if worker.sent:
                worker.sent -= 1
                worker.inflight -= len(call.payload) + FRAME_HEAD
            if call.reply is not None and worker.answered:
                worker.answered -= 1
            return not worker.calls

    def _move(self, dead: Worker) -> None:
        """Every call left on a dead worker (none of them ran), in order, to a new one."""
        with self._lock:
            calls = list(dead.calls)
            dead.calls.clear()
            dead.sent = dead.answered = dead.inflight = 0
        threading.Thread(target=dead.close, daemon=True).start()
        if not calls:
            return
        first = calls[0]
        worker = self._take(first.key) or self._start(first.launch, first.handler, first.code_dir)
        with self._lock:
            for moved in calls:
                moved.worker = worker
                moved.deadline = None
            worker.calls.extend(calls)
        self._pump(worker)

    def take_results(self) -> list[CallResult]:
        """The results kept since the last take: the executor hands them over with the reports
        of its turn (ExecutorPort.report), which store them no later than those reports."""
        with self._lock:
            results, self._results = self._results, []
        return results

    def put_back(self, results: list[CallResult]) -> None:
        """Results taken for a report that failed: they go with the next one (its retry)."""
        with self._lock:
            self._results[:0] = results

    def close(self) -> None:
        with self._lock:
            self._closed = True
            workers = [w for ws in self._idle.values() for w in ws]
            self._idle.clear()
        for worker in workers:
            worker.close()

    # -- calls ----------------------------------------------------------------------------------

    def _event(self, launch: JobLaunch) -> str | None:
        if launch.event is not None:  # read with its claim (a small one)
            return launch.event
        start = launch.array_index - launch.array_index % EVENT_CHUNK
        key = (launch.batch_id, start)
        with self._lock:
            chunk = self._chunks.get(key)
        if chunk is None or launch.array_index not in chunk:
            chunk = self._events(launch.batch_id, start, start + EVENT_CHUNK)
            with self._lock:
                if len(self._chunks) > 64:
                    self._chunks.clear()
                self._chunks[key] = chunk
        with self._lock:  # a retry reads it again (rare: it re-reads the chunk)
            return chunk.pop(launch.array_index, None)

    def _keep(self, result: CallResult) -> None:
        with self._lock:
            self._results.append(result)

    def _keep_result(self, launch: JobLaunch, payload: bytes) -> str | None:
        """Keep a call's result; None, or why it could not be kept."""
        if len(payload) <= self.result_max_bytes:
            self._keep(
                CallResult(launch.batch_id, launch.array_index, launch.attempt, payload.decode(), None)
            )
            return None
        # Large: kept in the task's storage by the sink; the result names where.
        key = result_key(launch.job_uuid.rpartition(":")[0], launch.array_index)
        why = self._sink.store_large(launch, key, payload)
        if why is not None:
            error = {"type": "ResultTooLarge", "message": why, "traceback": ""}
            self._keep(
                CallResult(launch.batch_id, launch.array_index, launch.attempt, None, json.dumps(error))
            )
            return why
        self._keep(CallResult(launch.batch_id, launch.array_index, launch.attempt, None, None, key))
        return None

    def _timed_out(self, launch: JobLaunch, timeout: float) -> Outcome:
        message = f"Function call exceeded execTimeoutSeconds={launch.timeout_s or int(timeout)}"
        error = {"type": "TimeoutError", "message": message, "traceback": ""}
        self._keep(CallResult(launch.batch_id, launch.array_index, launch.attempt, None, json.dumps(error)))
        return Outcome(None, FailureCode.ErrorTimeout.value, message)

    def _failed(self, worker: Worker, launch: JobLaunch, why: str | None) -> Outcome:
        """The worker ended during the call: the call fails as its process did."""
        outcome = worker.end()
        tail = _tail(worker.log_path)
        worker.close()
        reason = why or outcome.reason
        if outcome.failure_code == FailureCode.ErrorNonZeroContainerExitCode.value:
            reason = f"The function worker exited with code {outcome.exit_code} during the call"
        if tail:
            reason += f"; its last output: {tail}"
        code = outcome.failure_code or FailureCode.ErrorUnknownFailure.value
        return Outcome(outcome.exit_code, code, reason[:2000])

    # -- workers --------------------------------------------------------------------------------

    def _take(self, key: tuple[object, ...]) -> Worker | None:
        with self._lock:
            workers = self._idle.get(key)
            while workers:
                worker = workers.pop()
                if worker.alive:
                    return worker
                threading.Thread(target=worker.close, daemon=True).start()
        return None

    def _give(self, key: tuple[object, ...], worker: Worker) -> None:
        worker.idle_since = time.monotonic()
        surplus: list[Worker] = []
        with self._lock:
            if self._closed or worker.closed or worker.killed or not worker.alive:
                surplus.append(worker)
            else:
                self._idle.setdefault(key, []).append(worker)
                surplus = self._over_limit()
        for extra in surplus:
            extra.close()

    def _over_limit(self) -> list[Worker]:
        idle = sorted((w.idle_since, id(w), k) for k, ws in self._idle.items() for w in ws)
        out: list[Worker] = []
        for _, ident, k in idle[: max(0, len(idle) - self.max_idle)]:
            ws = self._idle[k]
            found = next(w for w in ws if id(w) == ident)
            ws.remove(found)
            out.append(found)
        return out

    def _start(self, launch: JobLaunch, handler: str, code_dir: str | None) -> Worker:
        name = uuid.uuid4().hex[:12]
        pipes = str(self.root / "workers" / name)
        python = sys.executable if self.local else "python3"
        spec = worker_launch(launch, python, self.runner_dir, pipes, code_dir, handler, self.local)
        return Worker(self.runtime, spec, pipes, str(self.root / "workers" / f"{name}.log"))

    def _reap(self) -> None:
        while True:
            time.sleep(min(self.idle_seconds, 5.0))
            now = time.monotonic()
            with self._lock:
                if self._closed:
                    return
                stale = [
                    w for ws in self._idle.values() for w in ws if now - w.idle_since >= self.idle_seconds
                ]
                for ws in self._idle.values():
                    ws[:] = [w for w in ws if w not in stale]
            for worker in stale:
                worker.close()

    # -- code -----------------------------------------------------------------------------------

    def _shared(self, mounts: tuple[Mount, ...]) -> tuple[str | None, tuple[Mount, ...]]:
        """The project folder's host path and the mounts a worker's key holds: all but the task
        folder's (on S3 storage each attempt has its own; see _keep_result)."""
        seen, project_dir, shared = self._last_mounts
        if seen is not mounts:
            project_dir = next((m.host_path for m in mounts if m.env_name == PROJECT_SHARED_ENV), None)
            shared = tuple(m for m in mounts if m.env_name != TASK_SHARED_ENV)
            self._last_mounts = (mounts, project_dir, shared)  # one assignment: threads may race it
        return project_dir, shared

    def _code(self, shared: str | None, code: str) -> str | Outcome:
        """The code zip from project storage (``shared``: its folder here), unpacked once per
        content (by its SHA-256)."""
        path = os.path.join(shared, code) if shared else None
        now = time.monotonic()
        recent = self._recent.get((shared, code))
        if recent is not None and now - recent[0] < CODE_CHECK_SECONDS:
            return recent[1]  # checked a moment ago: no stat per call
        try:
            if path is None:
                raise FileNotFoundError("this server has no project storage")
            info = os.stat(path)
            seen = (path, info.st_mtime_ns, info.st_size)
            with self._lock:
                ready = self._codes.get(seen)
            if ready is not None:
                self._recent[(shared, code)] = (now, ready)
                return ready
            digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
            target = self.root / "code" / digest
            if not target.exists():
                part = self.root / "code" / f"{digest}.{uuid.uuid4().hex[:8]}"
                with zipfile.ZipFile(path) as archive:
                    archive.extractall(part)
                with contextlib.suppress(OSError):
                    part.rename(target)
                shutil.rmtree(part, ignore_errors=True)
            with self._lock:
                self._codes[seen] = str(target)
            return str(target)
        except (OSError, zipfile.BadZipFile) as exc:
            reason = f"Cannot use the code zip {code!r} from project storage: {exc}"
            return Outcome(None, FailureCode.ErrorStartingContainer.value, reason)


def _tail(path: str, size: int = 1500) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(max(0, os.path.getsize(path) - size))
            return fh.read().decode("utf-8", "replace").strip()
    except OSError:
        return ""
