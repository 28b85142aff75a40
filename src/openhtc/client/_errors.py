"""Client errors.

Hierarchy::

    HtcError                  any failed call; .status_code, .response, .error_type, .message
    ├── BadRequest            400
    ├── Unauthorized          401
    ├── Forbidden             403
    ├── NotFound              404
    ├── MethodNotAllowed      405
    ├── ServerError           5xx
    ├── HtcConnectionError    the server could not be reached (no response; cause in __cause__)
    └── CredentialsError      no usable credentials were configured

Other 4xx codes raise a plain ``HtcError``.
"""

from __future__ import annotations

import json
from typing import Any

import httpx

__all__ = [
    "BadRequest",
    "CredentialsError",
    "Forbidden",
    "HtcConnectionError",
    "HtcError",
    "MethodNotAllowed",
    "NotFound",
    "ServerError",
    "Unauthorized",
    "error_from_response",
]


class HtcError(Exception):
    """A call to the HTC API failed."""

    def __init__(
        self,
        message: str | None = None,
        *,
        status_code: int | None = None,
        response: httpx.Response | None = None,
        error_type: str | None = None,
        description: str | None = None,
    ) -> None:
        self.message = message or (self.__doc__ or "").strip()
        self.status_code = status_code
        self.response = response
        self.error_type = error_type
        self.description = description
        super().__init__(self.message)

    def __str__(self) -> str:
        parts: list[str] = []
        if self.status_code is not None:
            parts.append(f"HTTP {self.status_code}")
        if self.error_type:
            parts.append(self.error_type)
        prefix = " ".join(parts)
        return f"{prefix}: {self.message}" if prefix else self.message


class BadRequest(HtcError):
    """The request was rejected as invalid."""


class Unauthorized(HtcError):
    """Missing, invalid or expired credentials."""


class Forbidden(HtcError):
    """The credentials do not allow this operation."""


class NotFound(HtcError):
    """The resource does not exist."""


class MethodNotAllowed(HtcError):
    """The operation is not allowed here."""


class ServerError(HtcError):
    """The server failed to handle the request."""


class HtcConnectionError(HtcError):
    """The server could not be reached."""


class CredentialsError(HtcError):
    """No credentials: pass an API key, set OPENHTC_API_KEY, or run `htc login`."""


_BY_STATUS: dict[int, type[HtcError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    405: MethodNotAllowed,
}


def _parse_body(response: httpx.Response) -> dict[str, Any]:
    try:
        body = json.loads(response.content) if response.content else None
    except (ValueError, UnicodeDecodeError):
        return {}
    return body if isinstance(body, dict) else {}


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def error_from_response(response: httpx.Response) -> HtcError:
    """Build the ``HtcError`` subclass for an error response.

    The body may be any of the shapes the reference uses: ``{error, errorDescription}``,
    ``{errorType, errorDescription, message}``, ``{error, message}``, or their superset.
    ``error_type`` is ``errorType`` or else ``error``; ``message`` is the first of ``message``,
    ``errorDescription``, the raw text and the reason phrase.
    """
    body = _parse_body(response)
    error_type = _str_or_none(body.get("errorType")) or _str_or_none(body.get("error"))
    description = _str_or_none(body.get("errorDescription"))
    message = _str_or_none(body.get("message")) or description
    if message is None:
        text = response.text.strip() if response.content and not body else ""
        message = text[:500] if text else (response.reason_phrase or "request failed")
    status = response.status_code
    cls = _BY_STATUS.get(status) or (ServerError if status >= 500 else HtcError)
    return cls(
        message,
        status_code=status,
        response=response,
        error_type=error_type,
        description=description,
    )
