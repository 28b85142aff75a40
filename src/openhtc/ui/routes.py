"""The dashboard's pages. Every page reuses the API's lookups and scope checks (api.deps,
auth.permissions) and the stores' keyset reads, so a user sees exactly what the API shows them.

A page asked for by htmx (``HX-Request``) renders only its live part, for polling.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Request
from fastapi.routing import APIRoute
from jinja2 import Environment, PackageLoader, select_autoescape
from starlette.concurrency import run_in_threadpool
from starlette.responses import HTMLResponse, RedirectResponse, Response

from openhtc import __version__
from openhtc.api import serializers as ser
from openhtc.api.deps import app_services, job_for, project_for, task_for
from openhtc.api.errors import status_of
from openhtc.api.pagination import decode_cursor, encode_cursor, first
from openhtc.api.routes import tasks as task_routes
from openhtc.api.routes.auth import principal_for_api_key
from openhtc.auth.permissions import require_user
from openhtc.auth.tokens import Principal
from openhtc.domain.clock import iso
from openhtc.domain.enums import STATUS_NAMES, FailureCode, JobStatus
from openhtc.domain.errors import NotFound, OpenHTCError, Unauthenticated, ValidationFailed
from openhtc.services import overview
from openhtc.services.explain import explain_job
from openhtc.services.service_set import ServiceSet
from openhtc.services.tasks import cancel_jobs
from openhtc.ui import charts, session, storage_pages
from openhtc.ui.livecache import LiveCache

UI_PREFIX = "/ui"
TASK = "/projects/{project_id}/tasks/{task_id}"
PAGE = 50  # rows per page of projects, tasks, groups and jobs
LOG_LINES = 500  # log lines per poll
# Pages are never cached, framed (no clickjacking of the confirmation forms) or given scripts
# from elsewhere; the status bars' widths are inline styles.
HEADERS = {
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": (
        "default-src 'self'; style-src 'self' 'unsafe-inline'; frame-ancestors 'none'; form-action 'self'"
    ),
}
LIVE = {p: f"live_{p}" for p in ("overview.html", "project.html", "task.html", "executors.html")}
FAILURE_CODES = tuple(c.value for c in FailureCode)
ACTIONS = {"archive": "Archive", "unarchive": "Unarchive", "delete": "Delete", "cancel": "Cancel"}


def _render_error(request: Request, exc: OpenHTCError) -> Response:
    status = status_of(exc)
    if status == 401:
        target = f"{UI_PREFIX}/login?" + urlencode({"next": request.url.path})
        if request.headers.get("hx-request"):  # a poll whose session ended: reload into sign-in
            return Response(status_code=204, headers={"HX-Redirect": target})
        return RedirectResponse(target, status_code=303)
    env: Environment = request.app.state.ui_templates
    body = env.get_template("error.html").render(status=status, message=exc.message)
    return HTMLResponse(body, status_code=status, headers=HEADERS)


class UiRoute(APIRoute):
    """Errors become HTML pages (and a missing session a redirect to sign-in), not JSON."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except OpenHTCError as exc:
                return _render_error(request, exc)

        return handle


def _status_filter(request: Request) -> str | None:
    value = first(request, "status") or None
    if value is not None and value not in STATUS_NAMES:
        raise ValidationFailed(f"status must be one of {', '.join(STATUS_NAMES)}", field="status")
    return value


def _failure_filter(request: Request) -> str | None:
    value = first(request, "failureCode") or None
    if value is not None and value not in FAILURE_CODES:
        raise ValidationFailed(f"failureCode must be one of {', '.join(FAILURE_CODES)}", field="failureCode")
    return value


def _log_cursor(raw: str | None, attempts: int) -> tuple[int, int] | None:
    """The log poll's cursor, ``attempt.offset`` (the position the logs route's cursor holds)."""
    if not raw:
        return None
    attempt, _, offset = raw.partition(".")
    if not (attempt.isascii() and attempt.isdigit() and offset.isascii() and offset.isdigit()):
        raise ValidationFailed("not a log position", field="after")
    if len(attempt) > 9 or len(offset) > 18 or not 1 <= int(attempt) <= attempts:  # int() of no huge string
        raise ValidationFailed("not a log position", field="after")
    return int(attempt), int(offset)


