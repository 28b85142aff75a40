"""Function tasks (docs/functions.md): a batch of calls of one Python handler, one job per event.

A function batch is an ordinary job batch (statuses, summaries, limits, priorities, cancel and
the dashboard all apply) whose job definition runs the handler: its ``commands`` are
``openhtc-function HANDLER [CODE]``, which the executor hands to its warm workers
(openhtc.functions) instead of starting a process per job. Each call's event is stored with the
batch (store/functions.py); the executor stores each call's result or error just before it
reports the call's end, so a call that reads as ended has them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator
from sqlalchemy import Connection

from openhtc.auth.permissions import check_found, check_project_scope
from openhtc.auth.tokens import Principal
from openhtc.domain.capacity import region_architectures
from openhtc.domain.enums import JobStatus, LifecycleStatus, Priority
from openhtc.domain.errors import Conflict, NotFound, ValidationFailed
from openhtc.domain.submission import IMAGE_NAME_RE, SubmitRequest, validation_error
from openhtc.services.executors import live_offers
from openhtc.services.notify import nothing_ended, task_key
from openhtc.services.service_set import ServiceSet
from openhtc.services.submission import _check_images, _plan
from openhtc.services.tasks import cancel_jobs
from openhtc.storage.layout import clean_relative, task_prefix
from openhtc.store.functions import CallRow, FunctionStore

FUNCTION_COMMAND = "openhtc-function"  # commands[0] of a function batch's job definition
MAX_EVENTS = 100_000
HANDLER_RE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")
RESULTS_DIR = "function-results"  # large results, in task storage: {dir}/{batchId}/{index}.json


def result_key(parent_job_id: str, index: int) -> str:
    """Where a large result is kept, relative to its task's storage."""
    return f"{RESULTS_DIR}/{parent_job_id}/{index}.json"


class _Retry(BaseModel):
    model_config = ConfigDict(extra="ignore")
    maxRetries: StrictInt = Field(default=0, ge=0, le=10)


