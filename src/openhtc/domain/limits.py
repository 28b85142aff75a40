"""Request limits: generous bounds real workloads never meet, so one request cannot bloat the
store or accept what cannot run. Built from the settings by the composition root."""

from __future__ import annotations

from dataclasses import dataclass

from openhtc.domain.errors import ValidationFailed

# The kernel's limit on one argument or one NAME=value string of execve (MAX_ARG_STRLEN).
MAX_ARG_BYTES = 131072


@dataclass(frozen=True, slots=True)
class Limits:
    request_bytes: int = 64 * 1024 * 1024  # a JSON request body (413 beyond)
    string_chars: int = 1024 * 1024  # any one string of a JSON request body
    name_chars: int = 500  # names: projects, tasks, jobs, groups, images, env names
    description_chars: int = 65536  # project and task descriptions
    command_bytes: int = 1024 * 1024  # a job's commands and envs together, as execve gets them
    envs_per_job: int = 1000  # envs (and tags) of one job definition
    requests_per_call: int = 1000  # HTCJobSubmitRequest objects in one submit call


def check_name(value: str, field: str, limits: Limits) -> str:
    """A stored name: not longer than ``name_chars`` (and no NUL, refused at the edge already)."""
    if len(value) > limits.name_chars:
        raise ValidationFailed(
            f"is {len(value)} characters long; the limit (name_chars) is {limits.name_chars}", field=field
        )
    if "\x00" in value:
        raise ValidationFailed("must not contain NUL characters", field=field)
    return value


def check_description(value: str, field: str, limits: Limits) -> str:
    if len(value) > limits.description_chars:
        raise ValidationFailed(
            f"is {len(value)} characters long; the limit (description_chars) is {limits.description_chars}",
            field=field,
        )
    return value