def templates() -> Environment:
    env = Environment(
        loader=PackageLoader("openhtc.ui", "templates"),
        autoescape=select_autoescape(default=True),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.globals.update(
        prefix=UI_PREFIX,
        version=__version__,
        iso=iso,
        statuses=STATUS_NAMES,
        status_bar=charts.status_bar,
        status_counts=charts.status_counts,
    )
    return env


def create_router() -> APIRouter:
    router = APIRouter(prefix=UI_PREFIX, route_class=UiRoute, include_in_schema=False)

    def render(request: Request, name: str, code: int = 200, **ctx: Any) -> HTMLResponse:
        env: Environment = request.app.state.ui_templates
        token = request.cookies.get(session.SESSION_COOKIE, "")
        svc = app_services(request)
        ctx.setdefault("csrf", session.csrf_token(svc, token) if token else "")
        query = request.url.query
        self_url = request.url.path + (f"?{query}" if query else "")
        live = bool(request.headers.get("hx-request")) and name in LIVE and code == 200
        if live:
            name = LIVE[name]  # a poll: only the page's live part (no forms, so no CSRF token)
        body = env.get_template(name).render(self_url=self_url, **ctx)
        if live and "who" in ctx and not ctx["who"].is_job:
            request.app.state.ui_live_cache.put(LiveCache.key(ctx["who"], self_url), body)
        return HTMLResponse(body, status_code=code, headers=HEADERS)

    def cached(request: Request, who: Principal) -> Response | None:
        """A poll's fragment rendered for the same audience within the last second. Call it only
        after the page's own scope checks; a job token (scoped to one task, which the key does
        not hold) is never answered from the cache nor fills it."""
        if who.is_job or not request.headers.get("hx-request"):
            return None
        query = request.url.query
        body = request.app.state.ui_live_cache.get(
            LiveCache.key(who, request.url.path + (f"?{query}" if query else ""))
        )
        return HTMLResponse(body, headers=HEADERS) if body is not None else None

    storage_pages.add_routes(router, render)

    @router.get("", include_in_schema=False)
    async def root() -> Response:
        return RedirectResponse(f"{UI_PREFIX}/", status_code=307)

    # -- sign-in ----------------------------------------------------------------------------

    @router.get("/login")
    async def login_page(request: Request) -> Response:
        token = session.new_login_csrf()
        response = render(request, "login.html", csrf=token, next=_safe_next(first(request, "next")))
        session.set_cookie(response, request, session.LOGIN_CSRF_COOKIE, token, 3600, f"{UI_PREFIX}/login")
        return response

    @router.post("/login")
    async def login(request: Request) -> Response:
        svc = app_services(request)
        fields = await session.form(request)
        session.check_login_csrf(request, fields)
        try:
            who = principal_for_api_key(svc, fields.get("api_key", "").strip())
        except Unauthenticated:
            token = session.new_login_csrf()
            response = render(
                request, "login.html", 401, csrf=token, next=_safe_next(fields.get("next")),
                error="Unknown or revoked API key.",
            )  # fmt: skip
            session.set_cookie(
                response, request, session.LOGIN_CSRF_COOKIE, token, 3600, f"{UI_PREFIX}/login"
            )
            return response
        bearer, ttl = svc.tokens.bearer(who)
        signed_in = RedirectResponse(_safe_next(fields.get("next")), status_code=303)
        session.set_cookie(signed_in, request, session.SESSION_COOKIE, bearer, ttl, UI_PREFIX)
        signed_in.delete_cookie(session.LOGIN_CSRF_COOKIE, path=f"{UI_PREFIX}/login")
        return signed_in

    @router.post("/logout")
    async def logout(request: Request) -> Response:
        svc = app_services(request)
        session.check_csrf(svc, request, await session.form(request))
        response = RedirectResponse(f"{UI_PREFIX}/login", status_code=303)
        response.delete_cookie(session.SESSION_COOKIE, path=UI_PREFIX)
        return response

    # -- overview and projects ----------------------------------------------------------------

    @router.get("/")
    def overview_page(request: Request) -> Response:
        svc = app_services(request)
        who = session.viewer(svc, request)
        require_user(who, "read the overview")  # it names every project: not for a job token
        if (hit := cached(request, who)) is not None:
            return hit
        view = overview.snapshot(svc, who, PAGE)
        return render(
            request,
            "overview.html",
            who=who,
            view=view,
            chart=charts.per_minute(view.hour.succeeded, view.hour.failed),
        )

    @router.get("/executors")
    def executors_page(request: Request) -> Response:
        svc = app_services(request)
        who = session.viewer(svc, request)
        require_user(who, "list executors")
        if (hit := cached(request, who)) is not None:
            return hit
        admin = overview.is_admin(who)
        return render(
            request,
            "executors.html",
            who=who,
            admin=admin,
            executors=overview.executor_views(svc, admin),
            leader=svc.leadership.is_leader,
        )

    @router.get("/projects/{project_id}")
    def project_page(project_id: str, request: Request) -> Response:
        svc = app_services(request)
        who = session.viewer(svc, request)
        project = project_for(svc, who, project_id)
        if (hit := cached(request, who)) is not None:
            return hit
        cursor = decode_cursor(request, "pair")
        if who.is_job:  # a job token lists only its own task, as in the API's list of tasks
            own = svc.projects.task(project_id, who.task_id or "")
            rows = [own] if own is not None and cursor is None else []
        else:
            rows = svc.projects.tasks(project_id, tuple(cursor) if cursor else None, PAGE + 1)
        with svc.db.read() as conn:
            tasks = [(t, svc.jobs.totals(conn, t.id)) for t in rows[:PAGE]]
        more = encode_cursor([rows[PAGE - 1].created_at, rows[PAGE - 1].id]) if len(rows) > PAGE else None
        return render(
            request,
            "project.html",
            who=who,
            project=project,
            tasks=tasks,
            limit=overview.project_limit(svc, project_id),
            next_page=more,
        )

    # -- tasks ----------------------------------------------------------------------------------

    @router.get(TASK)
    def task_page(project_id: str, task_id: str, request: Request) -> Response:
        svc = app_services(request)
        who = session.viewer(svc, request)
        project, task = task_for(svc, who, project_id, task_id)
        if (hit := cached(request, who)) is not None:
            return hit
        after = decode_cursor(request, "str")
        with svc.db.read() as conn:
            totals = svc.jobs.totals(conn, task_id)
            names = svc.jobs.groups(conn, task_id, after, PAGE + 1)
            counts = svc.jobs.summary(conn, task_id, names[:PAGE])
        groups = [(g, counts.get(g, {})) for g in names[:PAGE]]
        return render(
            request,
            "task.html",
            who=who,
            project=project,
            task=task,
            totals=totals,
            groups=groups,
            next_page=encode_cursor(names[PAGE - 1]) if len(names) > PAGE else None,
        )

    @router.get(TASK + "/confirm/{action}")
    def confirm_page(project_id: str, task_id: str, action: str, request: Request) -> Response:
        svc = app_services(request)
        who = session.viewer(svc, request)
        project, task = task_for(svc, who, project_id, task_id)
        if action not in ACTIONS:
            raise NotFound(f"no action {action}")
        return render(
            request,
            "confirm.html",
            who=who,
            project=project,
            task=task,
            action=action,
            label=ACTIONS[action],
            group=first(request, "group") or None,
        )

    @router.post(TASK + "/{action}")
    async def task_action(project_id: str, task_id: str, action: str, request: Request) -> Response:
        svc = app_services(request)
        who = session.viewer(svc, request)
        fields = await session.form(request)
        session.check_csrf(svc, request, fields)
        if action not in ACTIONS:
            raise NotFound(f"no action {action}")
        # Through the API's own routes and rules (a threadpool hop: they query the store).
        await run_in_threadpool(_act, svc, who, project_id, task_id, action, fields.get("group") or None)
        target = f"{UI_PREFIX}/projects/{project_id}"
        if action != "delete":
            target += f"/tasks/{task_id}"
        return RedirectResponse(target, status_code=303)

    # -- jobs -----------------------------------------------------------------------------------

    @router.get(TASK + "/jobs")
    def jobs_page(project_id: str, task_id: str, request: Request) -> Response:
        svc = app_services(request)
        who = session.viewer(svc, request)
        project, task = task_for(svc, who, project_id, task_id)
        status = _status_filter(request)
        group = first(request, "group") or None
        failure = _failure_filter(request)
        after = int(decode_cursor(request, "int") or 0)
        with svc.db.read() as conn:
            rows = svc.jobs.list_jobs(
                conn,
                task_id,
                after_id=after,
                limit=PAGE + 1,
                group=group,
                status=JobStatus[status] if status else None,
                failure_code=failure,
            )
            batch_rows = svc.jobs.batches_by_id(conn, {r.batch_id for r in rows[:PAGE]})
        jobs = [ser.job(r, batch_rows[r.batch_id], simple=True) for r in rows[:PAGE]]
        query = {k: v for k, v in (("status", status), ("group", group), ("failureCode", failure)) if v}
        next_page = None
        if len(rows) > PAGE:
            next_page = urlencode({**query, "pageIndex": encode_cursor(rows[PAGE - 1].id)})
        return render(
            request,
            "jobs.html",
            who=who,
            project=project,
            task=task,
            jobs=jobs,
            status=status,
            group=group,
            failure=failure,
            failure_codes=FAILURE_CODES,
            next_page=next_page,
        )

    @router.get(TASK + "/jobs/{job_id}")
    def job_page(project_id: str, task_id: str, job_id: str, request: Request) -> Response:
        svc = app_services(request)
        who = session.viewer(svc, request)
        project, task = task_for(svc, who, project_id, task_id)
        job, batch = job_for(svc, task_id, job_id)
        with svc.db.read() as conn:
            events = [
                ser.event(e, job_id, job.idx) for e in svc.jobs.events(conn, job.id, job.batch_id, 0, 1000)
            ]
        attempts: dict[int, dict[str, Any]] = {}
        for event in events:
            if event["attempt"] and (event["instanceId"] or event["attempt"] in attempts):
                attempts[event["attempt"]] = event  # an attempt's last event, once an executor had it
        return render(
            request,
            "job.html",
            who=who,
            project=project,
            task=task,
            job=ser.job(job, batch),
            reasons=explain_job(svc, job) if JobStatus(job.status) < JobStatus.RUNNABLE else [],
            events=events,
            attempts=sorted(attempts.items()),
        )

    @router.get(TASK + "/jobs/{job_id}/log")
    def job_log(project_id: str, task_id: str, job_id: str, request: Request) -> Response:
        """New log lines from the cursor ``after`` on, and the element that polls for the next."""
        svc = app_services(request)
        who = session.viewer(svc, request)
        task_for(svc, who, project_id, task_id)
        job, batch = job_for(svc, task_id, job_id)
        start = _log_cursor(first(request, "after"), job.attempt)
        lines = svc.logs.page((task_id, batch.parent_job_id, job.idx), job.attempt, LOG_LINES, False, start)
        position = lines[-1].after if lines else start
        done = JobStatus(job.status).terminal and len(lines) < LOG_LINES
        return render(
            request,
            "log.html",
            lines=[(iso(line.timestamp), line.message) for line in lines],
            after=f"{position[0]}.{position[1]}" if position else "",
            follow=not done,
            url=f"{UI_PREFIX}/projects/{project_id}/tasks/{task_id}/jobs/{job_id}/log",
        )

    return router


def _act(svc: ServiceSet, who: Any, project_id: str, task_id: str, action: str, group: str | None) -> None:
    if action == "cancel":
        task_for(svc, who, project_id, task_id)
        require_user(who, "cancel jobs")
        cancel_jobs(svc, task_id, group, svc.clock.now())
    elif action == "delete":
        task_routes.delete_task(project_id, task_id, who, svc)
    else:
        target = "ARCHIVED" if action == "archive" else "ACTIVE"
        task_routes.patch_task(project_id, task_id, {"lifecycleStatus": target}, who, svc)


def _safe_next(value: str | None) -> str:
    """Only a path of the dashboard itself (no open redirect to another site)."""
    if value and value.startswith(UI_PREFIX + "/") and not value.startswith("//") and "\\" not in value:
        return value
    return f"{UI_PREFIX}/"
