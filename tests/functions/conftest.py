"""Helpers for function task tests: handler code zipped into project storage, the routes."""

from __future__ import annotations

import io
import time
import zipfile
from collections.abc import Iterator
from typing import Any

import pytest
from tests.conftest import _fresh_db_url

from openhtc.testing.server import HtcApi, HtcServer

HANDLERS = """
import logging, os, time

def double(event, context):
    return event["x"] * 2

def identity(event, context):
    return event

def echo_context(event, context):
    return {
        "requestId": context.aws_request_id,
        "name": context.function_name,
        "remaining": context.get_remaining_time_in_millis(),
        "attempt": context.attempt,
        "pid": os.getpid(),
    }

def fail_odd(event, context):
    if event["x"] % 2:
        raise ValueError("odd input %d" % event["x"])
    return event["x"]

def chatty(event, context):
    print("hello from call", event["x"])
    context.logger.info("logged %d", event["x"])
    return event["x"]

def sleepy(event, context):
    time.sleep(event.get("sleep", 0))
    return event.get("x")

def pid_then_sleep(event, context):
    folder = os.path.join(os.environ["TASK_SHARED_FOLDER"], "pids")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, str(event["x"]))
    with open(path + ".tmp", "w") as out:  # renamed when whole: a reader never sees an empty file
        out.write(str(os.getpid()))
    os.rename(path + ".tmp", path)
    time.sleep(60)

def crash_on(event, context):
    if event["x"] == event["crash"]:
        os._exit(3)
    return event["x"]

def big(event, context):
    return "y" * event["size"]

def hog(event, context):
    block = bytearray(event["mib"] * 1024 * 1024)
    for i in range(0, len(block), 4096):
        block[i] = 1
    return len(block)

def not_json(event, context):
    return {1, 2}
"""


def handlers_zip(source: str = HANDLERS) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        archive.writestr("fnlib/__init__.py", "")
        archive.writestr("fnlib/handlers.py", source)
    return buf.getvalue()


class Functions:
    """The function routes of one task, through the admin's API client."""

    def __init__(self, server: HtcServer, api: HtcApi, project_id: str, task_id: str) -> None:
        self.server, self.api, self.project_id, self.task_id = server, api, project_id, task_id
        self.base = f"{server.url}/openhtc/v1/projects/{project_id}/tasks/{task_id}/functions"

    def upload_code(self, name: str = "handlers.zip", data: bytes | None = None) -> str:
        key = f"projects/{self.project_id}/shared/{name}"
        self.api.request(
            "PUT", f"{self.server.url}/htc/storage/objects/{key}", content=data or handlers_zip(), expect=200
        )
        return name

    def submit(self, handler: str, events: list[Any], **fields: Any) -> str:
        body = {"image": "python3", "handler": handler, "events": events, **fields}
        answer = self.api.post(self.base, body, expect=201)
        assert answer["count"] == len(events) and answer["firstIndex"] == 0
        return str(answer["batchId"])

    def page(self, batch: str, start: int = 0, limit: int = 1000, wait: float = 0) -> dict[str, Any]:
        return dict(
            self.api.get(f"{self.base}/{batch}/results", **{"from": start, "limit": limit, "wait": wait})
        )

    def results(self, batch: str, total: int, timeout: float = 120) -> list[dict[str, Any]]:
        """Every result, in order, paging with ``next`` and long polls as a client does."""
        items: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        start = 0
        while len(items) < total:
            assert time.monotonic() < deadline, (
                f"only {len(items)} of {total} results: {self.server.log_tail()}"
            )
            page = self.page(batch, start, wait=10)
            items += page["items"]
            start = page["next"] if page["next"] is not None else start + len(page["items"])
        return items

    def cancel(self, batch: str) -> int:
        return int(self.api.post(f"{self.base}/{batch}/cancel")["cancelled"])


def server_with(
    tmp_path_factory: pytest.TempPathFactory,
    db_kind: str,
    request: pytest.FixtureRequest,
    env: dict[str, str],
) -> Iterator[HtcServer]:
    """A module's own server with ``env`` (the body of a module-scoped fixture), on a fresh database."""
    srv = HtcServer(tmp_path_factory.mktemp("htc-data"), _fresh_db_url(db_kind, request), env=env)
    try:
        srv.start()
        yield srv
    finally:
        srv.stop()


def functions_on(server: HtcServer, code_name: str, source: str) -> Functions:
    """A fresh project and task on ``server`` with ``source``'s handlers uploaded as ``code_name``."""
    api = server.api()
    project_id, task_id = api.project_and_task()
    functions = Functions(server, api, project_id, task_id)
    functions.upload_code(code_name, handlers_zip(source))
    return functions
