"""The FastAPI application: every route under /api/v1 and /, one error mapping.

The routes are registered once, at the root; a request for ``/api/v1/…`` is routed with that
prefix as its ``root_path`` (its URL, pagination links included, keeps the prefix). Registering
the routes twice would double the list each request is matched against. The agent protocol's
routes come first (a fleet's exchanges: matching one past every other router cost ~0.2 ms of
CPU, more than the rest of an idle exchange), then the job and task routes, which clients poll.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

from openhtc import __version__
from openhtc.api import errors
from openhtc.api.guard import RequestGuard
from openhtc.api.responses import JSONResponse
from openhtc.api.routes import (
    agents,
    alloc,
    auth,
    explain,
    functions,
    jobs,
    live,
    overview,
    projects,
    registry,
    run,
    storage,
    system,
    tasks,
    workspace,
)
from openhtc.metrics.http import HttpMetrics
from openhtc.services.service_set import ServiceSet

API_PREFIX = "/api/v1"


def create_app(services: ServiceSet, extensions: Sequence[Callable[[FastAPI], None]] = ()) -> FastAPI:
    """The API; ``extensions`` add routes of their own (the composition root passes the dashboard's,
    ``openhtc.ui.install``: the dashboard builds on the API, so the API does not import it)."""
    app = FastAPI(
        title="openhtc",
        version=__version__,
        description="Self-hosted High Throughput Computing, wire-compatible with the Rescale HTC API.",
        default_response_class=JSONResponse,
        openapi_url="/openapi.json",
        docs_url="/docs",
        redoc_url=None,
        servers=[{"url": API_PREFIX}],  # as Rescale's own OpenAPI file names its base URL
    )
    app.state.services = services
    errors.install(app)
    # A request's route is found by trying each route in turn (~1 µs each with FastAPI's
    # included routers, ~80 in all): what is called most first — the agent protocol, function
    # calls, the pushed waits, jobs (their paths are their own: the order is free)
    hot = (agents, functions, live, jobs)
    for module in (*hot, tasks, projects, storage, registry, auth, workspace, system):
        app.include_router(module.router)
    for module in (explain, overview, alloc, run):  # more openhtc extensions (docs/extensions.md)
        app.include_router(module.router)
    for extend in extensions:
        extend(app)
    app.add_middleware(RequestGuard, limits=services.limits)
    app.add_middleware(HttpMetrics, metrics=services.metrics)  # inside ApiPrefix: see HttpMetrics
    app.add_middleware(ApiPrefix)
    return app


class ApiPrefix:
    """Routes ``/api/v1/…`` as ``/…``: the prefix becomes part of the request's root path."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(API_PREFIX + "/"):
            scope = {**scope, "root_path": scope.get("root_path", "") + API_PREFIX}
        await self.app(scope, receive, send)
