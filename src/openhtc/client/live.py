"""openhtc's extension routes for clients that wait (``/openhtc/v1``, docs/extensions.md).

Pushed waits (long polls answered the moment a job, batch or task is done) and Server-Sent Events
streams (a job's log lines, a task's status counts). A server without them (Rescale, an older
openhtc) answers 404: :class:`Unsupported` is raised, once per connection, and the callers in
``session.py`` fall back to polling the Rescale routes. A server holding too many open waits
answers 503: :class:`Busy` (an Unsupported) is raised for that call only, and it polls too.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from openhtc.client._errors import HtcConnectionError, NotFound, ServerError, error_from_response
from openhtc.client._transport import API_PREFIX, Connection, segment

JsonDict = dict[str, Any]
PREFIX = "/openhtc/v1"
MAX_WAIT = 60.0  # the longest long poll the server holds
RECONNECTS = 30  # a followed log gives up after this many failed reconnects in a row (~1 s apart)


class Unsupported(Exception):
    """The server has no openhtc extension routes: poll instead."""


class Busy(Unsupported):
    """The server holds too many open waits and streams right now (503): poll this time."""


@dataclass(frozen=True, slots=True)
class Event:
    """One Server-Sent Event: ``name`` (``line``, ``end``, ``counts``), its ``id`` and JSON data."""

    name: str
    id: str | None
    data: Any


def _root(conn: Connection) -> str:
    base = conn.base_url
    return base[: -len(API_PREFIX)] if base.endswith(API_PREFIX) else base


def _task_url(conn: Connection, project_id: str, task_id: str) -> str:
    return f"{_root(conn)}{PREFIX}/projects/{segment(project_id)}/tasks/{segment(task_id)}"


def supported(conn: Connection) -> bool:
    """False once this connection's server answered that it has no extension routes."""
    return conn.live_supported


def _missing(conn: Connection) -> Unsupported:
    conn.live_supported = False
    return Unsupported(f"{conn.base_url} has no {PREFIX} routes")


def _is_route_missing(response: httpx.Response) -> bool:
    """A 404 for the route itself (not for a job or task that does not exist): FastAPI's
    ``Not Found`` or anything that is not openhtc's error body naming what was not found."""
    try:
        body = response.json()
    except ValueError:
        return True
    text = str(body.get("errorDescription") or body.get("message") or body.get("detail") or "")
    return " not found" not in text or text.strip().lower() == "not found"


def _long_poll(conn: Connection, url: str, timeout: float, params: dict[str, Any], key: str) -> JsonDict:
    """One long poll; an answer without ``key`` comes from a server that does not know the route
    (a catch-all): it counts as a server without the extension."""
    if not supported(conn):
        raise Unsupported(url)
    wait = max(0.0, min(timeout, MAX_WAIT))
    try:
        response = conn.request("GET", url, params={**params, "timeout": f"{wait:g}"}, timeout=wait + 30.0)
    except NotFound as exc:
        if exc.response is not None and _is_route_missing(exc.response):
            raise _missing(conn) from None
        raise
    except ServerError as exc:
        if exc.status_code == 503:
            raise Busy(str(exc)) from None
        raise
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict) or key not in body:
        raise _missing(conn)
    return body


def wait_job(conn: Connection, project_id: str, task_id: str, job_id: str, timeout: float = 30.0) -> JsonDict:
    """``GET /openhtc/v1/…/jobs/{jobId}/wait``: the job (an HTCJob), as soon as it has ended or
    after ``timeout`` seconds (at most 60) with its status then."""
    url = f"{_task_url(conn, project_id, task_id)}/jobs/{segment(job_id)}/wait"
    return _long_poll(conn, url, timeout, {}, "status")


def run_job(
    conn: Connection,
    project_id: str,
    task_id: str,
    request: JsonDict,
    timeout: float = 30.0,
    group: str | None = None,
) -> JsonDict:
    """``POST /openhtc/v1/…/jobs/run``: submit one job (an HTCJobSubmitRequest of batchSize 1)
    and have it (an HTCJob) as soon as it has ended, or after ``timeout`` seconds (at most 60)
    with its status then: one request instead of the submit and the job's wait. Raises
    :class:`Unsupported` (nothing submitted) where the route is missing. Any other error goes
    to the caller: past the submit's commit the job exists, so submitting again would run it
    twice (a busy server answers the job at once instead: the caller then waits for it)."""
    if not supported(conn):
        raise Unsupported(conn.base_url)
    wait = max(0.0, min(timeout, MAX_WAIT))
    url = f"{_task_url(conn, project_id, task_id)}/jobs/run"
    params = {"timeout": f"{wait:g}", **({"group": group} if group else {})}
    try:
        response = conn.request("POST", url, params=params, json=[request], timeout=wait + 30.0)
    except NotFound as exc:
        if exc.response is not None and _is_route_missing(exc.response):
            raise _missing(conn) from None
        raise
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict) or "jobUUID" not in body:
        raise _missing(conn)  # a catch-all answer: a server without the route
    return body


