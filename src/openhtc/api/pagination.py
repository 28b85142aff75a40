"""`{items, next}` pages: opaque keyset cursors and an absolute `next` URL.

`next` keeps the request's scheme and host (honouring X-Forwarded-Proto/Host) and is omitted
on the last page, because the rescalehtc client crashes on null and loops if it keeps coming.
A duplicated query parameter takes its first value (the client re-sends pageSize).
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Sequence
from typing import Any, Literal
from urllib.parse import urlencode

from fastapi import Request

from openhtc.domain.errors import ValidationFailed

CursorKind = Literal["int", "pair", "str", "position"]
ID_MAX = 2**63 - 1  # the largest BIGINT: larger ids in paths and cursors are refused, not overflowed
TIME_MAX = 2**53  # a pair cursor's timestamp: exact as a float, and no driver overflows on it


def first(request: Request, name: str) -> str | None:
    values = request.query_params.getlist(name)
    return values[0] if values else None


def page_size(request: Request, default: int = 100, maximum: int = 1000) -> int:
    raw = first(request, "pageSize")
    if raw is None or raw == "":
        return default
    try:
        size = int(raw)
    except ValueError:
        raise ValidationFailed(f"'{raw}' is not an integer", field="pageSize") from None
    if size < 1 or size > maximum:
        raise ValidationFailed(f"must be between 1 and {maximum}", field="pageSize")
    return size


def encode_cursor(value: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(value, separators=(",", ":")).encode()).decode().rstrip("=")


def decode_cursor(request: Request, kind: CursorKind = "int") -> Any:
    """The cursor of ``pageIndex``, or None; 400 unless it has the shape this list issues:
    ``int`` (a row id or offset), ``pair`` ([createdAt, id]), ``str`` (a group name) or
    ``position`` ([attempt, byte offset] in a job's logs)."""
    raw = first(request, "pageIndex")
    if not raw:
        return None
    try:
        value = json.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
    except (ValueError, UnicodeDecodeError, RecursionError):
        value = _FORGED
    if not _SHAPES[kind](value):
        raise ValidationFailed("not a page index this server issued", field="pageIndex")
    return value


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= ID_MAX


def _is_pair(value: Any) -> bool:
    return (
        isinstance(value, list)
        and len(value) == 2
        and isinstance(value[0], (int, float))
        and not isinstance(value[0], bool)
        and math.isfinite(value[0])
        and abs(value[0]) <= TIME_MAX
        and _is_name(value[1])
    )


def _is_name(value: Any) -> bool:
    if not isinstance(value, str) or len(value) > 500 or "\x00" in value:
        return False
    try:
        value.encode("utf-8")  # no lone surrogates
    except UnicodeEncodeError:
        return False
    return True


def _is_position(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and all(_is_id(v) for v in value)


_FORGED = object()
_SHAPES = {"int": _is_id, "pair": _is_pair, "str": _is_name, "position": _is_position}


def next_url(request: Request, cursor: Any) -> str:
    proto = request.headers.get("x-forwarded-proto") or request.url.scheme
    host = request.headers.get("x-forwarded-host") or request.headers.get("host") or request.url.netloc
    params: list[tuple[str, str]] = []
    seen: set[str] = set()
    for key, value in request.query_params.multi_items():
        if key == "pageIndex":
            continue
        if key == "pageSize":
            if key in seen:
                continue
            seen.add(key)
        params.append((key, value))
    params.append(("pageIndex", encode_cursor(cursor)))
    return f"{proto}://{host}{request.url.path}?{urlencode(params)}"


def page(request: Request, items: Sequence[Any], size: int, cursor_of: Any) -> dict[str, Any]:
    """Build the envelope from ``size + 1`` fetched rows: the extra row proves a next page exists."""
    body: dict[str, Any] = {"items": list(items[:size])}
    if len(items) > size:
        body["next"] = next_url(request, cursor_of(items[size - 1]))
    return body
