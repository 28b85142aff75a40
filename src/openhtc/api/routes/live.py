"""openhtc's extension routes for clients that wait: pushed waits (long polls) and event streams.

Under ``/openhtc/v1/`` (docs/extensions.md), scoped exactly as the Rescale routes scope the
same task and job (``task_for``, ``job_for``). A waiter subscribes to the notifier
(services/notify.py) before it reads what it waits for, then reads again on each wake-up, so it
answers the moment the store has committed the change; nothing polls. A client that goes away
is noticed at once (its ``http.disconnect``) and releases its subscription. When the server
stops, the notifier closes: every long poll answers and every stream ends, so the shutdown does
not wait for them. Past ``max_live_subscriptions`` open waits, new ones answer 503 (the client
polls instead).
"""

from __future__ import annotations

import asyncio
import base64
import math
from collections.abc import AsyncIterator, Callable
from types import SimpleNamespace
from typing import Any, TypeVar

import orjson
from fastapi import APIRouter, Depends, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response, StreamingResponse

from openhtc.api import serializers as ser
from openhtc.api.deps import job_for, principal, services, task_for, task_job_for
from openhtc.api.pagination import encode_cursor, first
from openhtc.api.responses import JSONResponse
from openhtc.auth.permissions import require_user
from openhtc.auth.tokens import Principal
from openhtc.domain.clock import iso
from openhtc.domain.enums import NON_TERMINAL_STATUSES, JobStatus
from openhtc.domain.errors import NotFound, Unavailable, ValidationFailed
from openhtc.services.logwatch import FALLBACK_SECONDS
from openhtc.services.notify import Key, Subscription, job_key, task_key
from openhtc.services.service_set import ServiceSet

router = APIRouter()
PREFIX = "/openhtc/v1"
TASK = PREFIX + "/projects/{project_id}/tasks/{task_id}"
MAX_WAIT = 60.0  # seconds a long poll may hold; proxies commonly cut idle requests at 60-100 s
DEFAULT_WAIT = 30.0
KEEPALIVE = 15.0  # an idle stream sends a comment this often
COUNTS_REFRESH = 5.0  # a counts stream re-reads this often too (admissions publish nothing)
COUNTS_GAP = 0.25  # at most 4 counts events a second
LOG_GAP = 0.05  # new log lines are sent at most 20 times a second, in as few events as they fill
LOG_PAGE = 1000
TASK_GAP = 0.25  # task and batch waits look again at most 4 times a second (every job's report wakes them)
MAX_POSITION = 2**62  # a log position beyond any file: refused before the stream starts
_OPEN = frozenset(s.name for s in NON_TERMINAL_STATUSES)
T = TypeVar("T")


def _timeout(request: Request) -> float:
    raw = first(request, "timeout")
    if raw is None or raw == "":
        return DEFAULT_WAIT
    try:
        value = float(raw)
    except ValueError:
        raise ValidationFailed(f"'{raw}' is not a number of seconds", field="timeout") from None
    if not math.isfinite(value) or value < 0 or value > MAX_WAIT:
        raise ValidationFailed(f"must be between 0 and {MAX_WAIT:g} seconds", field="timeout")
    return value


async def _scoped(svc: ServiceSet, who: Principal, project_id: str, task_id: str) -> Any:
    _, task = await run_in_threadpool(task_for, svc, who, project_id, task_id)
    return task


def busy(svc: ServiceSet) -> bool:
    """Whether ``max_live_subscriptions`` long polls and streams are open already."""
    return svc.notify.waiters() >= svc.settings.max_live_subscriptions


def admit(svc: ServiceSet) -> None:
    """Refuse a new long poll or stream past ``max_live_subscriptions`` open ones (503 with a
    Retry-After): the client falls back to polling."""
    if busy(svc):
        raise Unavailable("too many open waits and streams on this server; poll instead, or retry later")


