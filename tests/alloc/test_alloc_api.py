"""The admin API of allocation queues: bad input is a clear 4xx and adds nothing; only workspace
administrators reach it, and only the installation's change it (no Slurm needed: nothing here
reaches sbatch)."""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from openhtc.testing.server import DEFAULT_REGION, HtcServer, htc_command

PATH = "/openhtc/v1/alloc/queues"
GOOD = {"kind": "slurm", "region": "AWS_US_EAST_1", "timeLimitSeconds": 3600, "dryRun": False}


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"maxPilots": 0}, "maxPilots"),
        ({"backlog": -1}, "backlog"),
        ({"timeLimitSeconds": 60}, "timeLimitSeconds"),  # pilots drain a minute before their end
        ({"idleTimeoutSeconds": "soon"}, "idleTimeoutSeconds"),
        ({"sbatchArgs": "--partition=x"}, "sbatchArgs"),
        ({"nodes": 3}, "nodes"),
        ({"kind": "pbs"}, "unknown allocation kind"),
        ({"region": ""}, "region"),
    ],
)
def test_bad_queue_bodies_are_refused_with_400_and_add_nothing(
    server: HtcServer, change: dict[str, Any], words: str
) -> None:
    client = server.client(prefix="")
    resp = client.post(PATH, json={**GOOD, **change})
    assert resp.status_code == 400, resp.text
    assert words in resp.text, resp.text
    assert client.get(PATH).json() == {"queues": []}


def test_only_workspace_administrators_reach_the_queues(server: HtcServer) -> None:
    created = server.cli("admin", "create-user", f"m-{uuid.uuid4().hex[:6]}@x.org", "--role", "member")
    member = server.client(server.token(created.stdout.split()[-1]), prefix="")
    assert member.get(PATH).status_code == 403
    assert member.post(PATH, json=GOOD).status_code == 403
    admin = server.client(prefix="")
    assert admin.post(f"{PATH}/nosuch/pause").status_code == 404
    assert admin.delete(f"{PATH}/nosuch").status_code == 404
    # the queue depth: an administrator's token also reads it, a member's does not
    assert admin.get("/openhtc/v1/alloc/queue-depth").json()["wantedVcpus"] == 0
    assert member.get("/openhtc/v1/alloc/queue-depth").status_code == 403


@pytest.mark.one_db
def test_only_an_installation_administrator_changes_the_queues(server: HtcServer) -> None:
    """Queues serve every workspace: a workspace administrator of another workspace sees them
    but gets 403 on add, pause, resume and remove, and nothing changes."""
    admin = server.client(prefix="")
    queue = admin.post(PATH, json=GOOD).json()
    created = server.cli(
        "admin", "create-workspace", f"other-{uuid.uuid4().hex[:6]}", "--admin-email", "o@x.org"
    )  # fmt: skip
    other = server.client(server.token(created.stdout.split()[-1]), prefix="")
    before = other.get(PATH).json()  # a workspace administrator may look
    assert [q["id"] for q in before["queues"]] == [queue["id"]]
    for resp in (
        other.post(PATH, json=GOOD),
        other.post(f"{PATH}/{queue['id']}/pause"),
        other.post(f"{PATH}/{queue['id']}/resume"),
        other.delete(f"{PATH}/{queue['id']}"),
    ):
        assert resp.status_code == 403, resp.text
        assert "installation-wide" in resp.text and "installation's admin workspace" in resp.text, resp.text
    assert admin.get(PATH).json() == before  # nothing added, paused or removed
    # the installation's own administrator may
    assert admin.post(f"{PATH}/{queue['id']}/pause").json()["state"] == "paused"
    assert admin.delete(f"{PATH}/{queue['id']}").status_code == 204


@pytest.mark.one_db
@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--wrap=rm -rf /"], "--wrap"),
        (["--partition=debug", "--time=10"], "--time"),  # the queue's --time-limit sets it
        (["--clusters", "other"], "--clusters"),
        (["-t", "5"], "-t"),
        (["debug"], "'debug' is not an sbatch option"),
        (["--account"], "--account needs a value"),
        (["--nice=5"], "--nice"),  # allowed only where the setting adds it (below)
    ],
)
def test_sbatch_arguments_outside_the_allow_list_are_refused_with_400_naming_the_option(
    server: HtcServer, args: list[str], named: str
) -> None:
    client = server.client(prefix="")
    resp = client.post(PATH, json={**GOOD, "sbatchArgs": args})
    assert resp.status_code == 400, resp.text
    assert named in resp.text, resp.text
    assert client.get(PATH).json() == {"queues": []}


