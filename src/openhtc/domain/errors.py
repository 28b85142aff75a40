"""One error root for openhtc.

    OpenHTCError
    ├── ValidationFailed      bad input; names the offending field        -> 400
    ├── Unauthenticated       missing, forged or expired credentials      -> 401
    ├── PermissionDenied      authenticated but not allowed               -> 403
    ├── NotFound              absent, or belongs to another tenant        -> 404
    │   └── ImageUnavailable  the image does not exist (Rescale's error name)
    ├── Conflict              the request clashes with the object's state -> 400
    ├── Unavailable           the database cannot be reached right now     -> 503
    ├── InsufficientStorage   a disk (or the database's) is full          -> 507
    ├── TooLarge              a request body over its limit               -> 413
    └── InvalidTransition     a job state change the table does not allow (internal)

Only ``openhtc.api.errors`` knows how these map to HTTP.
"""

from __future__ import annotations


class OpenHTCError(Exception):
    """An openhtc operation failed."""

    error = "OPENHTC_ERROR"

    def __init__(self, message: str | None = None) -> None:
        self.message = message or (self.__doc__ or "").strip()
        super().__init__(self.message)


class ValidationFailed(OpenHTCError):
    """The request is invalid."""

    error = "VALIDATION_ERROR"

    def __init__(self, message: str, field: str | None = None) -> None:
        self.field = field
        super().__init__(f"{field}: {message}" if field else message)


class Unauthenticated(OpenHTCError):
    """Missing, invalid or expired credentials."""

    error = "UNAUTHORIZED"


class PermissionDenied(OpenHTCError):
    """You are not allowed to do this."""

    error = "FORBIDDEN"


class NotFound(OpenHTCError):
    """Not found."""

    error = "NOT_FOUND"


class ImageUnavailable(NotFound):
    """The image is unavailable."""

    error = "IMAGE_UNAVAILABLE"


class TooLarge(OpenHTCError):
    """The request is too large."""

    error = "PAYLOAD_TOO_LARGE"


class Conflict(OpenHTCError):
    """The request conflicts with the current state."""

    error = "CONFLICT"


class Unavailable(OpenHTCError):
    """The service is temporarily unavailable: the database cannot be reached. Try again later."""

    error = "SERVICE_UNAVAILABLE"


class InsufficientStorage(OpenHTCError):
    """The server's disk is full; nothing was changed. Try again once space is freed."""

    error = "INSUFFICIENT_STORAGE"


class InvalidTransition(OpenHTCError):
    """A job state change that the transition table does not allow."""

    error = "INVALID_TRANSITION"
