"""Function tasks from the client's side: map a Lambda-style handler over JSON events.

A function batch runs ``handler(event, context)`` once per event in warm worker processes of an
image (docs/functions.md) and keeps each call's JSON result. The routes are openhtc extensions
(``/openhtc/v1/…/functions``); :class:`~openhtc.client.Task` gains ``map`` and
``submit_functions`` from here::

    with Session() as htc:
        task = htc.project(pid).create_task("squares")
        print(task.map("py:1", "handlers.double", [{"x": i} for i in range(10_000)]))

        batch = task.submit_functions("py:1", "handlers.double", events)
        for index, result in batch.results():     # in index order, as the calls finish
            ...

One submission holds any number of events: they go in chunks of up to 100,000 (the server's
limit per call), one server batch each, and the indices run on across the chunks.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, overload

import httpx

from openhtc.client import live
from openhtc.client._errors import HtcConnectionError, HtcError, ServerError
from openhtc.client._transport import API_PREFIX, Connection, segment

__all__ = [
    "MAX_EVENTS_PER_CALL",
    "FunctionBatch",
    "FunctionCall",
    "FunctionCounts",
    "FunctionError",
    "function_request",
]

JsonDict = dict[str, Any]
MAX_EVENTS_PER_CALL = 100_000  # the server accepts at most this many events per submission
PAGE_SIZE = 10_000  # results per page: the server's maximum, fewest round trips when calls are short
LONG_POLL = 30.0  # seconds one results call may wait on the server (it holds 60 at most)
READ_RETRIES = 3  # results reads that time out in a row before the error is raised
# Task.map's submit waits this long for the first results (a lone short call's answer in one
# request); short, so a connection lost meanwhile loses little more than a submit's own would
# (the batch's id, for the calls that then run unobserved).
SUBMIT_WAIT = 1.0


class _HasConnection(Protocol):
    connection: Connection


class TaskRef(Protocol):
    """What a function batch needs of its task (an :class:`openhtc.client.Task`)."""

    @property
    def id(self) -> str: ...
    @property
    def project_id(self) -> str: ...
    @property
    def session(self) -> _HasConnection: ...


class FunctionError(Exception):
    """A function call failed: the handler raised, timed out, or its worker died.

    ``index`` is the call's position among the submitted events; ``type``, ``message`` and
    ``traceback`` are the remote exception's (``TimeoutError`` for a timeout); ``failure_code``
    the job's (``ErrorFunction`` when the handler raised, docs/functions.md).
    """

    def __init__(
        self,
        index: int,
        type: str,
        message: str,
        traceback: str = "",
        *,
        status: str = "FAILED",
        attempt: int = 1,
        failure_code: str | None = None,
    ) -> None:
        self.index = index
        self.type = type
        self.message = message
        self.traceback = traceback
        self.status = status
        self.attempt = attempt
        self.failure_code = failure_code
        super().__init__(index, type, message)

    def __str__(self) -> str:
        text = f"call {self.index} failed: {self.type}: {self.message}"
        if self.traceback:
            text += "\n--- remote traceback ---\n" + self.traceback.rstrip()
        return text

    def __repr__(self) -> str:
        return f"FunctionError(index={self.index}, type={self.type!r}, message={self.message!r})"

    @classmethod
    def from_call(cls, call: FunctionCall) -> FunctionError:
        error = call.error or {}
        return cls(
            call.index,
            str(error.get("type") or "FunctionError"),
            str(error.get("message") or f"the call ended {call.status}"),
            str(error.get("traceback") or ""),
            status=call.status,
            attempt=call.attempt,
            failure_code=call.failure_code,
        )


@dataclass(frozen=True, slots=True)
class FunctionCall:
    """One call's outcome as the results route reports it (``index`` across the whole submission)."""

    index: int
    status: str
    result: Any = None
    error: JsonDict | None = None
    attempt: int = 1
    failure_code: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "SUCCEEDED"


