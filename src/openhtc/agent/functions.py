"""Function calls on ``htc agent``: the agent's side of the function pool (functions/pool.py).

The agent runs calls in warm workers exactly as the embedded executor does; only where things
come from and go to differs, since it cannot read the database:

- **events** come with the leases (``Launch.event``) and are kept here until the call's end is
  reported;
- **results** (value, or error type, message and traceback) go with the call's terminal report
  (``Report.result``); the server stores them with the status change, fenced by attempt;
- **a result over** ``function_result_max_bytes`` (which the server advertises at registration
  and in each exchange's answer) is put in the task's storage through the server's object API
  (storage/http_backend.py) with the job's own token (the lease carries it; renewed with its
  refresh token once expired), before the end is reported, and the report names its key;
- **a code zip** is read from the call's PROJECT_SHARED_FOLDER, which the agent stages through
  the same API (agent/storage.py), as for any job.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence

from openhtc.domain.errors import OpenHTCError
from openhtc.domain.models import AttemptReport, JobLaunch
from openhtc.executor import protocol as wire
from openhtc.functions.pool import FunctionPool, is_function
from openhtc.storage.http_backend import HttpBackend, JobToken
from openhtc.storage.layout import task_prefix
from openhtc.store.functions import CallResult


class AgentFunctions:
    """Events in, results out, large results over HTTP (see the module doc)."""

    def __init__(self, server: str) -> None:
        self.pool: FunctionPool | None = None
        self._lock = threading.Lock()
        self._events: dict[int, dict[int, str]] = {}  # batch -> index -> event (JSON text)
        self._calls: dict[tuple[int, int], tuple[int, int]] = {}  # (job, attempt) -> (batch, index)
        self._results: dict[tuple[int, int, int], CallResult] = {}  # (batch, index, attempt)
        self._storage = HttpBackend(server.rstrip("/") + "/api/v1", timeout=120.0)

    def close(self) -> None:
        self._storage.close()

    def configure(self, result_max_bytes: int | None) -> None:
        """What the server advertises (at registration, and in each exchange's answer)."""
        if result_max_bytes is not None and self.pool is not None:
            self.pool.result_max_bytes = result_max_bytes

    # -- the transport's side -------------------------------------------------------------------

    def leased(self, launch: JobLaunch, event: str | None) -> None:
        if event is None or not is_function(launch):
            return
        with self._lock:
            self._events.setdefault(launch.batch_id, {})[launch.array_index] = event
            self._calls[(launch.job_id, launch.attempt)] = (launch.batch_id, launch.array_index)

    def results_for(self, reports: Sequence[AttemptReport]) -> dict[tuple[int, int], wire.FunctionResult]:
        """The results of the calls these reports end. Kept here until :meth:`delivered` says
        the reports are in the outbox: a report that could not be written there (a full disk)
        is retried by the executor, and its result must go with the retry."""
        out: dict[tuple[int, int], wire.FunctionResult] = {}
        with self._lock:
            for report in reports:
                key = (report.job_id, report.attempt)
                call = self._calls.get(key)
                if not report.status.terminal or call is None:
                    continue
                kept = self._results.get((*call, report.attempt))
                if kept is not None:
                    error = None if kept.error is None else _bounded(kept.error, self._limit())
                    out[key] = wire.FunctionResult(
                        result=kept.result, error=error, result_key=kept.result_key
                    )
        return out

    def delivered(self, reports: Sequence[AttemptReport]) -> None:
        """These reports are in the outbox (with their results): the calls they end are done
        here (an end is reported once)."""
        with self._lock:
            for report in reports:
                key = (report.job_id, report.attempt)
                if not report.status.terminal or key not in self._calls:
                    continue
                batch_id, idx = self._calls.pop(key)
                events = self._events.get(batch_id)
                if events is not None:
                    events.pop(idx, None)
                    if not events:
                        del self._events[batch_id]
                self._results.pop((batch_id, idx, report.attempt), None)

    def _limit(self) -> int:
        return self.pool.result_max_bytes if self.pool is not None else 256 * 1024

    # -- the pool's side ------------------------------------------------------------------------

    def events(self, batch_id: int, start: int, stop: int) -> dict[int, str]:
        with self._lock:
            held = self._events.get(batch_id, {})
            return {i: e for i, e in held.items() if start <= i < stop}

    def save(self, results: Sequence[CallResult]) -> None:
        with self._lock:
            for r in results:
                self._results[(r.batch_id, r.idx, r.attempt)] = r

    def store_large(self, launch: JobLaunch, key: str, payload: bytes) -> str | None:
        token = JobToken.of(launch)
        if token is None:
            return "the lease carries no job token to store a large result with"
        try:
            with self._storage.acting_as(token):  # renewed by its refresh token once expired
                upload = self._storage.begin_put(task_prefix(launch.project_id, launch.task_id) + key)
                upload.write(payload)
                upload.commit()
        except (OpenHTCError, OSError) as exc:
            return f"cannot store the result in task storage: {exc}"
        return None


def _bounded(error: str, limit: int) -> str:
    """An error's JSON cut to at most about ``limit`` characters (a report must stay within the
    server's string limit): the message's start and the traceback's start and end are kept.
    Measured as sent: JSON escapes each non-ASCII character in six."""
    if len(error) <= limit:
        return error
    try:
        found = json.loads(error)
    except ValueError:
        found = None
    if not isinstance(found, dict):
        found = {"type": "Error", "message": error, "traceback": ""}
    kind, message, trace = (str(found.get(k, "")) for k in ("type", "message", "traceback"))
    keep = max(1000, limit // 3)
    while True:
        if len(message) > keep:
            message = message[:keep] + " ... (cut)"
        if len(trace) > keep:
            trace = trace[: keep // 2] + "\n... (cut) ...\n" + trace[-keep // 2 :]
        out = json.dumps({"type": kind[:200] or "Error", "message": message, "traceback": trace})
        if len(out) <= limit or keep <= 100:
            return out
        keep //= 2
