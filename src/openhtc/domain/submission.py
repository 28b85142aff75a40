"""Validation of job submissions (HTCJobSubmitRequest), following the reference spec.

Unknown fields are ignored, as Rescale's server does. Every error names its field. Integers are
strict (``"10"`` and ``true`` are not 10 and 1), and what a job could never run with is refused
here rather than failing at start: env names with ``=`` or NUL, commands over execve's limits.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator

from openhtc.domain.enums import RESCALE_REGIONS, Architecture, Priority
from openhtc.domain.errors import ValidationFailed
from openhtc.domain.limits import MAX_ARG_BYTES, Limits, check_name

IMAGE_NAME_RE = re.compile(
    r"(?:[a-z0-9]+(?:[._-][a-z0-9]+)*/)*[a-z0-9]+(?:[._-][a-z0-9]+)*(:[_a-zA-Z0-9][-._a-zA-Z0-9]*)?"
)
# The spec's pattern plus the names its description reserves; every AWS_BATCH_ name too.
_RESERVED_ENV_RE = re.compile(
    r"AWS_BATCH_|^(RESCALE_PROJECT_ID|RESCALE_TASK_ID|RESCALE_JOB_ID|RESCALE_HTC_REGION|RESCALE_HTC_TASK_ID"
    r"|RESCALE_HTC_PROJECT_ID|RESCALE_HTC_BEARER_TOKEN|RESCALE_HTC_REFRESH_TOKEN|PROJECT_SHARED_FOLDER"
    r"|TASK_SHARED_FOLDER|AWS_SESSION_TOKEN|AWS_ACCESS_KEY_ID|AWS_SECRET_ACCESS_KEY)$|RDF_"
)
MAX_BATCH_SIZE = 1000
INT32_MAX = 2**31 - 1


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class NameValue(_Model):
    name: str = Field(min_length=1)
    value: str

    @field_validator("name")
    @classmethod
    def _env_name(cls, value: str) -> str:
        if "=" in value:
            raise ValueError("must not contain '=' (execve splits NAME=value at the first '=')")
        return value


class Tag(_Model):
    key: str
    value: str


class JobDefinition(_Model):
    imageName: str = Field(min_length=1)
    maxVCpus: StrictInt = Field(default=1, ge=1, le=64)
    maxMemory: StrictInt = Field(default=4000, ge=4, le=235520)
    maxDiskGiB: StrictInt = Field(default=10, ge=0, le=64000)
    maxSwap: StrictInt | None = Field(default=None, ge=0, le=INT32_MAX)
    tags: dict[str, str] = Field(default_factory=dict)
    commands: list[str] = Field(default_factory=list)
    envs: list[NameValue] = Field(default_factory=list)
    claims: list[NameValue] = Field(default_factory=list)
    execTimeoutSeconds: StrictInt | None = Field(default=None, ge=60, le=1209600)
    architecture: Architecture | None = None
    priority: Priority | None = None
    workingDir: str | None = None

    @field_validator("imageName")
    @classmethod
    def _image_pattern(cls, value: str) -> str:
        if not IMAGE_NAME_RE.fullmatch(value):
            raise ValueError(f"'{value}' does not match the image name pattern {IMAGE_NAME_RE.pattern}")
        return value

    @field_validator("priority", mode="before")
    @classmethod
    def _priority_name(cls, value: Any) -> Any:
        if value is None or isinstance(value, Priority):
            return value
        if isinstance(value, str) and value in Priority.__members__:
            return Priority[value]
        raise ValueError(f"must be one of {', '.join(Priority.__members__)}")

    @field_validator("envs")
    @classmethod
    def _not_reserved(cls, envs: list[NameValue]) -> list[NameValue]:
        for pair in envs:
            if _RESERVED_ENV_RE.search(pair.name):
                raise ValueError(f"'{pair.name}' is a reserved environment variable name")
        return envs


class RetryStrategy(_Model):
    maxRetries: StrictInt = Field(default=0, ge=0, le=10)


class SubmitRequest(_Model):
    jobName: str | None = None
    batchSize: StrictInt = Field(default=1, ge=1, le=MAX_BATCH_SIZE)
    regions: list[str] | None = None
    region: str | None = None  # sent by the rescalehtc client; means regions=[region]
    htcJobDefinition: JobDefinition
    tags: list[Tag] = Field(default_factory=list)
    retryStrategy: RetryStrategy | None = None
    experimental: dict[str, Any] | None = None
    rescaleProjectId: str | None = None
    cloudProvider: str | None = None

    @field_validator("regions")
    @classmethod
    def _known_regions(cls, regions: list[str] | None) -> list[str] | None:
        for region in regions or ():
            if region not in RESCALE_REGIONS:
                raise ValueError(f"unknown region '{region}'")
        return regions

    def requested_regions(self) -> list[str]:
        if self.regions:
            return list(self.regions)
        return [self.region] if self.region else []


def _field_path(loc: tuple[Any, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts)


def validation_error(exc: ValidationError, prefix: str = "") -> ValidationFailed:
    """Turn pydantic's first error into a ValidationFailed that names the field."""
    first = exc.errors()[0]
    path = _field_path(tuple(first["loc"]))
    message = first["msg"].removeprefix("Value error, ")
    return ValidationFailed(message, field=f"{prefix}{path}" or None)


