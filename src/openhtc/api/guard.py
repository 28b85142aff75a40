"""The edge of every request: what no route should ever see, refused once, before any route runs.

- A JSON body over ``request_bytes`` answers 413 (checked while it streams in, never buffered past
  the limit). Storage object uploads stream to the backend and are not JSON: they pass through.
- Any string of a JSON body (values and keys) holding a lone UTF-16 surrogate (``"\\ud800"``,
  which no UTF-8 encoder accepts) or NUL, or longer than ``string_chars``, answers 400 naming
  the field. A body without ``\\u`` escapes, without the bytes of a UTF-8-encoded surrogate and
  shorter than ``string_chars`` cannot hold either, so most bodies are not parsed here; the
  others are checked by orjson in C, and walked in Python (to name the field) only when bad.
- NUL in the path or a query parameter answers 400 (PostgreSQL cannot store it; nothing uses it).
"""

from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import parse_qsl

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from openhtc.api.errors import response_for
from openhtc.domain.errors import OpenHTCError, TooLarge, ValidationFailed
from openhtc.domain.limits import Limits

_SURROGATE = re.compile("[\ud800-\udfff]")
_STREAMED = ("/htc/storage/objects/", "/htc/storage/upload/")  # raw object bodies, any size


class RequestGuard:
    def __init__(self, app: ASGIApp, limits: Limits) -> None:
        self.app = app
        self.limits = limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        streamed = any(p in scope["path"] for p in _STREAMED)  # their keys are checked as keys
        try:
            check_target("" if streamed else scope["path"], scope.get("query_string", b""))
            if scope["method"] in ("POST", "PUT", "PATCH") and not streamed:
                body = await self._read(scope, receive)
                if _is_json(scope):
                    check_json_body(body, self.limits)
                receive = _replay(body, receive)
        except OpenHTCError as exc:
            await response_for(exc)(scope, receive, send)
            return
        await self.app(scope, receive, send)

    async def _read(self, scope: Scope, receive: Receive) -> bytes:
        limit = self.limits.request_bytes
        too_large = TooLarge(f"the request body is larger than the limit (request_bytes) of {limit} bytes")
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                raise too_large
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)


def _is_json(scope: Scope) -> bool:
    for name, value in scope.get("headers", ()):
        if name == b"content-type":
            kind = value.split(b";", 1)[0].strip().lower()
            return kind == b"application/json" or kind.endswith(b"+json")
    return True  # FastAPI parses a body without a content type as JSON


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # waits for the disconnect, as the server's own receive does

    return replay


def check_target(path: str, query_string: bytes) -> None:
    if "\x00" in path:
        raise ValidationFailed("must not contain NUL characters", field="path")
    if b"%00" in query_string.lower() or b"\x00" in query_string:
        for name, value in parse_qsl(query_string.decode("latin-1"), keep_blank_values=True):
            if "\x00" in name or "\x00" in value:
                raise ValidationFailed("must not contain NUL characters", field=name.replace("\x00", "?"))


def check_json_body(body: bytes, limits: Limits) -> None:
    """400 naming the first string that holds a lone surrogate or NUL, or is over its limit."""
    if b"\\u" not in body and b"\xed" not in body and len(body) <= limits.string_chars:
        return
    try:
        document = json.loads(body)
    except RecursionError:
        raise ValidationFailed("is nested too deeply", field="body") from None
    except ValueError:
        return  # not JSON: the route answers 400 for it
    if _clean(document, body, limits.string_chars):
        return
    try:  # something is wrong: find it, with its field path (slower)
        _walk(document, "", limits.string_chars)
    except RecursionError:
        raise ValidationFailed("is nested too deeply", field="body") from None


def _clean(document: Any, body: bytes, max_chars: int) -> bool:
    """True when no string is bad, cheaply: orjson (in C) refuses lone surrogates; NUL can only
    arrive as ``\\u0000``; only a body over ``max_chars`` can hold a string over it."""
    try:
        orjson.dumps(document)
    except TypeError:  # a surrogate (or an integer beyond 64 bits): look closer
        return False
    if b"\\u0000" not in body and len(body) <= max_chars:
        return True
    stack = [document]
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            if len(value) > max_chars or "\x00" in value:
                return False
        elif isinstance(value, list):
            stack.extend(value)
        elif isinstance(value, dict):
            stack.extend(value.values())
            stack.extend(value.keys())
    return True


def _walk(value: Any, path: str, max_chars: int) -> None:
    if isinstance(value, str):
        _check_string(value, path or "body", max_chars)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _walk(item, f"{path}[{i}]", max_chars)
    elif isinstance(value, dict):
        for key, item in value.items():
            where = f"{path}.{key}" if path else key
            _check_string(key, f"{where} (the key)", max_chars)
            _walk(item, where, max_chars)


def _check_string(value: str, field: str, max_chars: int) -> None:
    field = _printable(field)
    if _SURROGATE.search(value):
        raise ValidationFailed("contains a lone UTF-16 surrogate, which is not valid Unicode", field=field)
    if "\x00" in value:
        raise ValidationFailed("must not contain NUL characters", field=field)
    if len(value) > max_chars:
        raise ValidationFailed(
            f"is {len(value)} characters long; the limit (string_chars) is {max_chars}", field=field
        )


def _printable(field: str) -> str:
    """A field path fit for the error body itself: surrogates and NUL escaped, bounded."""
    clean = _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", field).replace("\x00", "\\u0000")
    return clean if len(clean) <= 200 else clean[:200] + "…"
