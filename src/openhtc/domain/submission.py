"""Validation of job submissions (HTCJobSubmitRequest), following the reference spec.

Unknown fields are ignored, as Rescale's server does. Every error names its field.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from openhtc.domain.enums import RESCALE_REGIONS, Architecture, Priority
from openhtc.domain.errors import ValidationFailed

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


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class NameValue(_Model):
    name: str = Field(min_length=1)
    value: str


class Tag(_Model):
    key: str
    value: str


class JobDefinition(_Model):
    imageName: str = Field(min_length=1)
    maxVCpus: int = Field(default=1, ge=1, le=64)
    maxMemory: int = Field(default=4000, ge=4, le=235520)
    maxDiskGiB: int = Field(default=10, ge=0, le=64000)
    maxSwap: int | None = Field(default=None, ge=0)
    tags: dict[str, str] = Field(default_factory=dict)
    commands: list[str] = Field(default_factory=list)
    envs: list[NameValue] = Field(default_factory=list)
    claims: list[NameValue] = Field(default_factory=list)
    execTimeoutSeconds: int | None = Field(default=None, ge=60, le=1209600)
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
    maxRetries: int = Field(default=0, ge=0, le=10)


class SubmitRequest(_Model):
    jobName: str | None = None
    batchSize: int = Field(default=1, ge=1, le=MAX_BATCH_SIZE)
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


def raise_validation(exc: ValidationError, prefix: str = "") -> ValidationFailed:
    """Turn pydantic's first error into a ValidationFailed that names the field."""
    first = exc.errors()[0]
    path = _field_path(tuple(first["loc"]))
    message = first["msg"].removeprefix("Value error, ")
    return ValidationFailed(message, field=f"{prefix}{path}" or None)


def parse_submit_requests(body: Any) -> list[SubmitRequest]:
    """Validate a submit body: a JSON array of HTCJobSubmitRequest."""
    if not isinstance(body, list) or not body:
        raise ValidationFailed("the body must be a non-empty JSON array of HTCJobSubmitRequest", field="body")
    requests = []
    for i, item in enumerate(body):
        if not isinstance(item, dict):
            raise ValidationFailed("must be an HTCJobSubmitRequest object", field=f"[{i}]")
        try:
            requests.append(SubmitRequest.model_validate(item))
        except ValidationError as exc:
            raise raise_validation(exc, prefix=f"[{i}].") from None
    return requests
