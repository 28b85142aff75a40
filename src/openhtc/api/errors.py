"""The only place that knows how openhtc errors become HTTP responses."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from openhtc.api.responses import JSONResponse
from openhtc.domain.errors import (
    Conflict,
    InsufficientStorage,
    NotFound,
    OpenHTCError,
    PermissionDenied,
    TooLarge,
    Unauthenticated,
    Unavailable,
    ValidationFailed,
)
from openhtc.store.db import failure

STATUS = {
    ValidationFailed: 400,
    Conflict: 400,
    Unauthenticated: 401,
    PermissionDenied: 403,
    NotFound: 404,
    TooLarge: 413,
    Unavailable: 503,
    InsufficientStorage: 507,
}
_TYPES = {
    400: "BAD_REQUEST",
    401: "UNAUTHORIZED",
    403: "FORBIDDEN",
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    413: "PAYLOAD_TOO_LARGE",
    500: "INTERNAL_SERVER_ERROR",
}


def error_body(status: int, message: str, error: str | None = None) -> dict[str, str]:
    """The superset of Rescale's error shapes: {error, errorType, errorDescription, message}."""
    kind = error or _TYPES.get(status, "ERROR")
    return {"error": kind, "errorType": kind, "errorDescription": message, "message": message}


def status_of(exc: OpenHTCError) -> int:
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500


def response_for(exc: OpenHTCError) -> JSONResponse:
    """The HTTP response of an openhtc error (also for middleware, outside the handlers)."""
    status = status_of(exc)
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    if status == 503:
        headers = {"Retry-After": "5"}
    return JSONResponse(error_body(status, exc.message, exc.error), status_code=status, headers=headers)


def install(app: FastAPI) -> None:
    @app.exception_handler(OpenHTCError)
    async def _openhtc(_request: Request, exc: OpenHTCError) -> JSONResponse:
        return response_for(exc)

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        """A full disk met outside the database layer (a log, an upload) is still a 507; any
        other failure is a 500 with the error body (Starlette then logs its traceback)."""
        known = failure(exc)
        if known is not None:
            return response_for(known)
        return JSONResponse(error_body(500, "internal server error"), status_code=500)

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        field = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path"))
        message = f"{field}: {first.get('msg')}" if field else str(first.get("msg"))
        return JSONResponse(error_body(400, message, "VALIDATION_ERROR"), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(exc.status_code, str(exc.detail)), status_code=exc.status_code)
