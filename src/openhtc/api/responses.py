"""Fast JSON responses (orjson) with the media type strict clients expect."""

from __future__ import annotations

import re
from typing import Any

import orjson
from starlette.responses import Response

_SURROGATE = re.compile("[\ud800-\udfff]")


class JSONResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        try:
            return orjson.dumps(content)
        except TypeError:
            # Text no UTF-8 encoder accepts (a lone surrogate stored before the API refused it)
            # reads as U+FFFD rather than failing every list holding it.
            return orjson.dumps(_valid_text(content))


def _valid_text(value: Any) -> Any:
    if isinstance(value, str):
        return _SURROGATE.sub("\ufffd", value)
    if isinstance(value, list | tuple):
        return [_valid_text(v) for v in value]
    if isinstance(value, dict):
        return {_valid_text(k): _valid_text(v) for k, v in value.items()}
    return value