@dataclass(slots=True)
class FunctionCounts:
    """How many calls of a submission have ended (``done``, failures included) and failed."""

    total: int = 0
    done: int = 0
    failed: int = 0

    @property
    def succeeded(self) -> int:
        return self.done - self.failed

    @property
    def finished(self) -> bool:
        return self.done >= self.total


def function_request(
    image: str,
    handler: str,
    events: Sequence[Any],
    *,
    code: str | None = None,
    max_vcpus: int = 1,
    max_memory: int = 512,
    timeout: int = 60,
    retries: int = 0,
    priority: int | None = None,
    group: str | None = None,
) -> JsonDict:
    """The body of ``POST …/functions`` (docs/functions.md); ``max_memory`` in MiB, ``timeout``
    in seconds per call."""
    body: JsonDict = {
        "image": image,
        "handler": handler,
        "code": code,
        "maxVCpus": max_vcpus,
        "maxMemory": max_memory,
        "execTimeoutSeconds": timeout,
        "retryStrategy": {"maxRetries": retries},
        "events": list(events),
    }
    if priority is not None:
        body["priority"] = priority
    if group is not None:
        body["groupName"] = group
    return body


def _functions_url(conn: Connection, project_id: str, task_id: str) -> str:
    base = conn.base_url
    root = base[: -len(API_PREFIX)] if base.endswith(API_PREFIX) else base
    return f"{root}/openhtc/v1/projects/{segment(project_id)}/tasks/{segment(task_id)}/functions"


@dataclass(slots=True)
class _Part:
    """One server batch: the events ``offset`` … ``offset + count - 1`` of the submission."""

    batch_id: str
    offset: int
    count: int
    counts: FunctionCounts = field(default_factory=FunctionCounts)


