"""openhtc extension: submit one job and wait for its end, in one request (docs/extensions.md).

A client that runs one job at a time and waits for each (W5) would send two requests, the submit
and the job's pushed wait; this route takes the submit's body (one job) and answers the job
once it has ended, as ``GET …/jobs/{id}`` would, or at the timeout with its state then. The
job's key is subscribed to before it is first read, so an end committed at any moment after
the submit is seen. The Rescale routes are untouched.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Body, Depends, Request
from starlette.concurrency import run_in_threadpool

from openhtc.api import serializers as ser
from openhtc.api.deps import job_for, principal, services
from openhtc.api.pagination import first
from openhtc.api.responses import JSONResponse
from openhtc.api.routes.live import TASK, _timeout, busy, wait_for_job
from openhtc.auth.tokens import Principal
from openhtc.domain.enums import JobStatus
from openhtc.services.notify import job_key
from openhtc.services.service_set import ServiceSet
from openhtc.services.submission import submit_one_to

router = APIRouter()


@router.post(TASK + "/jobs/run")
async def run_job(
    project_id: str,
    task_id: str,
    request: Request,
    body: Any = Body(None),
    who: Principal = Depends(principal),
    svc: ServiceSet = Depends(services),
) -> JSONResponse:
    """Submit one job (the body of ``POST …/jobs/batch`` with one request of ``batchSize``
    1; ``group`` as there) and answer it once it has ended, or after ``timeout`` seconds."""
    timeout = _timeout(request)
    # Past max_live_subscriptions open waits the job is still submitted, and answered at once as
    # it is (the client waits for it by polling): a 503 could not tell the client whether it
    # was stored, and a client that submitted again would run the job twice.
    if busy(svc):
        timeout = 0
    echo, row_id = await run_in_threadpool(
        submit_one_to, svc, who, project_id, task_id, body, first(request, "group")
    )
    job_id = f"{echo['parentJobId']}:0"
    async with svc.notify.subscribe((job_key(row_id),)) as sub:
        # read after subscribing: whatever ends it from now on wakes the subscription
        job, batch = await run_in_threadpool(job_for, svc, task_id, job_id)
        if JobStatus(job.status).terminal or timeout == 0:
            return JSONResponse(ser.job(job, batch))
        return JSONResponse(await wait_for_job(request, svc, sub, task_id, job_id, job, batch, timeout, True))