def wait_batch(
    conn: Connection, project_id: str, task_id: str, parent_job_id: str, timeout: float = 30.0
) -> JsonDict:
    """``GET /openhtc/v1/…/batches/{parentJobId}/wait``: ``{parentJobId, taskId, group,
    batchSize, done}``, as soon as every job of the batch has ended or after ``timeout`` s."""
    url = f"{_task_url(conn, project_id, task_id)}/batches/{segment(parent_job_id)}/wait"
    return _long_poll(conn, url, timeout, {}, "done")


def wait_task(
    conn: Connection,
    project_id: str,
    task_id: str,
    groups: Sequence[str] = (),
    timeout: float = 30.0,
) -> JsonDict:
    """``GET /openhtc/v1/…/tasks/{taskId}/wait[?group=G…]``: ``{taskId, groups, done,
    statusCounts}``, as soon as none of the jobs is left to end or after ``timeout`` s."""
    url = f"{_task_url(conn, project_id, task_id)}/wait"
    return _long_poll(conn, url, timeout, {"group": list(groups)} if groups else {}, "done")


def stream(
    conn: Connection,
    url: str,
    params: dict[str, Any],
    last_event_id: str | None = None,
    read_timeout: float = 60.0,
) -> Iterator[Event]:
    """The events of a Server-Sent Events route until the server ends the stream. The server
    sends a keep-alive every 15 s; a read waits ``read_timeout`` s (httpx.ReadTimeout)."""
    if not supported(conn):
        raise Unsupported(url)
    headers = {"Authorization": f"Bearer {conn.bearer_token()}", "Accept": "text/event-stream"}
    if last_event_id:
        headers["Last-Event-ID"] = last_event_id
    timeout = httpx.Timeout(30.0, read=read_timeout)
    try:
        with conn.http.stream("GET", url, params=params, headers=headers, timeout=timeout) as response:
            if response.status_code >= 400:
                response.read()
                if response.status_code == 404 and _is_route_missing(response):
                    raise _missing(conn)
                if response.status_code == 503:
                    raise Busy(f"{url}: the server is busy")
                raise error_from_response(response)
            if not response.headers.get("content-type", "").startswith("text/event-stream"):
                raise _missing(conn)  # a catch-all answering any path: not openhtc's stream
            yield from _events(response.iter_lines())
    except httpx.ReadTimeout:
        raise  # nothing arrived within read_timeout: the caller decides
    except httpx.TransportError as exc:
        raise HtcConnectionError(f"cannot reach {conn.base_url}: {exc or type(exc).__name__}") from exc


def _events(lines: Iterator[str]) -> Iterator[Event]:
    name: str = "message"
    ident: str | None = None
    data: list[str] = []
    for line in lines:
        if not line:
            if data:
                yield Event(name, ident, json.loads("\n".join(data)))
            name, ident, data = "message", None, []
        elif line.startswith(":"):
            continue  # a keep-alive comment
        else:
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "event":
                name = value
            elif field == "id":
                ident = value
            elif field == "data":
                data.append(value)


def follow_log(
    conn: Connection,
    project_id: str,
    task_id: str,
    job_id: str,
    after: str | None = None,
    tail: int | None = None,
) -> Iterator[Event]:
    """A job's log as it is written: ``line`` events (data ``{timestamp, message}``, id a
    position), then one ``end`` event (data: the job) once it has ended. It starts after the
    line whose id is ``after``, else with the last ``tail`` lines written so far, else at the
    first line. A dropped connection, a stream the server ended without ``end`` (it stopped) or
    a busy server (503) resumes after the last line received."""
    url = f"{_task_url(conn, project_id, task_id)}/jobs/{segment(job_id)}/logs/stream"
    position = after
    params = {"tail": tail} if tail is not None and after is None else {}
    failures = 0
    while True:
        try:
            for event in stream(conn, url, {} if position else params, position):
                failures = 0
                if event.name == "line":
                    position = event.id or position
                yield event
                if event.name == "end":
                    return
            # ended without its end: the server stops (it may come back): as a dropped connection
            raise HtcConnectionError(f"{url}: the stream ended before the job did")
        except Busy:
            if position is None:  # nothing received yet: the caller polls the logs route instead
                raise
            failures += 1
            if failures > RECONNECTS:
                raise
            time.sleep(1.0)
        except (HtcConnectionError, httpx.ReadTimeout):
            failures += 1
            if failures > RECONNECTS:
                raise
            time.sleep(1.0)  # the server restarts, or the network hiccups: resume where we were


def follow_counts(
    conn: Connection,
    project_id: str,
    task_id: str,
    groups: Sequence[str] = (),
    read_timeout: float = 60.0,
) -> Iterator[Event]:
    """A task's (or its groups') status counts: a ``counts`` event at once, then on each change
    (data ``{taskId, groups, done, statusCounts}``)."""
    url = f"{_task_url(conn, project_id, task_id)}/stream"
    return stream(conn, url, {"group": list(groups)} if groups else {}, read_timeout=read_timeout)
