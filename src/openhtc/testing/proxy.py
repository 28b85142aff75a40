"""A loopback HTTP proxy for tests: forwards to a server, and lets a test lose or refuse answers.

``FaultyProxy(upstream)`` listens on 127.0.0.1; ``proxy.url`` is what an ``htc agent`` is
pointed at. ``proxy.hook`` sees each answer (request path, status, body) after the server made
it and says what the client gets: ``PASS`` (the answer), ``DROP`` (the connection closes with no
answer: the server did the work, the client never hears of it) or an HTTP status (that status,
as an error body, instead: e.g. 403). ``proxy.cut = 503`` (a status) answers every call with
it before it reaches the server; ``None`` forwards again.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx

PASS = "pass"
DROP = "drop"
Verdict = str | int
Hook = Callable[[str, int, bytes], Verdict]


class FaultyProxy:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.hook: Hook = lambda _path, _status, _body: PASS
        self.cut: int | None = None  # a status every call gets, without reaching the server
        self._client = httpx.Client(timeout=httpx.Timeout(300.0, connect=5.0))
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_args: object) -> None:
                pass

            def do_GET(self) -> None:
                proxy._forward(self, "GET")

            def do_POST(self) -> None:
                proxy._forward(self, "POST")

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="faulty-proxy", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._client.close()

    def _forward(self, handler: BaseHTTPRequestHandler, method: str) -> None:
        length = int(handler.headers.get("content-length") or 0)
        body = handler.rfile.read(length) if length else b""
        if self.cut is not None:
            self._answer(handler, self.cut, _error(self.cut))
            return
        headers = {k: v for k, v in handler.headers.items() if k.lower() not in ("host", "content-length")}
        try:
            resp = self._client.request(method, self.upstream + handler.path, content=body, headers=headers)
        except httpx.HTTPError:
            self._answer(handler, 502, _error(502))
            return
        verdict = self.hook(handler.path, resp.status_code, resp.content)
        if verdict == DROP:
            handler.close_connection = True  # no answer: the client sees the connection close
            return
        if isinstance(verdict, int):
            self._answer(handler, verdict, _error(verdict))
            return
        self._answer(handler, resp.status_code, resp.content, resp.headers.get("content-type"))

    @staticmethod
    def _answer(handler: BaseHTTPRequestHandler, status: int, body: bytes, kind: str | None = None) -> None:
        handler.send_response(status)
        handler.send_header("Content-Type", kind or "application/json")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)


def _error(status: int) -> bytes:
    return json.dumps(
        {"status": status, "error": "FAULTY_PROXY", "message": f"the test proxy answers {status}"}
    ).encode()
