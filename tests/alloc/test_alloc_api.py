"""The admin API of allocation queues: bad input is a clear 4xx and adds nothing; only workspace
administrators reach it (no Slurm needed: nothing here reaches sbatch)."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from openhtc.testing.server import HtcServer

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