async def _wait(
    request: Request,
    sub: Subscription,
    timeout: float,
    check: Callable[[], tuple[bool, T]],
    gap: float = 0.0,
    closing: Callable[[], bool] = lambda: False,
    first: tuple[bool, T] | None = None,
    told: Callable[[], tuple[bool, T] | None] = lambda: None,
) -> T:
    """Read with ``check`` (on a worker thread) until it says done, or until ``timeout``, at
    most once every ``gap`` s; a client that disconnects ends the wait at once (its answer is
    dropped), a server that stops (``closing``) answers with what it read last. ``first``: what
    a read made before the subscription found, when nothing was published since it began.
    ``told``: on the event loop, before a read: what the wake-up's writer said (then no read)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    gone = asyncio.Event()

    async def watch_disconnect() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        gone.set()
        sub.fire()

    watcher = asyncio.create_task(watch_disconnect())
    try:
        while True:
            if first is None:
                first = told()
            done, body = first if first is not None else await run_in_threadpool(check)
            first = None
            checked = loop.time()
            left = deadline - checked
            if done or left <= 0 or gone.is_set() or closing():
                return body
            await sub.wait(left)
            if gone.is_set() or closing():
                return body
            pause = min(checked + gap, deadline) - loop.time()
            if pause > 0:  # coalesce a busy task's reports into one read
                await asyncio.sleep(pause)
    finally:
        watcher.cancel()


@router.get(PREFIX + "/live")
async def live_stats(
    who: Principal = Depends(principal), svc: ServiceSet = Depends(services)
) -> JSONResponse:
    """What this server holds for clients that wait: open subscriptions (long polls and
    streams) and watched log directories."""
    require_user(who, "read the server's live statistics")
    return JSONResponse(
        {"subscriptions": svc.notify.waiters(), "watchedLogDirectories": svc.logwatch.watched()}
    )


# -- pushed waits ---------------------------------------------------------------------------------


@router.get(TASK + "/jobs/{job_id}/wait")
async def wait_job(
    project_id: str,
    task_id: str,
    job_id: str,
    request: Request,
    who: Principal = Depends(principal),
    svc: ServiceSet = Depends(services),
) -> JSONResponse:
    """The job (as ``GET …/jobs/{id}``), once it has ended or at the timeout."""
    timeout = _timeout(request)
    seen = svc.notify.published()
    job, batch = await run_in_threadpool(task_job_for, svc, who, project_id, task_id, job_id)
    if JobStatus(job.status).terminal or timeout == 0:
        return JSONResponse(ser.job(job, batch))
    admit(svc)
    async with svc.notify.subscribe((job_key(job.id),)) as sub:
        # Nothing published since the read began: it still holds, and what changes from now on
        # wakes the subscription (a writer publishes after its commit). Else read again.
        held = svc.notify.published() == seen
        return JSONResponse(await wait_for_job(request, svc, sub, task_id, job_id, job, batch, timeout, held))


async def wait_for_job(
    request: Request,
    svc: ServiceSet,
    sub: Subscription,
    task_id: str,
    job_id: str,
    job: Any,
    batch: Any,
    timeout: float,
    held: bool,
) -> dict[str, Any]:
    """A job's wait, subscribed to its key: the job once it has ended, or at the timeout.
    ``job``, ``batch``: its rows as read; ``held``: they still hold (nothing was published
    since the read began), else they are read again first."""
    key = job_key(job.id)

    def check() -> tuple[bool, dict[str, Any]]:
        found, row = job_for(svc, task_id, job_id)
        return JobStatus(found.status).terminal, ser.job(found, row)

    def told() -> tuple[bool, dict[str, Any]] | None:
        """The job's end as its report's commit said it (services/executors.py: the changed
        columns of its row), on the row read here: the answer without reading it back."""
        fact = sub.facts.pop(key, None)
        if fact is None or not hasattr(job, "_asdict"):
            return None
        return True, ser.job(SimpleNamespace(**{**job._asdict(), **fact}), batch)

    first = (JobStatus(job.status).terminal, ser.job(job, batch)) if held else None
    return await _wait(request, sub, timeout, check, 0.0, _closing(svc), first, told)


@router.get(TASK + "/batches/{parent_job_id}/wait")
async def wait_batch(
    project_id: str,
    task_id: str,
    parent_job_id: str,
    request: Request,
    who: Principal = Depends(principal),
    svc: ServiceSet = Depends(services),
) -> JSONResponse:
    """A submitted batch (the ``parentJobId`` its submit answered): done once all its jobs
    have ended, or at the timeout."""
    timeout = _timeout(request)
    await _scoped(svc, who, project_id, task_id)
    unfinished = [0]

    def check() -> tuple[bool, dict[str, Any]]:
        with svc.db.read() as conn:
            batch = svc.jobs.batch_by_parent(conn, parent_job_id)
            if batch is None or batch.task_id != task_id:
                raise NotFound(f"batch {parent_job_id} not found in task {task_id}")
            left = svc.jobs.first_unfinished(conn, batch, unfinished[0])
        if left is not None:
            unfinished[0] = left
        body = {
            "parentJobId": parent_job_id,
            "taskId": task_id,
            "group": batch.group_name,
            "batchSize": batch.batch_size,
            "done": left is None,
        }
        return left is None, body

    return await _answer(request, svc, task_key(task_id), timeout, check, TASK_GAP)


@router.get(TASK + "/wait")
async def wait_task(
    project_id: str,
    task_id: str,
    request: Request,
    who: Principal = Depends(principal),
    svc: ServiceSet = Depends(services),
) -> JSONResponse:
    """A task (or its ``group``s, the parameter repeated): done once none of its jobs is left
    to end, or at the timeout."""
    timeout = _timeout(request)
    groups = _groups(request)
    await _scoped(svc, who, project_id, task_id)

    def check() -> tuple[bool, dict[str, Any]]:
        body = _counts(svc, task_id, groups)
        return body["done"], body

    return await _answer(request, svc, task_key(task_id), timeout, check, TASK_GAP)


async def _answer(
    request: Request,
    svc: ServiceSet,
    key: Key,
    timeout: float,
    check: Callable[[], tuple[bool, T]],
    gap: float,
) -> JSONResponse:
    """A long poll's answer: ``check``'s body once it says done, woken by changes of ``key``."""
    admit(svc)
    async with svc.notify.subscribe((key,)) as sub:
        return JSONResponse(await _wait(request, sub, timeout, check, gap, _closing(svc)))


def _closing(svc: ServiceSet) -> Callable[[], bool]:
    return lambda: svc.notify.closing


def _groups(request: Request) -> list[str]:
    groups = request.query_params.getlist("group")
    if len(groups) > 1000 or any(not g for g in groups):
        raise ValidationFailed("at most 1000 groups, none empty", field="group")
    return groups


def _counts(svc: ServiceSet, task_id: str, groups: list[str]) -> dict[str, Any]:
    """The body of a task's wait and counts events: jobs by status name (none at zero), of the
    task or of the given groups (summed, and each group's in ``groupCounts``)."""
    with svc.db.read() as conn:
        if not groups:
            counts = svc.jobs.totals(conn, task_id)
            per_group = None
        else:
            found = svc.jobs.summary(conn, task_id, groups)
            per_group = {g: {n: c for n, c in found.get(g, {}).items() if c} for g in groups}
            counts = {}
            for by_status in per_group.values():
                for name, count in by_status.items():
                    counts[name] = counts.get(name, 0) + count
    done = not any(counts.get(name) for name in _OPEN)
    body: dict[str, Any] = {"taskId": task_id, "groups": groups, "done": done, "statusCounts": counts}
    if per_group is not None:
        body["groupCounts"] = per_group
    return body


# -- event streams --------------------------------------------------------------------------------


class EventStream(StreamingResponse):
    """Server-Sent Events. Starlette stops the stream (and runs its clean-up) when the client
    disconnects."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[bytes]) -> None:
        super().__init__(
            events,
            media_type=self.media_type,
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )


def event(name: str, data: Any, event_id: str | None = None) -> bytes:
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {name}\n".encode() + b"data: " + orjson.dumps(data) + b"\n\n"


def resume_position(request: Request, attempts: int) -> tuple[int, int] | None:
    """Where a log stream starts: ``Last-Event-ID`` (the id of the last line received, a logs
    cursor), else the ``from`` parameter (the same), else the beginning."""
    raw = request.headers.get("last-event-id") or first(request, "from")
    if not raw:
        return None
    try:
        value = orjson.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
    except (ValueError, orjson.JSONDecodeError):
        value = None
    if (
        isinstance(value, list)
        and len(value) == 2
        and all(type(v) is int and 0 <= v <= MAX_POSITION for v in value)
        and 1 <= value[0] <= attempts
    ):
        return value[0], value[1]
    raise ValidationFailed("not a log position this server issued", field="Last-Event-ID")


@router.get(TASK + "/jobs/{job_id}/logs/stream")
async def stream_log(
    project_id: str,
    task_id: str,
    job_id: str,
    request: Request,
    who: Principal = Depends(principal),
    svc: ServiceSet = Depends(services),
) -> Response:
    """A job's log lines as they are written (``line`` events, each ``id`` a position to resume
    from), then one ``end`` event with the job once it has ended and every line was sent.
    It starts after ``Last-Event-ID`` (or ``from``), else with the last ``tail`` lines written
    so far, else at the first line."""
    tail = _tail(request)
    await _scoped(svc, who, project_id, task_id)
    job, batch = await run_in_threadpool(job_for, svc, task_id, job_id)
    start, skip = await log_start(svc, request, task_id, job, batch, tail)
    admit(svc)
    events = follow_log(svc, task_id, job_id, job.id, batch.parent_job_id, job.idx, start, skip)
    return EventStream(events)


async def log_start(
    svc: ServiceSet, request: Request, task_id: str, job: Any, batch: Any, tail: int | None
) -> tuple[tuple[int, int] | None, int]:
    """Where a log stream starts, and how many lines from there it skips: after
    ``Last-Event-ID`` (or ``from``), else at the ``tail``-th last line written so far (tail 0:
    only lines written from now on), else at the first line."""
    start = resume_position(request, job.attempt)
    if start is not None or tail is None:
        return start, 0
    key = (task_id, batch.parent_job_id, job.idx)
    newest = await run_in_threadpool(svc.logs.page, key, job.attempt, max(tail, 1), True, None)
    if not newest:
        return None, 0
    # read backward, a line's position is its start; tail 0: the newest line is skipped too
    return newest[-1].after, max(0, len(newest) - tail)


def _tail(request: Request) -> int | None:
    raw = first(request, "tail")
    if raw is None or raw == "":
        return None
    if not (raw.isascii() and raw.isdigit()) or int(raw) > LOG_PAGE * 100:
        raise ValidationFailed(f"must be a whole number from 0 to {LOG_PAGE * 100}", field="tail")
    return int(raw)


async def follow_log(
    svc: ServiceSet,
    task_id: str,
    job_id: str,
    row_id: int,
    parent_job_id: str,
    idx: int,
    start: tuple[int, int] | None,
    skip: int = 0,
) -> AsyncIterator[bytes]:
    """The events of a log stream (the dashboard's job page follows a log through this too);
    the first ``skip`` lines from ``start`` are not sent. It ends without ``end`` when the
    server stops (a client resumes after the last line it received)."""
    directory = str(svc.logs.path(task_id, parent_job_id, idx, 1).parent)  # one per batch
    position = start

    def read() -> tuple[Any, Any, list[Any]]:
        job, batch = job_for(svc, task_id, job_id)  # the status first: lines read after it are all
        lines = svc.logs.page((task_id, parent_job_id, idx), job.attempt, LOG_PAGE, False, position)
        return job, batch, lines

    async with (
        svc.notify.subscribe((job_key(row_id),)) as sub,
        svc.logwatch.watch(directory, sub.fire, prefix=f"{idx}.") as watched,
    ):
        idle = KEEPALIVE if watched else FALLBACK_SECONDS
        quiet = 0.0
        while not svc.notify.closing:
            job, batch, lines = await run_in_threadpool(read)
            if lines:
                quiet = 0.0
                chunk = []
                for line in lines:
                    position = line.after
                    if skip:
                        skip -= 1
                        continue
                    chunk.append(
                        event(
                            "line",
                            {"timestamp": iso(line.timestamp), "message": line.message},
                            encode_cursor(list(line.after)),
                        )
                    )
                if chunk:
                    yield b"".join(chunk)
                if len(lines) == LOG_PAGE:
                    continue
            if JobStatus(job.status).terminal:
                yield event("end", ser.job(job, batch))
                return
            await asyncio.sleep(LOG_GAP)  # coalesce a chatty job's writes
            if not await sub.wait(idle):
                quiet += idle
                if quiet >= KEEPALIVE:
                    quiet = 0.0
                    yield b": keep-alive\n\n"


@router.get(TASK + "/stream")
async def stream_task(
    project_id: str,
    task_id: str,
    request: Request,
    who: Principal = Depends(principal),
    svc: ServiceSet = Depends(services),
) -> Response:
    """A task's (or its ``group``s') status counts: a ``counts`` event at once, then one each
    time they change, at most four a second."""
    groups = _groups(request)
    await _scoped(svc, who, project_id, task_id)
    admit(svc)
    return EventStream(follow_counts(svc, task_id, groups))


async def follow_counts(svc: ServiceSet, task_id: str, groups: list[str]) -> AsyncIterator[bytes]:
    last: dict[str, Any] | None = None
    quiet = 0.0
    async with svc.notify.subscribe((task_key(task_id),)) as sub:
        while not svc.notify.closing:
            body = await run_in_threadpool(_counts, svc, task_id, groups)
            if body != last:
                last = body
                quiet = 0.0
                yield event("counts", body)
                await asyncio.sleep(COUNTS_GAP)
            if not await sub.wait(COUNTS_REFRESH):
                quiet += COUNTS_REFRESH
                if quiet >= KEEPALIVE:
                    quiet = 0.0
                    yield b": keep-alive\n\n"
