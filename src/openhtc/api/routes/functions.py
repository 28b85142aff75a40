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
from openhtc.api.routes.live import MAX_WAIT, _closing, _wait, admit
from openhtc.auth.permissions import require_user
from openhtc.auth.tokens import Principal
from openhtc.domain.errors import ValidationFailed
from openhtc.services.functions import cancel_functions, function_target, results_page, submit_functions
from openhtc.services.notify import NOTHING_ENDED, task_key
from openhtc.services.service_set import ServiceSet
from openhtc.services.submission import target

router = APIRouter()
FUNCTIONS = "/openhtc/v1/projects/{project_id}/tasks/{task_id}/functions"
MAX_LIMIT = 10_000
# A waiting reader looks again at once: reports wake it at most once per executor turn. Keep it
# 0: a claim's NOTHING_ENDED (services/notify.py) is trusted only when the read follows the wake-up.
RESULTS_GAP = 0.0


@router.post(FUNCTIONS)
def submit(
    project_id: str,
    task_id: str,
    body: Any = Body(None),
    who: Principal = Depends(principal),
    svc: ServiceSet = Depends(services),
) -> JSONResponse:
    project, task, capacity = target(svc, who, project_id, task_id)  # read together
    require_user(who, "submit functions")
    return JSONResponse(submit_functions(svc, who, project, task, body, capacity), status_code=201)


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
    last: list[dict[str, Any]] = []  # the page read last

    def check() -> tuple[bool, dict[str, Any]]:
        body, count = results_page(svc, task_id, batch_id, start, limit, known)
        last[:] = [body]
        return count > 0 or start >= body["total"], body

    def first_read() -> tuple[int, tuple[bool, dict[str, Any]]]:
        """The scope checks and the first page, in one trip to the thread pool."""
        known[:] = [function_target(svc, who, project_id, task_id, batch_id)]
        return svc.notify.published(), check()

    seen, (done, body) = await run_in_threadpool(first_read)
    if done or wait <= 0:
        return JSONResponse(body)
    admit(svc)
    key = task_key(task_id)
    async with svc.notify.subscribe((key,)) as sub:

        def told() -> tuple[bool, dict[str, Any]] | None:
            """Woken by claims only (they end no call): the page read last still holds."""
            return (False, last[0]) if sub.facts.pop(key, None) == NOTHING_ENDED and last else None

        # Nothing published since the read began: it still holds, and what changes from now on
        # wakes the subscription (a writer publishes after its commit). Else read again.
        first = (done, body) if svc.notify.published() == seen else None
        if first is None:  # that read may have missed a change: told() waits for one made now
            last.clear()
        return JSONResponse(await _wait(request, sub, wait, check, RESULTS_GAP, _closing(svc), first, told))


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
