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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from openhtc.domain.enums import FailureCode
from openhtc.domain.models import JobLaunch
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
Save = Callable[[Sequence[CallResult]], None]


class ResultSink(Protocol):
    """Where the calls' results go: the embedded executor writes them to the database
    (``DatabaseResults``); ``htc agent`` sends each with its call's report (agent/functions.py)."""

    def save(self, results: Sequence[CallResult]) -> None:
        """The results kept since the last flush; called just before the reports of their calls."""
        ...

    def store_large(self, launch: JobLaunch, key: str, payload: bytes) -> str | None:
        """Keep a result over ``result_max_bytes`` at ``key`` of the task's storage; None once
        it is kept, else why it could not be."""
        ...


class DatabaseResults:
    """The embedded executor's sink: results to the database, large ones into the task folder
    (the attempt's, uploaded with its outputs on S3)."""

    def __init__(self, save: Save) -> None:
        self._save = save

    def save(self, results: Sequence[CallResult]) -> None:
        self._save(results)

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


@dataclass(slots=True, eq=False)
class FunctionCall:
    """A call sent to a worker (running, or queued behind its current call)."""

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
    current: bool = False  # its worker is running it: a stop kills the worker
    withdrawn: bool = False  # taken back before it was written to the worker
    deadline: float | None = None  # monotonic, once it is its worker's current call

    def kill(self) -> None:
        if self.current:
            self.worker.kill()


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
    ) -> FunctionCall | Outcome:
        """Queue the call in a worker (``after``'s, if it is a call of the same kind); returns
        what ``finish`` takes, or why it cannot run."""
        handler = launch.commands[1] if len(launch.commands) > 1 else ""
        code = launch.commands[2] if len(launch.commands) > 2 else None
        event = self._event(launch)
        if event is None:
            return Outcome(None, FailureCode.ErrorStartingContainer.value, "The call's event is missing")
        code_dir: str | None = None
        if code is not None:
            found = self._code(launch, code)
            if isinstance(found, Outcome):
                return found
            code_dir = found
        # Not the task folder's mount: on S3 storage each attempt has its own (see _keep_result).
        shared = tuple(m for m in launch.mounts if m.env_name != TASK_SHARED_ENV)
        key = (launch.task_id, launch.image, code_dir, handler, launch.vcpus, launch.memory_mb, shared)
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
        payload = json.dumps(header).encode() + b"\n" + event.encode()
        call = FunctionCall(launch, handle, open_log, on_running, key, handler, code_dir, payload, timeout)
        worker = None
        if isinstance(after, FunctionCall) and after.key == key:
            # a dead worker's calls move to a new one together (``_move``): none joins them there
            live = after.worker.alive and not after.worker.closed
            worker = after.worker if live else None
        self._dispatch(call, worker)
        handle.attach_kill(call.kill)
        return call

    def wait(self, started: FunctionCall, timeout: float) -> bool:
        """Whether the call, its worker's first, has answered (or its worker ended, or its time
        is up: ``finish`` tells which) within ``timeout``."""
        worker = started.worker
        self._pump(worker)  # it is in the pipe
        if worker.reply is not None:
            return True
        self._arm(started)
        assert started.deadline is not None
        try:
            frame = self._next(started, time.monotonic() + timeout)
        except WorkerGone:
            return True
        if frame is None:
            return time.monotonic() >= started.deadline
        worker.reply = frame  # kept for finish
        return True

    def unsent(self, call: FunctionCall) -> bool:
        """Whether the call waits in the executor, not yet written to its worker's pipe (a
        stop, or another slot, may take it back: ``withdraw``)."""
        worker = call.worker
        with self._lock:
            return not call.withdrawn and any(
                c is call for c in itertools.islice(worker.calls, worker.sent, None)
            )

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
        while True:
            worker = call.worker
            try:
                if call.handle.stopped:  # cancelled while queued: it must not run
                    return self._stopped(call)
                self._pump(worker)  # this call, if not sent yet, and what fits behind it
                tag, payload = self._reply(call)
                break
            except WorkerGone:
                if not worker.victim_taken:  # it died during this call: the call fails with it
                    worker.victim_taken = True
                    self._done(call)
                    return self._failed(worker, launch, None)
                if call.handle.stopped:  # cancelled while queued behind the call that died
                    self._done(call)
                    return Outcome(None, FailureCode.ErrorUnknownFailure.value, STOPPED)
                self._move(worker)  # it never ran: again, with the calls behind it, on a new worker
        worker = call.worker
        self._done(call)
        if tag == b"T":
            worker.victim_taken = True
            worker.close()
            return self._timed_out(launch, call.timeout)
        call.current = False
        if not worker.calls:
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

    def _reply(self, call: FunctionCall) -> tuple[bytes, bytes]:
        """The call's reply frame (R or E), its log written; (T, b"") past its timeout."""
        worker = call.worker
        if worker.reply is not None:  # read by wait
            kept, worker.reply = worker.reply, None
            return kept
        self._arm(call)
        frame = self._next(call, None)
        if frame is None:  # over time: the worker is killed, its call fails
            worker.kill()
            return b"T", b""
        return frame

    @staticmethod
    def _arm(call: FunctionCall) -> None:
        """The call's deadline, from when it is its worker's current call (a worker that has
        not said it is ready yet: its start is not the call's time)."""
        if call.deadline is None:
            ready = call.worker.ready
            call.deadline = time.monotonic() + (call.timeout if ready else max(START_SECONDS, call.timeout))

    def _next(self, call: FunctionCall, limit: float | None) -> tuple[bytes, bytes] | None:
        """The call's reply frame (R or E), the frames before it handled; None at ``limit`` or
        at the call's deadline."""
        worker = call.worker
        while True:
            assert call.deadline is not None
            frame = worker.receive(call.deadline if limit is None else min(limit, call.deadline))
            if frame is None:
                return None
            tag, payload = frame
            if tag == b"D":
                worker.took(_SECONDS.unpack(payload)[0])
            elif tag == b"H":
                worker.ready = True
                call.deadline = time.monotonic() + call.timeout
            elif tag == b"L":  # the call printed or logged: its log gets that, only then
                writer = LogWriter(call.open_log, self.max_log_bytes)
                writer.feed(payload)
                writer.close()
            else:
                return tag, payload

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
        never blocks the executor while the worker writes a large reply nobody reads."""
        payloads: list[bytes] = []
        known = worker.call_seconds
        ahead = 2 if known is None else max(2, int(AHEAD_SECONDS / max(known, 1e-6)))
        with self._lock:
            calls, at, inflight = worker.calls, worker.sent, worker.inflight
            while at < min(len(calls), ahead):
                size = len(calls[at].payload) + FRAME_HEAD
                if inflight and inflight + size > PIPE_BUDGET:
                    break
                payloads.append(calls[at].payload)
                inflight += size
                at += 1
            worker.sent, worker.inflight = at, inflight
        if payloads:
            with contextlib.suppress(WorkerGone):  # noticed by the call waiting on it
                worker.send(*payloads)

    def _done(self, call: FunctionCall) -> None:
        """The call, its worker's first, is finished: out of its queue."""
        worker = call.worker
        with self._lock:
            if worker.calls and worker.calls[0] is call:
                worker.calls.popleft()
                if worker.sent:
                    worker.sent -= 1
                    worker.inflight -= len(call.payload) + FRAME_HEAD

    def _stopped(self, call: FunctionCall) -> Outcome:
        """A call cancelled before it ran: if it is in its worker's pipe already, the worker
        goes (it would run it) and the calls behind it move to a new one."""
        worker = call.worker
        with self._lock:
            in_pipe = worker.sent > 0
        self._done(call)
        if in_pipe:
            worker.victim_taken = True
            worker.close()
        elif not worker.calls:
            self._give(call.key, worker)
        return Outcome(None, FailureCode.ErrorUnknownFailure.value, STOPPED)

    def _move(self, dead: Worker) -> None:
        """Every call left on a dead worker (none of them ran), in order, to a new one."""
        with self._lock:
            calls = list(dead.calls)
            dead.calls.clear()
            dead.sent = dead.inflight = 0
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

    def flush(self) -> None:
        """Write the results kept since the last flush (before the reports of their calls)."""
        with self._lock:
            results, self._results = self._results, []
        if not results:
            return
        try:
            self._sink.save(results)
        except BaseException:
            with self._lock:
                self._results[:0] = results
            raise

    def close(self) -> None:
        with self._lock:
            self._closed = True
            workers = [w for ws in self._idle.values() for w in ws]
            self._idle.clear()
        for worker in workers:
            worker.close()

    # -- calls ----------------------------------------------------------------------------------

    def _event(self, launch: JobLaunch) -> str | None:
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
            if self._closed or worker.closed or not worker.alive:
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

    def _code(self, launch: JobLaunch, code: str) -> str | Outcome:
        """The code zip from project storage, unpacked once per content (by its SHA-256)."""
        shared = next((m.host_path for m in launch.mounts if m.env_name == PROJECT_SHARED_ENV), None)
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
