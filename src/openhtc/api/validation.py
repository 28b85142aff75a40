"""Small request-body checks shared by routes; each error names its field."""

from __future__ import annotations

from typing import Any

from openhtc.domain.errors import ValidationFailed


def require_object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise ValidationFailed("the body must be a JSON object", field="body")
    return body


def int_field(
    body: dict[str, Any], name: str, minimum: int, maximum: int, required: bool = True
) -> int | None:
    value = body.get(name)
    if value is None:
        if required:
            raise ValidationFailed("is required", field=name)
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationFailed("must be an integer", field=name)
    if not minimum <= value <= maximum:
        raise ValidationFailed(f"must be between {minimum} and {maximum}", field=name)
    return value


def str_field(
    body: dict[str, Any], name: str, required: bool = True, choices: tuple[str, ...] = ()
) -> str | None:
    value = body.get(name)
    if value is None:
        if required:
            raise ValidationFailed("is required", field=name)
        return None
    if not isinstance(value, str):
        raise ValidationFailed("must be a string", field=name)
    if choices and value not in choices:
        raise ValidationFailed(f"must be one of {', '.join(choices)}", field=name)
    return value


def retention_body(body: Any) -> tuple[int, int]:
    obj = require_object(body)
    archive_after = int_field(obj, "archiveAfter", 0, 2**31 - 1)
    delete_after = int_field(obj, "deleteAfter", 0, 2**31 - 1)
    assert archive_after is not None and delete_after is not None
    return archive_after, delete_after
