"""Function tasks under the bwrap runtime: warm workers in the job's sandbox, over a python3
image built offline (the handler module inside the image, or a code zip), its memory limit."""

from __future__ import annotations

import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.conftest import _fresh_db_url
from tests.functions.conftest import HANDLERS, Functions

from openhtc.testing.ci import skip_or_fail
from openhtc.testing.images import find_busybox, podman_import, podman_push, python_rootfs_tar
from openhtc.testing.server import HtcServer

pytestmark = pytest.mark.one_db

IN_IMAGE = """
import os

def where(event, context):
    return {"x": event["x"], "uid": os.getuid(), "root": sorted(os.listdir("/"))[:50]}
"""


@pytest.fixture(scope="module")
def python_image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    missing = [t for t in ("podman", "docker-registry", "bwrap") if shutil.which(t) is None]
    if missing or find_busybox() is None or not Path("/usr/bin/python3").exists():
        skip_or_fail(f"missing: {', '.join(missing) or 'busybox-static or /usr/bin/python3'}")
    work = tmp_path_factory.mktemp("fn-image")
    files = {
        "app/imgfn.py": IN_IMAGE.encode(),
        "app/fnlib/__init__.py": b"",
        "app/fnlib/handlers.py": HANDLERS.encode(),
    }
    tar = python_rootfs_tar(work / "rootfs.tar", files)
    image = f"localhost/htc-fn-py:{uuid.uuid4().hex[:8]}"
    podman_import(tar, image, changes=["ENV PYTHONPATH=/app", "ENV PATH=/usr/local/bin:/usr/bin:/bin"])
    tar.unlink()
    yield image
    subprocess.run(["podman", "rmi", "--force", image], capture_output=True, check=False)


@pytest.fixture(scope="module")
def bwrap_server(
    tmp_path_factory: pytest.TempPathFactory, db_kind: str, request: pytest.FixtureRequest
) -> Iterator[HtcServer]:
    srv = HtcServer(tmp_path_factory.mktemp("htc-data"), _fresh_db_url(db_kind, request), runtime="bwrap")
    try:
        srv.start()
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def fn(bwrap_server: HtcServer, python_image: str) -> Functions:
    api = bwrap_server.api()
    project = api.create_project()
    pid = project["projectId"]
    token = api.request("GET", f"/htc/projects/{pid}/container-registry/token", expect=200).text
    podman_push(python_image, f"{project['containerRegistry']}python3:latest", token)
    task = api.create_task(pid)
    return Functions(bwrap_server, api, pid, task["taskId"])


def test_a_handler_in_the_image_runs_in_its_sandbox(fn: Functions) -> None:
    batch = fn.submit("imgfn.where", [{"x": i} for i in range(20)])
    items = fn.results(batch, 20)
    assert [item["result"]["x"] for item in items] == list(range(20))
    root = items[0]["result"]["root"]
    assert "app" in root  # the image's root (the host has no /app)


def test_code_from_a_zip_and_an_exception_under_bwrap(fn: Functions) -> None:
    fn.upload_code()
    batch = fn.submit("fnlib.handlers.fail_odd", [{"x": i} for i in range(4)], code="handlers.zip")
    items = fn.results(batch, 4)
    assert [item["status"] for item in items] == ["SUCCEEDED", "FAILED", "SUCCEEDED", "FAILED"]
    assert items[3]["error"]["type"] == "ValueError" and "odd input 3" in items[3]["error"]["message"]


def test_a_worker_over_its_memory_limit_fails_its_call_and_is_replaced(fn: Functions) -> None:
    events = [{"mib": 1}, {"mib": 400}, {"mib": 1}]
    batch = fn.submit("fnlib.handlers.hog", events, maxMemory=128)
    items = fn.results(batch, 3)
    assert items[1]["status"] == "FAILED" and items[1]["failureCode"] == "ErrorNotEnoughMemory"
    assert [items[0]["result"], items[2]["result"]] == [1024 * 1024, 1024 * 1024]