class FunctionRequest(BaseModel):
    """The body of ``POST …/functions`` (docs/extensions.md)."""

    model_config = ConfigDict(extra="ignore")
    image: str = Field(min_length=1)
    handler: str
    code: str | None = None
    maxVCpus: StrictInt = Field(default=1, ge=1, le=64)
    maxMemory: StrictInt = Field(default=512, ge=4, le=235520)
    execTimeoutSeconds: StrictInt = Field(default=60, ge=1, le=1209600)
    retryStrategy: _Retry | None = None
    priority: StrictInt | str | None = None
    groupName: str | None = None
    events: list[Any] = Field(min_length=1, max_length=MAX_EVENTS)

    @field_validator("image")
    @classmethod
    def _image(cls, value: str) -> str:
        if not IMAGE_NAME_RE.fullmatch(value):
            raise ValueError(f"'{value}' is not an image name (pattern {IMAGE_NAME_RE.pattern})")
        return value

    @field_validator("handler")
    @classmethod
    def _handler(cls, value: str) -> str:
        if not HANDLER_RE.fullmatch(value):
            raise ValueError(f"'{value}' is not of the form package.module.function")
        return value

    @field_validator("code")
    @classmethod
    def _code(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            return clean_relative(value, "code")
        except ValidationFailed as exc:
            raise ValueError(exc.message) from None

    @field_validator("priority")
    @classmethod
    def _priority(cls, value: int | str | None) -> int | str | None:
        if value is None:
            return None
        if isinstance(value, str):
            if value not in Priority.__members__:
                raise ValueError(f"must be one of {', '.join(Priority.__members__)}")
            return value
        if value not in {int(p) for p in Priority}:
            raise ValueError(f"must be one of {', '.join(str(int(p)) for p in Priority)}")
        return Priority(value).name


def parse_function_request(body: Any) -> tuple[FunctionRequest, str]:
    """The request and its events as one JSON array; ValidationFailed names the bad field."""
    if not isinstance(body, dict):
        raise ValidationFailed("the body must be a JSON object", field="body")
    try:
        request = FunctionRequest.model_validate(body)
    except ValidationError as exc:
        raise validation_error(exc) from None
    try:
        events = orjson.dumps(request.events).decode()
    except TypeError:
        for i, event in enumerate(request.events):  # which one
            try:
                orjson.dumps(event)
            except TypeError as exc:
                raise ValidationFailed(f"is not JSON: {exc}", field=f"events[{i}]") from None
        raise
    return request, events


@dataclass(frozen=True, slots=True)
class StoredBatch:
    """The fields of a function batch's row that ``results_page`` reads, of one just stored."""

    id: int
    parent_job_id: str
    task_id: str
    project_id: str
    group_name: str
    batch_size: int


def store_functions(
    services: ServiceSet,
    principal: Principal,
    project: Any,
    task: Any,
    body: Any,
    capacity: tuple[list[Any], list[Any]] | None = None,
) -> tuple[dict[str, Any], StoredBatch]:
    """Store a function batch (one job per event, with its event) in one transaction: the
    answer to the submit, and the batch as ``results_page`` reads it. ``capacity``: the offers
    and regions, if the caller read them (``submission.target``)."""
    if task.lifecycle_status == LifecycleStatus.DELETED.value:
        raise Conflict(f"task {task.id} is DELETED; functions cannot be submitted to it")
    request, events = parse_function_request(body)
    commands = [FUNCTION_COMMAND, request.handler, *([request.code] if request.code else [])]
    definition: dict[str, Any] = {
        "imageName": request.image,
        "maxVCpus": request.maxVCpus,
        "maxMemory": request.maxMemory,
        "commands": commands,
    }
    if request.priority is not None:
        definition["priority"] = request.priority
    as_job: dict[str, Any] = {"htcJobDefinition": definition}
    if request.retryStrategy is not None:
        as_job["retryStrategy"] = {"maxRetries": request.retryStrategy.maxRetries}
    try:
        job = SubmitRequest.model_validate(as_job).model_copy(update={"batchSize": len(request.events)})
    except ValidationError as exc:
        raise validation_error(exc) from None
    if request.groupName is not None and not request.groupName.strip():
        raise ValidationFailed("must not be empty", field="groupName")
    offers, regions = capacity or (live_offers(services), services.accounts.regions(project.workspace_id))
    region_archs = {
        r.name: region_architectures(r.architectures, offers, r.name) for r in regions if r.enabled
    }
    planned = _plan(job, 0, project, region_archs, offers, request.groupName)
    echo = dict(planned.request)
    # The per-call timeout: the job definition's (whose own floor, 60 s, is for whole jobs).
    echo["htcJobDefinition"] = {**echo["htcJobDefinition"], "execTimeoutSeconds": request.execTimeoutSeconds}
    planned = replace(planned, request=echo)
    if services.images_required:
        _check_images(services, project.id, {request.image})
    store = FunctionStore(services.db)

    def write_events(conn: Connection, batch_ids: list[int]) -> None:
        store.insert_events(conn, batch_ids[0], events)

    stored = services.jobs.submit_batches(
        task, [planned], principal.user_id, services.clock.now(), write_events
    )
    echo = stored.echoes[0]
    if not stored.settled:  # as a job submit: a round for nothing would race the executor's claim
        services.wakeups.schedule_round.set()
    services.wakeups.queued()
    # It ends no call: a results waiter of the task woken by it need not read (and the submit
    # that waits for its own results, api/routes/functions.py, reads nothing before an end).
    services.notify.publish((task_key(task.id),), nothing_ended)
    count = len(request.events)
    batch = StoredBatch(
        stored.batch_ids[0], echo["parentJobId"], task.id, task.project_id, echo["group"], count
    )
    return {"batchId": batch.parent_job_id, "count": count, "firstIndex": 0}, batch


def function_batch(services: ServiceSet, conn: Connection, task_id: str, batch_id: str) -> Any:
    """The batch row of a function batch of the task; NotFound otherwise."""
    return _function_batch(services.jobs.batch_by_parent(conn, batch_id), task_id, batch_id)


def function_target(
    services: ServiceSet, who: Principal, project_id: str, task_id: str, batch_id: str
) -> Any:
    """``function_batch`` of a task the caller may read (``api.deps.task_for``'s checks): the
    project, the task and the batch read together (PostgreSQL: one round trip, three before)."""
    check_project_scope(who, project_id)
    project, task, batch = services.projects.task_with(
        who.workspace_id, project_id, task_id, services.jobs.batch_by_parent_query(batch_id)
    )
    check_found(who, project_id, task_id, project, task)
    return _function_batch(batch, task_id, batch_id)


def _function_batch(batch: Any, task_id: str, batch_id: str) -> Any:
    commands = (batch.request or {}).get("htcJobDefinition", {}).get("commands", []) if batch else []
    if batch is None or batch.task_id != task_id or commands[:1] != [FUNCTION_COMMAND]:
        raise NotFound(f"function batch {batch_id} not found in task {task_id}")
    return batch


def results_page(
    services: ServiceSet, task_id: str, batch_id: str, start: int, limit: int, known: list[Any] | None = None
) -> tuple[dict[str, Any], int]:
    """A page of results from index ``start``: the ended calls from there on, up to the first
    that has not ended. Also how many it holds (a long poll waits while none). ``known``: the
    batch row a previous read of this wait found (the fields read here are fixed at submit),
    then kept there: a waiter woken by the call's end reads one statement less."""
    store = FunctionStore(services.db)
    with services.db.read() as conn:
        batch = known[0] if known else function_batch(services, conn, task_id, batch_id)
        if known is not None:
            known[:] = [batch]
        built = store.page_json(conn, batch.id, start, limit)
        if built is None:  # PostgreSQL: the page and the counts in one round trip
            rows, (done, failed) = store.page_and_counts(conn, batch, start, limit)
        else:
            rows, (done, failed) = [], store.counts(conn, batch)
    items: Any
    if built is not None:
        items, count = orjson.Fragment(built.items), built.count
    else:
        items = []
        for row in rows:
            if row.idx != start + len(items) or not JobStatus(row.status).terminal:
                break
            items.append(_item(services, batch, row))
        count = len(items)
    total = int(batch.batch_size)
    after = start + count
    body = {
        "items": items,
        "next": after if after < total else None,
        "done": done,
        "failed": failed,
        "total": total,
    }
    return body, count


def _item(services: ServiceSet, batch: Any, row: CallRow) -> dict[str, Any]:
    status = JobStatus(row.status)
    result: Any = None
    error: Any = None
    if row.result_key is not None and status == JobStatus.SUCCEEDED:
        result = orjson.Fragment(_stored_result(services, batch, row.result_key))
    elif row.result is not None and status == JobStatus.SUCCEEDED:
        result = orjson.Fragment(row.result)
    if status == JobStatus.FAILED:
        if row.error is not None and row.result_attempt == row.attempt:
            error = orjson.Fragment(row.error)
        else:  # ended by the platform: a cancel, a crash, memory, a timeout
            error = {
                "type": row.failure_code or "ErrorUnknownFailure",
                "message": row.status_reason or "",
                "traceback": "",
            }
    return {
        "index": row.idx,
        "status": status.name,
        "result": result,
        "error": error,
        "attempt": row.attempt,
        "failureCode": row.failure_code,
    }


def _stored_result(services: ServiceSet, batch: Any, key: str) -> bytes:
    if services.storage is None:
        raise NotFound("this server has no storage, where the result was kept")
    body = services.storage.backend.get(task_prefix(batch.project_id, batch.task_id) + key)
    try:
        return b"".join(body.chunks)
    finally:
        body.close()


def cancel_functions(services: ServiceSet, task_id: str, batch_id: str) -> int:
    """Cancel every call of the batch that has not ended (running ones are stopped)."""
    with services.db.read() as conn:
        batch = function_batch(services, conn, task_id, batch_id)
    return cancel_jobs(services, task_id, batch.group_name, services.clock.now(), batch.id)
