"""Function calls on an `htc agent` under bwrap and under podman: the handler runs in a warm worker
inside the job's sandbox on the agent, over a small python3 image (built offline) that the agent
pulls from the server's registry, as the embedded executor runs it
(tests/functions/test_function_bwrap.py).

What a user notices: a handler inside the image runs in the image's root and returns results in
order; a handler from a code zip in the project's shared storage runs too, and its exception is
the call's failure (type and message recorded), never a success.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.functions import test_function_bwrap
from tests.functions.conftest import Functions

from openhtc.testing.agentproc import AgentProcess
from openhtc.testing.images import podman_push
from openhtc.testing.server import HtcServer, htc_command

pytestmark = pytest.mark.one_db

python_image = test_function_bwrap.python_image  # the fixture: a python3 image built offline


@pytest.fixture(scope="module", params=["bwrap", "podman"])
def agent_project(
    tmp_path_factory: pytest.TempPathFactory,
    db_kind: str,
    request: pytest.FixtureRequest,
    python_image: str,
) -> Iterator[tuple[HtcServer, str]]:
    """A server with no executor of its own, one agent (under bwrap, then under podman), and a
    project whose repository holds the image (as ``python3``) and whose storage the code zip."""
    db_url = None if db_kind == "sqlite" else request.getfixturevalue("pg_cluster").new_database()
    srv = HtcServer(tmp_path_factory.mktemp("htc-data"), db_url, runtime="bwrap", args=("--no-executor",))
    srv.start()
    work: Path = tmp_path_factory.mktemp("agent")
    token = srv.cli("admin", "create-agent-token").stdout.strip()
    agent = AgentProcess(htc_command(), srv.url, token, work, runtime=request.param, vcpus=2)
    try:
        api = srv.api()
        project = api.create_project()
        pid = project["projectId"]
        login = api.request("GET", f"/htc/projects/{pid}/container-registry/token", expect=200).text
        podman_push(python_image, f"{project['containerRegistry']}python3:latest", login)
        Functions(srv, api, pid, "").upload_code()
        yield srv, pid
    finally:
        agent.stop()
        print(agent.log())
        srv.stop()


@pytest.fixture
def fn(agent_project: tuple[HtcServer, str]) -> Functions:
    srv, pid = agent_project
    api = srv.api()
    return Functions(srv, api, pid, api.create_task(pid)["taskId"])


def test_a_handler_in_the_image_runs_in_its_sandbox_on_the_agent(fn: Functions) -> None:
    batch = fn.submit("imgfn.where", [{"x": i} for i in range(20)])
    items = fn.results(batch, 20)
    assert [item["status"] for item in items] == ["SUCCEEDED"] * 20, items[:3]
    assert [item["result"]["x"] for item in items] == list(range(20))
    assert "app" in items[0]["result"]["root"]  # the image's root (the host has no /app)


def test_code_from_a_zip_and_an_exception_on_the_agent(fn: Functions) -> None:
    batch = fn.submit("fnlib.handlers.fail_odd", [{"x": i} for i in range(4)], code="handlers.zip")
    items = fn.results(batch, 4)
    assert [item["status"] for item in items] == ["SUCCEEDED", "FAILED", "SUCCEEDED", "FAILED"], items
    assert [items[0]["result"], items[2]["result"]] == [0, 2]
    error = items[3]["error"]
    assert error["type"] == "ValueError" and "odd input 3" in error["message"]
    assert "fail_odd" in error["traceback"]