@pytest.mark.one_db
def test_allowed_sbatch_arguments_and_those_the_setting_adds_are_kept(
    start_server: Callable[..., HtcServer],
) -> None:
    srv = start_server(env={"OPENHTC_ALLOC_SBATCH_OPTIONS": "--nice,--begin"})
    client = srv.client(prefix="")
    args = ["--partition=debug", "-A", "proj42", "--qos", "normal", "--mem-per-cpu=2G", "--exclusive",
            "--nice=5", "--begin", "now"]  # fmt: skip
    resp = client.post(PATH, json={**GOOD, "sbatchArgs": args})
    assert resp.status_code == 201, resp.text
    assert client.get(PATH).json()["queues"][0]["sbatchArgs"] == args


@pytest.mark.one_db
def test_a_queue_whose_sbatch_arguments_are_no_longer_allowed_pauses_itself_naming_the_option(
    start_server: Callable[..., HtcServer], tmp_path: Path
) -> None:
    """The allow-list is checked at every round, not only at add: a queue stored while the setting
    allowed ``--nice`` submits nothing once it no longer does, and says why in ``htc alloc ls``."""
    env = {
        "OPENHTC_ALLOC_SBATCH_OPTIONS": "--nice",
        "OPENHTC_ALLOC_PERIOD_SECONDS": "0.2",
        "SLURM_CONF": str(tmp_path / "no-slurm.conf"),  # any sbatch this server ran would fail
    }
    srv = start_server(env=env, args=("--no-executor",))
    client = srv.client(prefix="")
    resp = client.post(
        PATH, json={**GOOD, "region": DEFAULT_REGION, "sbatchArgs": ["-p", "debug", "--nice=5"]}
    )
    assert resp.status_code == 201, resp.text
    queue_id = resp.json()["id"]

    del srv.extra_env["OPENHTC_ALLOC_SBATCH_OPTIONS"]  # the setting narrowed: --nice is no longer allowed
    srv.restart()
    client = srv.client(prefix="")
    api = srv.api()
    project_id, task_id = api.project_and_task()
    api.submit_one(project_id, task_id, api.job_request(["true"]))  # work a pilot would be sent for
    deadline = time.monotonic() + 60
    while (queue := _queue(client, queue_id))["state"] == "active":
        assert time.monotonic() < deadline, f"the queue never paused: {queue}\n{srv.log_tail()}"
        time.sleep(0.2)
    assert queue["pauseReason"].startswith("its sbatch arguments are no longer allowed: "), queue
    assert "sbatch option --nice is not allowed" in queue["pauseReason"], queue
    assert queue["failedSubmissions"] == 0 and queue["pilots"] == [], queue  # sbatch never ran
    alloc_env = {**srv.environment(), "OPENHTC_URL": srv.url, "OPENHTC_API_KEY": srv.api_key}
    shown = subprocess.run(
        [*htc_command(), "alloc", "ls"], capture_output=True, text=True, env=alloc_env, timeout=60, check=True
    ).stdout
    assert "paused: its sbatch arguments are no longer allowed: sbatch option --nice" in " ".join(
        shown.split()
    )

    # resumed unchanged, it pauses again at the next round: the option never reaches sbatch
    assert client.post(f"{PATH}/{queue_id}/resume").json()["state"] == "active"
    while (queue := _queue(client, queue_id))["state"] == "active":
        assert time.monotonic() < deadline + 60, f"the queue never paused again: {queue}"
        time.sleep(0.2)
    assert "--nice" in queue["pauseReason"] and queue["failedSubmissions"] == 0 and queue["pilots"] == [], (
        queue
    )


def _queue(client: httpx.Client, queue_id: str) -> dict[str, Any]:
    resp = client.get(PATH)
    assert resp.status_code == 200, resp.text
    return next(q for q in resp.json()["queues"] if q["id"] == queue_id)
