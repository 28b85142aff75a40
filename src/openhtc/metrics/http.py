"""HTTP request latency by route template: an ASGI middleware.

The label is the template of the route that answered (``/htc/projects/{project_id}``), never the
raw path, so no id reaches a label; a request no route matched is ``unmatched``. The time runs
from the request's arrival to its response's first byte: a streamed response (a log followed
live, a file download) counts until it starts, not for as long as it streams. An exception
that escapes the app before any response started is counted as the 500 the server then sends
(Starlette's error middleware, outside this one, sends it). The method label is one of a fixed
set (``other`` for the rest), so no client can add label values.
"""

from __future__ import annotations

import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from openhtc.metrics import Metrics

UNMATCHED = "unmatched"
METHODS = frozenset(("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"))


class HttpMetrics:
    """Must sit inside any middleware that copies the scope (ApiPrefix): the router records the
    matched route in the scope it is given, and this reads it from the same dict."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        root = scope.get("root_path", "")
        started = False

        def record(status: int) -> None:
            method = scope["method"] if scope["method"] in METHODS else "other"
            route = route_template(scope, root)
            self.metrics.http_latency.labels(method, route).observe(time.perf_counter() - start)
            self.metrics.http_requests.labels(method, route, str(status)).inc()

        async def timed_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                record(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, timed_send)
        except Exception:
            if not started:  # the error middleware outside answers 500
                record(500)
            raise


def route_template(scope: Scope, root_path: str) -> str:
    """The matched route's path template; for a mount (static files) its path plus ``/{path}``."""
    route: Any = scope.get("route")
    path = getattr(route, "path", None)
    if isinstance(path, str):
        return path
    mounted = scope.get("root_path", "")
    if mounted != root_path and mounted.startswith(root_path):
        return mounted[len(root_path) :] + "/{path}"
    return UNMATCHED
