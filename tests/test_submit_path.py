"""The submit call's shortcuts (issue 19) never change what a submit does.

The submit reads the vCPU limits in one statement inside its own transaction, and the executor
shares a job's tokens between the batches of a task with the same claims: a limit committed by
the API or by another process holds the very next job, and a job's token still carries its own
task and claims.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jwt

from openhtc.testing.server import HtcApi, HtcServer


def _status(api: HtcApi, pid: str, tid: str, echo: dict[str, Any]) -> str:
    return str(api.job(pid, tid, f"{echo['parentJobId']}:0")["status"])


def _stays_held(api: HtcApi, pid: str, tid: str, echo: dict[str, Any]) -> None:
    """A `true` job that was wrongly admitted ends within milliseconds: a bounded look."""
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        assert _status(api, pid, tid, echo) == "SUBMITTED_TO_RESCALE"
        time.sleep(0.1)


def test_a_limit_set_between_two_submits_holds_the_next_job_at_once(api: HtcApi) -> None:
    pid, tid = api.project_and_task()
    api.submit_one(pid, tid, api.job_request(["true"]))
    api.wait_terminal(pid, tid, 1)  # a submit that was admitted at once
    api.request(
        "POST", f"/htc/projects/{pid}/limits", json={"vCPUs": 0, "modifierRole": "PROJECT_ADMIN"}, expect=201
    )
    held = api.submit_one(pid, tid, api.job_request(["true"]))
    _stays_held(api, pid, tid, held)
    api.request("DELETE", f"/htc/projects/{pid}/limits", expect=204)
    jobs = api.wait_terminal(pid, tid, 2)  # released by the scheduler once the limit is gone
    assert all(j["status"] == "SUCCEEDED" for j in jobs), jobs
    api.submit_one(pid, tid, api.job_request(["true"]))  # and admitted at submit again
    assert all(j["status"] == "SUCCEEDED" for j in api.wait_terminal(pid, tid, 3))


def test_a_workspace_limit_written_by_another_process_holds_the_next_job(
    start_server: Callable[..., HtcServer],
) -> None:
    """`htc admin set-workspace-limit` writes the database from another process, as another
    server of a cluster would: the running server's next submit sees it."""
    srv = start_server()
    api = srv.api()
    pid, tid = api.project_and_task()
    api.submit_one(pid, tid, api.job_request(["true"]))
    api.wait_terminal(pid, tid, 1)
    srv.cli("admin", "set-workspace-limit", "0")
    held = api.submit_one(pid, tid, api.job_request(["true"]))
    _stays_held(api, pid, tid, held)
    srv.cli("admin", "set-workspace-limit", "1")  # room for it: the scheduler's next round admits it
    assert all(j["status"] == "SUCCEEDED" for j in api.wait_terminal(pid, tid, 2))


def _token_of(api: HtcApi, pid: str, tid: str, echo: dict[str, Any]) -> str:
    return api.log_lines(pid, tid, f"{echo['parentJobId']}:0")[0].strip()


def test_batches_share_a_job_token_only_within_their_task_and_claims(
    module_server: HtcServer, api: HtcApi
) -> None:
    pid, tid = api.project_and_task()
    other = api.create_task(pid)["taskId"]
    show = ["sh", "-c", 'echo "$RESCALE_HTC_BEARER_TOKEN"']
    claims = [{"name": "team", "value": "blue"}]
    plain_a = api.submit_one(pid, tid, api.job_request(show))
    plain_b = api.submit_one(pid, tid, api.job_request(show))
    claimed = api.submit_one(pid, tid, api.job_request(show, claims=claims))
    elsewhere = api.submit_one(pid, other, api.job_request(show))
    api.wait_terminal(pid, tid, 3)
    api.wait_terminal(pid, other, 1)
    tokens = {
        "a": _token_of(api, pid, tid, plain_a),
        "b": _token_of(api, pid, tid, plain_b),
        "claimed": _token_of(api, pid, tid, claimed),
        "elsewhere": _token_of(api, pid, other, elsewhere),
    }
    seen = {name: jwt.decode(token, options={"verify_signature": False}) for name, token in tokens.items()}
    assert {name: c["taskId"] for name, c in seen.items()} == {
        "a": tid,
        "b": tid,
        "claimed": tid,
        "elsewhere": other,
    }
    assert seen["claimed"]["userDefined_team"] == "blue"
    assert not any(k.startswith("userDefined_") for name in ("a", "b", "elsewhere") for k in seen[name])
    for name, token in tokens.items():  # each works, within its own task only
        job_api = module_server.api(token)
        own = tid if name != "elsewhere" else other
        foreign = other if name != "elsewhere" else tid
        job_api.get(f"/htc/projects/{pid}/tasks/{own}/jobs")
        assert job_api.request("GET", f"/htc/projects/{pid}/tasks/{foreign}/jobs").status_code in (403, 404)
