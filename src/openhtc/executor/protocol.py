"""The executor protocol on the wire: what ``htc agent`` and the server exchange over HTTP.

Served under openhtc's own prefix ``/openhtc/v1/agents/...`` (never a Rescale route). These
models are the contract (docs/architecture.md, "Cluster mode: the agent protocol"): fields may
be added, as optional ones, never renamed. The converters turn the in-process values
(``JobLaunch``, ``AttemptReport``) into their JSON form and back.
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from openhtc.domain.enums import FailureCode, JobStatus
from openhtc.domain.models import AttemptReport, Capacity, JobLaunch

PREFIX = "/openhtc/v1/agents"
MAX_JOBS = 10000  # the most jobs one exchange may claim

# (job_id, attempt) on the wire: a two-element JSON array
AttemptKey = tuple[int, int]


class _Model(BaseModel):
    # unknown fields are ignored: a newer peer may send optional fields this one does not know
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)  # NaN/inf: a 422, never a 500


class Resources(_Model):
    vcpus: int = Field(ge=0)
    memory_mb: int = Field(ge=0)

    def capacity(self) -> Capacity:
        return Capacity(self.vcpus, self.memory_mb)


class RegisterRequest(_Model):
    agent_id: str = Field(min_length=1, max_length=200)
    incarnation: str = Field(min_length=1, max_length=100)
    region: str = Field(min_length=1, max_length=100)
    architectures: list[str] = Field(min_length=1)
    capacity: Resources
    labels: dict[str, str] = Field(default_factory=dict)
    version: str = ""
    host: str = ""
    runtime: str = ""
    # attempts this agent runs right now and keeps (a re-register after a lost connection)
    running: list[AttemptKey] = Field(default_factory=list)
    # attempts a previous incarnation handed to a runtime and never saw end
    may_have_started: list[AttemptKey] = Field(default_factory=list)
    # True: the agent cannot list them (its attempt journal, written without a sync, may have
    # lost its tail in a crash of its machine: executor/journal.py), so every attempt leased to
    # this agent id and not in ``running`` is recovered as one that may have started
    journal_untrusted: bool = False


class StorageInfo(_Model):
    model_config = ConfigDict(extra="allow")
    kind: Literal["local", "s3"] | None = None


class RegistryInfo(_Model):
    host: str


class RegisterResponse(_Model):
    agent_id: str
    liveness_seconds: float
    lease_seconds: float
    poll_seconds: float  # the longest an exchange is held by the server
    server_time: float
    registry: RegistryInfo | None = None
    storage: StorageInfo | None = None
    recovered: int = 0
    kill: list[AttemptKey] = Field(default_factory=list)
    # function calls: a result up to this many bytes goes in its report, a larger one to task storage
    function_result_max_bytes: int | None = None
    # the server honours ``journal_untrusted``: the agent may journal its hand-offs without a
    # sync (absent, from an older server: it syncs before each one)
    lazy_journal: bool = False


# Validation context of a peer's reports (the server's exchange route): its
# function_result_max_bytes. Only then are results checked: they are stored as they come and
# served verbatim, so text that is not JSON would make the results page invalid JSON or a 500.
# An agent reading back its own outbox passes none (what it wrote is not refused at its start).
RESULT_LIMIT = "function_result_max_bytes"
_RESULT_KEY_RE = re.compile(r"function-results/[^/]+/\d+\.json")  # services/functions.py result_key
_ERROR_FIELDS = ("type", "message", "traceback")
_TERMINAL = (int(JobStatus.SUCCEEDED), int(JobStatus.FAILED))


class FunctionResult(_Model):
    """A function call's outcome, sent with its terminal report (docs/functions.md): exactly one
    of ``result`` (JSON text), ``error`` (JSON text: type, message, traceback) and ``result_key``
    (a large result, already put in the task's storage at that key).

    Checked when the server validates an exchange (``RESULT_LIMIT`` in the context): one an
    honest agent never sends fails the whole exchange with a 400 naming it, so nothing of it is
    applied (as any invalid field of a report): the result is not JSON (NaN and Infinity are
    not), the error is not the object of three strings, or the key is not of the form the
    executor writes (that it is its own call's key is checked by the route, which reads the
    job). A result over the server's ``function_result_max_bytes`` is no 400 (an agent's limit
    may be stale: lowered, and the server restarted): its report fails the call
    (``Report``'s check, ``ResultTooLarge``)."""

    result: str | None = None
    error: str | None = None
    result_key: str | None = Field(default=None, max_length=1000)

    @field_validator("result")
    @classmethod
    def _result(cls, value: str | None, info: ValidationInfo) -> str | None:
        limit = (info.context or {}).get(RESULT_LIMIT)
        if value is None or limit is None:
            return value
        if _size(value) <= limit:  # (a larger one is not stored: Report's check)
            _json(value)
        return value

    @field_validator("error")
    @classmethod
    def _error(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None or not _on_server(info):
            return value
        found = _json(value)
        if (
            not isinstance(found, dict)
            or sorted(found) != sorted(_ERROR_FIELDS)
            or not all(isinstance(found[k], str) for k in _ERROR_FIELDS)
        ):
            raise ValueError('is not the JSON object {"type": str, "message": str, "traceback": str}')
        return value

    @field_validator("result_key")
    @classmethod
    def _key(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None or not _on_server(info):
            return value
        if not _RESULT_KEY_RE.fullmatch(value):
            raise ValueError("is not a function result's key in its task's storage (function-results/...)")
        return value

    @model_validator(mode="after")
    def _one(self, info: ValidationInfo) -> FunctionResult:
        if _on_server(info):
            given = sum(v is not None for v in (self.result, self.error, self.result_key))
            if given != 1:
                raise ValueError(f"must hold exactly one of result, error and result_key ({given} given)")
        return self


def _on_server(info: ValidationInfo) -> bool:
    """Whether the server validates an exchange (``RESULT_LIMIT`` in the context)."""
    return RESULT_LIMIT in (info.context or {})


def _size(text: str) -> int:
    """Its UTF-8 length, as the function runner wrote it (an escaped lone surrogate included)."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def _json(text: str) -> Any:
    """The JSON value of ``text``, or ValueError. orjson first (fast); Python's parser for what
    orjson refuses yet the function runner writes (json.dumps: an escaped lone surrogate), with
    NaN and Infinity refused as the runner does (allow_nan=False)."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        pass

    def constant(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    try:
        return json.loads(text, parse_constant=constant)
    except RecursionError:
        raise ValueError("is nested too deeply") from None
    except ValueError as exc:
        raise ValueError(f"is not JSON text: {exc}") from None


class Report(_Model):
    job_id: int
    attempt: int
    seq: int = Field(ge=1)  # per attempt, from 1, strictly increasing
    status: int = Field(ge=0, le=6)  # a JobStatus value
    at: float
    exit_code: int | None = None
    failure_code: str | None = None
    reason: str | None = Field(default=None, max_length=10000)
    result: FunctionResult | None = None  # a function call's, with its terminal report

    @model_validator(mode="after")
    def _too_large(self, info: ValidationInfo) -> Report:
        """On the server (``RESULT_LIMIT`` in the context): a result over its limit is not
        stored; the call fails as on the embedded executor when a result cannot be kept
        (``ErrorUnknownFailure``, error type ``ResultTooLarge``; its retries apply)."""
        limit = (info.context or {}).get(RESULT_LIMIT)
        value = self.result.result if self.result is not None else None
        if limit is None or value is None or (size := _size(value)) <= limit:
            return self
        if self.status not in _TERMINAL:  # a result only goes with an end (else never stored)
            self.result = None
            return self
        why = (
            f"the agent reported a result of {size} bytes, over the server's"
            f" function_result_max_bytes ({limit}): not stored (a larger one goes to task storage)"
        )
        error = json.dumps({"type": "ResultTooLarge", "message": why, "traceback": ""})
        self.status, self.exit_code = int(JobStatus.FAILED), None
        self.failure_code, self.reason = FailureCode.ErrorUnknownFailure.value, f"ResultTooLarge: {why}"
        self.result = FunctionResult(error=error)
        return self


class ExchangeRequest(_Model):
    incarnation: str = Field(min_length=1, max_length=100)
    free: Resources
    max_jobs: int = Field(ge=0, le=MAX_JOBS)
    held: list[AttemptKey] = Field(default_factory=list)
    reports: list[Report] = Field(default_factory=list)
    wait_seconds: float = Field(default=0.0, ge=0.0, le=3600.0)
    draining: bool = False
    # The agent's count of its exchanges (one at a time, from 1). An agent that sends it lists
    # in ``held`` every lease it received: a lease the server granted it in an earlier
    # exchange that it does not list never arrived (a lost answer) and is re-queued free.
    exchange_seq: int | None = Field(default=None, ge=0)


class Launch(_Model):
    """``JobLaunch`` as JSON, plus the registry pull token of the job's project."""

    job_id: int
    attempt: int
    job_uuid: str
    batch_id: int
    array_index: int
    project_id: str
    task_id: str
    region: str
    image: str
    commands: list[str]
    envs: list[tuple[str, str]]
    vcpus: int
    memory_mb: int
    disk_gib: int
    timeout_s: int | None = None
    working_dir: str | None = None
    batch_envs: list[tuple[str, str]] = Field(default_factory=list)
    pull_token: str | None = None
    event: str | None = None  # a function call's event (JSON text)


class ExchangeResponse(_Model):
    acked: list[tuple[int, int, int]] = Field(default_factory=list)  # (job, attempt, seq)
    refused: list[AttemptKey] = Field(default_factory=list)
    leases: list[Launch] = Field(default_factory=list)
    kill: list[AttemptKey] = Field(default_factory=list)
    lease_seconds: float
    next_call_seconds: float
    # the server's limit now (as at registration): an agent's may be stale (lowered since, and
    # the server restarted); a result over it fails its call (Report._too_large)
    function_result_max_bytes: int | None = None


class LogChunk(_Model):
    job_id: int
    attempt: int
    offset: int = Field(ge=0)  # byte offset of ``data`` in the attempt's log
    data: str  # UTF-8 text, whole lines


class LogsRequest(_Model):
    incarnation: str = Field(min_length=1, max_length=100)
    chunks: list[LogChunk] = Field(default_factory=list)


class LogsResponse(_Model):
    acked: list[tuple[int, int, int]] = Field(default_factory=list)  # (job, attempt, next_offset)


class ErrorBody(_Model):
    error: str  # 409: "unknown agent" | "agent lost" | "stale incarnation" | "not this agent's attempt"
    # with "not this agent's attempt" (logs): the attempts whose chunks were refused
    refused: list[AttemptKey] | None = None


# -- converters -----------------------------------------------------------------------------------


def launch_to_wire(launch: JobLaunch, pull_token: str | None = None, event: str | None = None) -> Launch:
    """A launch for the wire; its mounts stay behind (the agent fills in its own)."""
    return Launch(
        job_id=launch.job_id,
        attempt=launch.attempt,
        job_uuid=launch.job_uuid,
        batch_id=launch.batch_id,
        array_index=launch.array_index,
        project_id=launch.project_id,
        task_id=launch.task_id,
        region=launch.region,
        image=launch.image,
        commands=list(launch.commands),
        envs=[(k, v) for k, v in launch.envs],
        vcpus=launch.vcpus,
        memory_mb=launch.memory_mb,
        disk_gib=launch.disk_gib,
        timeout_s=launch.timeout_s,
        working_dir=launch.working_dir,
        batch_envs=[(k, v) for k, v in launch.batch_envs],
        pull_token=pull_token,
        event=event,
    )


def launch_json(
    launch: JobLaunch, pull_token: str | None, event: str | None, batch_envs: Any = None
) -> dict[str, Any]:
    """``launch_to_wire(...).model_dump(mode="json")``, built directly: the answers to a fleet's
    exchanges carry thousands of launches a second, and the model's validation and dump cost
    more than the rest of a lease. ``batch_envs``: the batch's envs already encoded
    (``orjson.Fragment``), shared by the launches of one batch; None: encoded here."""
    return {
        "job_id": launch.job_id,
        "attempt": launch.attempt,
        "job_uuid": launch.job_uuid,
        "batch_id": launch.batch_id,
        "array_index": launch.array_index,
        "project_id": launch.project_id,
        "task_id": launch.task_id,
        "region": launch.region,
        "image": launch.image,
        "commands": launch.commands,
        "envs": launch.envs,
        "vcpus": launch.vcpus,
        "memory_mb": launch.memory_mb,
        "disk_gib": launch.disk_gib,
        "timeout_s": launch.timeout_s,
        "working_dir": launch.working_dir,
        "batch_envs": launch.batch_envs if batch_envs is None else batch_envs,
        "pull_token": pull_token,
        "event": event,
    }


def launch_from_wire(
    wire: Launch, batch_envs: dict[int, tuple[tuple[str, str], ...]] | None = None
) -> JobLaunch:
    """A ``JobLaunch`` from the wire. ``batch_envs`` (batch id -> envs), if given, lets the
    launches of one batch share one tuple, as in-process ones do (runtimes cache on it)."""
    envs = tuple((k, v) for k, v in wire.batch_envs)
    if batch_envs is not None:
        cached = batch_envs.get(wire.batch_id)
        if cached == envs:
            envs = cached
        else:
            batch_envs[wire.batch_id] = envs
    return JobLaunch(
        job_id=wire.job_id,
        attempt=wire.attempt,
        job_uuid=wire.job_uuid,
        batch_id=wire.batch_id,
        array_index=wire.array_index,
        project_id=wire.project_id,
        task_id=wire.task_id,
        region=wire.region,
        image=wire.image,
        commands=tuple(wire.commands),
        envs=tuple((k, v) for k, v in wire.envs),
        vcpus=wire.vcpus,
        memory_mb=wire.memory_mb,
        disk_gib=wire.disk_gib,
        timeout_s=wire.timeout_s,
        working_dir=wire.working_dir,
        batch_envs=envs,
    )


def report_to_wire(report: AttemptReport, seq: int, result: FunctionResult | None = None) -> Report:
    return Report(
        job_id=report.job_id,
        attempt=report.attempt,
        seq=seq,
        status=int(report.status),
        at=report.at,
        exit_code=report.exit_code,
        failure_code=report.failure_code,
        reason=report.reason,
        result=result,
    )


def report_from_wire(wire: Report) -> AttemptReport:
    return AttemptReport(
        wire.job_id,
        wire.attempt,
        JobStatus(wire.status),
        wire.at,
        wire.exit_code,
        wire.failure_code,
        wire.reason,
    )


def dump(model: BaseModel) -> dict[str, Any]:
    return model.model_dump(mode="json")
