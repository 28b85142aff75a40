"""HTTP request latency by route template: an ASGI middleware.

The label is the template of the route that answered (``/htc/projects/{project_id}``), never the
raw path, so no id reaches a label; a request no route matched is ``unmatched``. The time runs
from the request's arrival to its response's first byte: a streamed response (a log followed
live, a file download) counts until it starts, not for as long as it streams.
"""

from __future__ import annotations

import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from openhtc.metrics import Metrics

UNMATCHED = "unmatched"


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
        status = [0]

        async def timed_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                method = scope["method"]
                route = route_template(scope, root)
                self.metrics.http_latency.labels(method, route).observe(time.perf_counter() - start)
                self.metrics.http_requests.labels(method, route, str(status[0])).inc()
            await send(message)

        await self.app(scope, receive, timed_send)


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