class FunctionBatch:
    """Handle on a submitted set of function calls (one server batch per 100,000 events)."""

    def __init__(
        self, task: TaskRef, parts: Sequence[tuple[str, int]], first_page: JsonDict | None = None
    ) -> None:
        """``parts``: ``(batchId, count)`` per server batch, in submission order. ``first_page``:
        the first batch's results from index 0, as its submit answered them (``wait``)."""
        self.task = task
        self._parts: list[_Part] = []
        offset = 0
        for batch_id, count in parts:
            self._parts.append(_Part(batch_id, offset, count, FunctionCounts(total=count)))
            offset += count
        # Kept only if it holds results (ended calls stay ended), or says the batch has no
        # more: an empty page read then says nothing of now (a later calls(wait=0) would stop).
        has = first_page is not None and (first_page.get("items") or first_page.get("next") is None)
        self._first_page = first_page if has else None

    def __repr__(self) -> str:
        return f"FunctionBatch({self.batch_ids!r}, count={self.count})"

    def __len__(self) -> int:
        return self.count

    @property
    def batch_ids(self) -> list[str]:
        """The server batches' ids (each the parent job id of its calls' jobs)."""
        return [part.batch_id for part in self._parts]

    @property
    def count(self) -> int:
        return sum(part.count for part in self._parts)

    @property
    def counts(self) -> FunctionCounts:
        """The counts the server last reported (updated by every results page)."""
        total = FunctionCounts()
        for part in self._parts:
            total.total += part.counts.total
            total.done += part.counts.done
            total.failed += part.counts.failed
        return total

    @property
    def _conn(self) -> Connection:
        return self.task.session.connection

    def _url(self, part: _Part, tail: str) -> str:
        base = _functions_url(self._conn, self.task.project_id, self.task.id)
        return f"{base}/{segment(part.batch_id)}/{tail}"

    # -- results ----------------------------------------------------------------------------

    def _page(self, part: _Part, start: int, limit: int, wait: float) -> JsonDict:
        params: dict[str, str | int] = {"from": start, "limit": limit, "wait": f"{wait:g}"}
        url = self._url(part, "results")
        for attempt in range(READ_RETRIES + 1):
            try:
                body = self._conn.call("GET", url, params=params, timeout=wait + 30.0)
                break
            except ServerError as exc:
                if exc.status_code != 503:
                    raise
                # the server holds too many waits right now: look without waiting, a moment later
                time.sleep(min(wait, 0.5))
                params["wait"] = "0"
            except HtcConnectionError as exc:
                # a long poll unanswered past its wait (a server too busy to answer in time) is
                # asked again: the read is idempotent; a refused connection is not retried
                if not isinstance(exc.__cause__, httpx.ReadTimeout) or attempt == READ_RETRIES:
                    raise
        else:  # only 503s: the last answer decides
            body = self._conn.call("GET", url, params=params, timeout=wait + 30.0)
        return self._took(part, body)

    def _took(self, part: _Part, body: Any) -> JsonDict:
        if not isinstance(body, dict) or not isinstance(body.get("items"), list):
            raise HtcError(f"malformed results page for batch {part.batch_id}: {str(body)[:200]}")
        part.counts.total = int(body.get("total", part.count))
        part.counts.done = int(body.get("done", 0))
        part.counts.failed = int(body.get("failed", 0))
        return body

    def calls(
        self, *, timeout: float | None = None, page_size: int = PAGE_SIZE, wait: float | None = None
    ) -> Iterator[FunctionCall]:
        """Every call's outcome in index order, each as soon as it and all before it have ended
        (long polls: nothing is fetched twice, no interval is slept). ``timeout`` (seconds, for
        the whole iteration) raises ``TimeoutError``. With ``wait`` (seconds per page, 0: do not
        wait) it stops at the first call that has not ended by then instead."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for part in self._parts:
            start: int | None = 0
            while start is not None and start < part.count:
                poll = LONG_POLL if wait is None else wait
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TimeoutError(f"timed out waiting for call {part.offset + start} of {self!r}")
                    poll = min(poll, left)
                first, self._first_page = self._first_page, None  # the submit's answer, once
                if first is not None and start == 0 and part is self._parts[0]:
                    page = self._took(part, first)
                else:
                    page = self._page(part, start, page_size, poll)
                for item in page["items"]:
                    index = int(item["index"])
                    status = str(item.get("status") or "")
                    yield FunctionCall(
                        part.offset + index,
                        status,
                        item.get("result") if status == "SUCCEEDED" else None,  # large ones too
                        item.get("error") or None,
                        int(item.get("attempt") or 1),
                        item.get("failureCode") or None,
                    )
                    start = index + 1
                nxt = page.get("next")
                if wait is not None and not page["items"] and nxt is not None:
                    return  # the call at ``start`` has not ended within ``wait``
                start = None if nxt is None else int(nxt)

    @overload
    def results(
        self,
        *,
        return_exceptions: Literal[False] = False,
        timeout: float | None = None,
        page_size: int = PAGE_SIZE,
    ) -> Iterator[tuple[int, Any]]: ...
    @overload
    def results(
        self, *, return_exceptions: bool, timeout: float | None = None, page_size: int = PAGE_SIZE
    ) -> Iterator[tuple[int, Any]]: ...
    def results(
        self, *, return_exceptions: bool = False, timeout: float | None = None, page_size: int = PAGE_SIZE
    ) -> Iterator[tuple[int, Any]]:
        """``(index, result)`` in index order as the calls finish. A failed call raises its
        :class:`FunctionError`, or with ``return_exceptions`` is yielded as the result."""
        for call in self.calls(timeout=timeout, page_size=page_size):
            if call.ok:
                yield call.index, call.result
                continue
            error = FunctionError.from_call(call)
            if not return_exceptions:
                raise error
            yield call.index, error

    def wait(self, timeout: float | None = None) -> FunctionCounts:
        """Wait until every call has ended; return the counts. Each server batch is the parent job
        of its calls, so openhtc's pushed batch wait answers the moment its last call ends; no
        result travels."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for part in self._parts:
            while True:
                left = LONG_POLL if deadline is None else min(LONG_POLL, deadline - time.monotonic())
                if left <= 0:
                    raise TimeoutError(f"timed out waiting for {self!r}")
                conn, task = self._conn, self.task
                try:
                    done = live.wait_batch(conn, task.project_id, task.id, part.batch_id, left).get("done")
                except live.Unsupported:  # a busy server: look at the counts instead, a second apart
                    done = self._page(part, 0, 1, 0)["done"] >= part.count
                    if not done:
                        time.sleep(min(1.0, left))
                if done:
                    self._page(part, 0, 1, 0)  # the final counts
                    break
        return self.counts

    def cancel(self) -> int:
        """Cancel every call that has not ended (running ones are stopped); returns how many."""
        cancelled = 0
        for part in self._parts:
            body = self._conn.call("POST", self._url(part, "cancel"))
            cancelled += int((body or {}).get("cancelled", 0))
        return cancelled


