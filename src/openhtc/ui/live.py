"""The dashboard's live log: a job page follows its log through Server-Sent Events.

The same stream as ``/openhtc/v1/…/jobs/{id}/logs/stream`` (api/routes/live.py), signed in with
the dashboard's session cookie (a browser's EventSource sends no Authorization header). The job
page's script (static/logstream.js) falls back to the polled ``…/log`` fragment where a browser
has no EventSource.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from openhtc.api.deps import app_services, job_for, task_for
from openhtc.api.routes.live import EventStream, admit, follow_log, log_start
from openhtc.ui import session
from openhtc.ui.routes import LOG_LINES, TASK, UI_PREFIX, UiRoute


def create_live_router() -> APIRouter:
    router = APIRouter(prefix=UI_PREFIX, route_class=UiRoute, include_in_schema=False)

    @router.get(TASK + "/jobs/{job_id}/log/stream")
    async def job_log_stream(project_id: str, task_id: str, job_id: str, request: Request) -> Response:
        """The job's log lines as they are written (``line`` events), then ``end``: from the
        last LOG_LINES lines written so far, or after ``Last-Event-ID`` (a reconnect)."""
        svc = app_services(request)
        who = session.viewer(svc, request)
        await run_in_threadpool(task_for, svc, who, project_id, task_id)
        job, batch = await run_in_threadpool(job_for, svc, task_id, job_id)
        start, skip = await log_start(svc, request, task_id, job, batch, LOG_LINES)
        admit(svc)
        events = follow_log(svc, task_id, job_id, job.id, batch.parent_job_id, job.idx, start, skip)
        return EventStream(events)

    return router
