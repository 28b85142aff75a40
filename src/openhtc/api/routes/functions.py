"""openhtc extension: function tasks (docs/functions.md, docs/extensions.md).

Scoped exactly as the task's Rescale routes (``task_for``): submit a function batch, read its
results in index order (a long poll with ``wait``), cancel it.
"""

from __future__ import annotations

import math
from typing import Any

from fastapi import APIRouter, Body, Depends, Request
from starlette.concurrency import run_in_threadpool

from openhtc.api.deps import principal, services, task_for
from openhtc.api.pagination import first
from openhtc.api.responses import JSONResponse
from openhtc.api.routes.live import MAX_WAIT, _closing, _wait, admit, busy
from openhtc.auth.permissions import require_user
from openhtc.auth.tokens import Principal
from openhtc.domain.errors import ValidationFailed
from openhtc.services.functions import (
    StoredBatch,
    cancel_functions,
    function_target,
    results_page,
    store_functions,
)
from openhtc.services.notify import NOTHING_ENDED, Subscription, task_key
from openhtc.services.service_set import ServiceSet
from openhtc.services.submission import target

router = APIRouter()
FUNCTIONS = "/openhtc/v1/projects/{project_id}/tasks/{task_id}/functions"
MAX_LIMIT = 10_000
# A waiting reader looks again at once: reports wake it at most once per executor turn. Keep it
# 0: a claim's NOTHING_ENDED (services/notify.py) is trusted only when the read follows the wake-up.
RESULTS_GAP = 0.0


@router.post(FUNCTIONS)
async def submit(
    project_id: str,
    task_id: str,
    request: Request,
    body: Any = Body(None),
    who: Principal = Depends(principal),
    svc: ServiceSet = Depends(services),
) -> JSONResponse:
    """Store a function batch. With ``wait`` (seconds) the answer also holds its first page of
    results (``results``: what ``GET …/results?from=0`` with that ``wait`` and ``limit``
    answers), so a client of a few short calls sends one request, not two. Past
    max_live_subscriptions open waits it answers at once without it (a 503 could not tell the
    client whether the batch was stored)."""
    wait = _seconds(request)
    limit = _int(request, "limit", 1000, 1, MAX_LIMIT)

    def store() -> tuple[dict[str, Any], StoredBatch]:
        project, task, capacity = target(svc, who, project_id, task_id)  # read together
        require_user(who, "submit functions")
        return store_functions(svc, who, project, task, body, capacity)

    if wait <= 0 or busy(svc):
        return JSONResponse((await run_in_threadpool(store))[0], status_code=201)
    key = task_key(task_id)
    # Subscribed before the batch is stored: every end of its calls wakes it. What was
    # published meanwhile that ended nothing (this submit, claims) leaves its empty page
    # standing: no read before a call has ended (the lone call's claim runs meanwhile).
    async with svc.notify.subscribe((key,)) as sub:
        answer, batch = await run_in_threadpool(store)
        page: dict[str, Any] | None = {
            "items": [],
            "next": 0,
            "done": 0,
            "failed": 0,
            "total": batch.batch_size,
        }
        if sub.pending() and sub.facts.get(key) != NOTHING_ENDED:
            page = None  # a change nobody described: read
        elif sub.pending():
            sub.facts.pop(key, None)
            await sub.wait(0)  # taken: it changed nothing the page shows
        answer["results"] = await _held(
            request, svc, sub, task_id, batch.parent_job_id, 0, limit, wait, [batch], page
        )
    return JSONResponse(answer, status_code=201)


def _int(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = first(request, name)
    if raw is None or raw == "":
        return default
    if not (raw.isascii() and raw.isdigit()) or not low <= int(raw) <= high:
        raise ValidationFailed(f"must be an integer from {low} to {high}", field=name)
    return int(raw)


def _seconds(request: Request) -> float:
    raw = first(request, "wait")
    if raw is None or raw == "":
        return 0.0
    try:
        value = float(raw)
    except ValueError:
        raise ValidationFailed(f"'{raw}' is not a number of seconds", field="wait") from None
    if not math.isfinite(value) or value < 0:
        raise ValidationFailed("must be a number of seconds from 0", field="wait")
    return min(value, MAX_WAIT)


@router.get(FUNCTIONS + "/{batch_id}/results")
async def results(
    project_id: str,
    task_id: str,
    batch_id: str,
    request: Request,
    who: Principal = Depends(principal),
    svc: ServiceSet = Depends(services),
) -> JSONResponse:
    """Ended calls from index ``from`` on, in order, up to the first that has not ended; with
    ``wait``, held until at least one is there (or the batch has no calls from there)."""
    start = _int(request, "from", 0, 0, 2**31 - 1)
    limit = _int(request, "limit", 1000, 1, MAX_LIMIT)
    wait = _seconds(request)
    known: list[Any] = []  # the batch row, read once

    def first_read() -> tuple[int, tuple[bool, dict[str, Any]]]:
        """The scope checks and the first page, in one trip to the thread pool."""
        known[:] = [function_target(svc, who, project_id, task_id, batch_id)]
        seen = svc.notify.published()
        return seen, _read(svc, task_id, batch_id, start, limit, known)

    seen, (done, body) = await run_in_threadpool(first_read)
    if done or wait <= 0:
        return JSONResponse(body)
    admit(svc)
    async with svc.notify.subscribe((task_key(task_id),)) as sub:
        # Nothing published since the read began: it still holds, and what changes from now on
        # wakes the subscription (a writer publishes after its commit). Else read again.
        page = body if svc.notify.published() == seen else None
        return JSONResponse(
            await _held(request, svc, sub, task_id, batch_id, start, limit, wait, known, page)
        )


def _read(
    svc: ServiceSet, task_id: str, batch_id: str, start: int, limit: int, known: list[Any]
) -> tuple[bool, dict[str, Any]]:
    """The results page from ``start``, and whether a wait for it is over: a call there has
    ended, or the batch has none from there."""
    body, count = results_page(svc, task_id, batch_id, start, limit, known)
    return count > 0 or start >= body["total"], body


async def _held(
    request: Request,
    svc: ServiceSet,
    sub: Subscription,
    task_id: str,
    batch_id: str,
    start: int,
    limit: int,
    wait: float,
    known: list[Any],
    page: dict[str, Any] | None,
) -> dict[str, Any]:
    """The results page from ``start``, held until at least one call there has ended, or
    ``wait`` is over. ``page``: one that holds now (nothing ended since it was read, and the
    subscription wakes on what ends from now on); None: read first. ``known``: the batch row."""
    key = task_key(task_id)
    last = [page] if page is not None else []  # the page read last

    def check() -> tuple[bool, dict[str, Any]]:
        done, body = _read(svc, task_id, batch_id, start, limit, known)
        last[:] = [body]
        return done, body

    def told() -> tuple[bool, dict[str, Any]] | None:
        """Woken by what ended no call (claims, submits): the page read last still holds."""
        return (False, last[0]) if sub.facts.pop(key, None) == NOTHING_ENDED and last else None

    first = (False, page) if page is not None else None
    return await _wait(request, sub, wait, check, RESULTS_GAP, _closing(svc), first, told)


@router.post(FUNCTIONS + "/{batch_id}/cancel")
def cancel(
    project_id: str,
    task_id: str,
    batch_id: str,
    who: Principal = Depends(principal),
    svc: ServiceSet = Depends(services),
) -> JSONResponse:
    task_for(svc, who, project_id, task_id)
    require_user(who, "cancel functions")
    return JSONResponse({"cancelled": cancel_functions(svc, task_id, batch_id)})