def submit_functions(
    task: TaskRef,
    image: str,
    handler: str,
    events: Sequence[Any],
    *,
    chunk_size: int = MAX_EVENTS_PER_CALL,
    wait: float = 0.0,
    **options: Any,
) -> FunctionBatch:
    """Submit ``events`` in chunks of ``chunk_size`` (at most 100,000); if a later chunk is refused,
    the chunks already accepted are cancelled before the error is raised. ``wait`` (seconds; one
    chunk only): the submit's answer also brings the first results ended within it (a lone
    call's result in one request, not two)."""
    events = events if isinstance(events, Sequence) else list(events)
    if not events:
        raise ValueError("no events: a function batch needs at least one")
    if not 0 < chunk_size <= MAX_EVENTS_PER_CALL:
        raise ValueError(f"chunk_size must be 1 to {MAX_EVENTS_PER_CALL}")
    if len(events) > chunk_size:  # a bad event in a later chunk must not leave earlier ones running
        for start in range(0, len(events), chunk_size):
            _check_json(events, start, start + chunk_size)
    conn = task.session.connection
    url = _functions_url(conn, task.project_id, task.id)
    parts: list[tuple[str, int]] = []
    first_page: JsonDict | None = None
    # Only a lone chunk waits: a later chunk's submit must not wait on the first's calls.
    params = {"wait": f"{wait:g}"} if wait > 0 and len(events) <= chunk_size else None
    try:
        for start in range(0, len(events), chunk_size):
            chunk = events[start : start + chunk_size]
            body = function_request(image, handler, chunk, **options)
            try:
                # held up to ``wait`` longer than the connection's timeout allows a submit
                held = conn.timeout + wait if params else None
                answer = conn.call("POST", url, body, params=params, timeout=held)
            except (TypeError, ValueError):  # the body could not be encoded: nothing was sent
                _check_json(events, start, start + chunk_size)
                raise
            parts.append((str(answer["batchId"]), int(answer.get("count", len(chunk)))))
            if isinstance(answer.get("results"), dict):
                first_page = answer["results"]
    except BaseException:
        if parts:
            FunctionBatch(task, parts).cancel()
        raise
    return FunctionBatch(task, parts, first_page)


def _check_json(events: Sequence[Any], start: int, stop: int) -> None:
    """Raise ValueError naming the first event from ``start`` to ``stop`` that is not JSON."""
    try:
        json.dumps(events[start:stop], allow_nan=False)
    except (TypeError, ValueError):
        for index in range(start, min(stop, len(events))):
            try:
                json.dumps(events[index], allow_nan=False)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"event {index} is not JSON: {exc}") from None
        raise


def function_batch(task: TaskRef, batch_ids: str | Sequence[str]) -> FunctionBatch:
    """A handle on batches submitted earlier (by id, in submission order); their sizes are asked."""
    ids = [batch_ids] if isinstance(batch_ids, str) else list(batch_ids)
    probe = FunctionBatch(task, [(batch_id, 1) for batch_id in ids])
    sizes = []
    for part in probe._parts:
        page = probe._page(part, 0, 1, 0)
        sizes.append(int(page.get("total", 0)))
    return FunctionBatch(task, list(zip(ids, sizes, strict=True)))