def parse_submit_requests(body: Any, limits: Limits | None = None) -> list[SubmitRequest]:
    """Validate a submit body: a JSON array of HTCJobSubmitRequest, within ``limits``."""
    limits = limits or Limits()
    if not isinstance(body, list) or not body:
        raise ValidationFailed("the body must be a non-empty JSON array of HTCJobSubmitRequest", field="body")
    if len(body) > limits.requests_per_call:
        raise ValidationFailed(
            f"holds {len(body)} requests; the limit (requests_per_call) is {limits.requests_per_call}",
            field="body",
        )
    requests = []
    for i, item in enumerate(body):
        if not isinstance(item, dict):
            raise ValidationFailed("must be an HTCJobSubmitRequest object", field=f"[{i}]")
        try:
            request = SubmitRequest.model_validate(item)
        except ValidationError as exc:
            raise validation_error(exc, prefix=f"[{i}].") from None
        _check_limits(request, f"[{i}]", limits)
        requests.append(request)
    return requests


def _check_limits(request: SubmitRequest, where: str, limits: Limits) -> None:
    """What pydantic's types cannot say: sizes that depend on the settings, and execve's rules."""
    if request.jobName is not None:
        check_name(request.jobName, f"{where}.jobName", limits)
    definition = request.htcJobDefinition
    here = f"{where}.htcJobDefinition"
    check_name(definition.imageName, f"{here}.imageName", limits)
    counts = (
        ("envs", len(definition.envs)),
        ("claims", len(definition.claims)),
        ("tags", len(definition.tags)),
    )
    for name, count in counts:
        if count > limits.envs_per_job:
            raise ValidationFailed(
                f"holds {count} entries; the limit (envs_per_job) is {limits.envs_per_job}",
                field=f"{here}.{name}",
            )
    if len(request.tags) > limits.envs_per_job:
        raise ValidationFailed(
            f"holds {len(request.tags)} entries; the limit (envs_per_job) is {limits.envs_per_job}",
            field=f"{where}.tags",
        )
    total = 0
    for i, command in enumerate(definition.commands):
        size = len(command.encode("utf-8"))
        if size > MAX_ARG_BYTES:
            raise ValidationFailed(
                f"is {size} bytes; the kernel runs no argument over {MAX_ARG_BYTES} bytes",
                field=f"{here}.commands[{i}]",
            )
        total += size + 1
    # claims reach the job's environment too, inside its token (as userDefined_*)
    pairs = [("envs", i, pair) for i, pair in enumerate(definition.envs)]
    pairs += [("claims", i, pair) for i, pair in enumerate(definition.claims)]
    for kind, i, pair in pairs:
        check_name(pair.name, f"{here}.{kind}[{i}].name", limits)
        size = len(pair.name.encode("utf-8")) + len(pair.value.encode("utf-8")) + 1
        if size > MAX_ARG_BYTES:
            raise ValidationFailed(
                f"NAME=value is {size} bytes; the kernel runs no env string over {MAX_ARG_BYTES} bytes",
                field=f"{here}.{kind}[{i}]",
            )
        total += size + 1
    if total > limits.command_bytes:
        raise ValidationFailed(
            f"commands, envs and claims take {total} bytes; the limit (command_bytes) is "
            f"{limits.command_bytes}",
            field=f"{here}.commands",
        )
