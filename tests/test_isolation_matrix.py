"""Who reaches what: every credential x object x route family, asserted cell by cell (issue 13).

Credentials: the workspace admin, a project admin, a member, another workspace's admin, a job
token (scoped to one task), the same job token refreshed, a user's task storage token, a project
registry login token, no credentials, and forged ones. Objects, seen from the job's task T1 of
project P1 in workspace W1: T1 itself, a sibling task T2 of P1, a task of another project P2 of
W1, and a task of a project in another workspace W2. Route families, one representative call each:

    jobs      GET  /htc/projects/{p}/tasks/{t}/jobs
    tasks     GET  /htc/projects/{p}/tasks/{t}
    projects  GET  /htc/projects/{p}
    storage   GET  /htc/storage/list?prefix=projects/{p}/tasks/{t}/   (the object API)
    registry  GET  /htc/registry/token?scope=repository:{p}/app:pull  (Basic AWS:<credential>)
    metrics   GET  /htc/metrics                                         (workspace-wide)

docs/architecture.md#who-reaches-what has the same table in words. A registry answer is GRANTED
when the token it issues carries the asked access, EMPTY when it carries none (the Docker token
spec answers 200 with the granted subset).
"""

from __future__ import annotations

import base64
import uuid
from typing import Any

import httpx
import jwt
import pytest

OBJECTS = ("own", "sibling", "other_project", "other_workspace")
FAMILIES = ("jobs", "tasks", "projects", "storage", "registry", "metrics")
GRANTED, EMPTY = "GRANTED", "EMPTY"

USER_W1 = {
    "jobs": (200, 200, 200, 404),
    "tasks": (200, 200, 200, 404),
    "projects": (200, 200, 200, 404),
    "storage": (200, 200, 200, 403),
    "registry": (GRANTED, GRANTED, GRANTED, EMPTY),
    "metrics": (200,) * 4,
}
JOB = {
    "jobs": (200, 404, 404, 404),
    "tasks": (200, 404, 404, 404),
    "projects": (200, 200, 404, 404),
    "storage": (200, 403, 403, 403),
    "registry": (GRANTED, GRANTED, EMPTY, EMPTY),  # pull in its own project
    "metrics": (403,) * 4,
}
UNAUTHENTICATED = {family: (401,) * 4 for family in FAMILIES}
EXPECTED: dict[str, dict[str, tuple[Any, ...]]] = {
    "workspace admin": USER_W1,
    "project admin": USER_W1,
    "member": USER_W1,
    "other workspace admin": {
        "jobs": (404, 404, 404, 200),
        "tasks": (404, 404, 404, 200),
        "projects": (404, 404, 404, 200),
        "storage": (403, 403, 403, 200),
        "registry": (EMPTY, EMPTY, EMPTY, GRANTED),
        "metrics": (200,) * 4,
    },
    "job token": JOB,
    "refreshed job token": JOB,
    "storage token": {**UNAUTHENTICATED, "storage": (200, 403, 403, 403)},  # T1's, from a user
    "registry token": {**UNAUTHENTICATED, "registry": (GRANTED, GRANTED, EMPTY, EMPTY)},  # P1's
    "none": UNAUTHENTICATED,
    "forged": UNAUTHENTICATED,
}


def _key(module_server: Any, *args: str) -> str:
    return str(module_server.cli("admin", *args).stdout.split()[-1])


def _forged() -> str:
    header = base64.urlsafe_b64encode(b'{"alg":"RS256","typ":"JWT","kid":"x"}').rstrip(b"=").decode()
    claims = b'{"sub":"admin","typ":"bearer","exp":9999999999,"role":"WORKSPACE_ADMIN"}'
    return f"{header}.{base64.urlsafe_b64encode(claims).rstrip(b'=').decode()}.c2lnbmF0dXJl"


@pytest.mark.second_workspace
def test_every_credential_reaches_exactly_what_the_docs_say(module_server: Any, api: Any) -> None:
    p1, t1 = api.project_and_task()
    t2 = api.create_task(p1)["taskId"]
    p2, t3 = api.project_and_task()
    created = module_server.cli(
        "admin", "create-workspace", f"w2-{uuid.uuid4().hex[:6]}", "--admin-email", "w2@x.org"
    )
    w2_key = created.stdout.split()[-1]
    other = module_server.api(module_server.token(w2_key))
    p4, t4 = other.project_and_task()
    other.submit_one(p4, t4, other.job_request(["true"]))  # so W2's metrics name p4
    other.wait_terminal(p4, t4, 1)
    objects = {"own": (p1, t1), "sibling": (p1, t2), "other_project": (p2, t3), "other_workspace": (p4, t4)}

    echo = api.submit_one(
        p1, t1, api.job_request(["sh", "-c", 'echo "$RESCALE_HTC_BEARER_TOKEN $RESCALE_HTC_REFRESH_TOKEN"'])
    )
    api.wait_terminal(p1, t1, 1)
    job_bearer, job_refresh = api.log_lines(p1, t1, f"{echo['parentJobId']}:0")[0].split()
    refreshed = httpx.get(
        f"{module_server.api_url}/auth/token", headers={"Authorization": f"Refresh {job_refresh}"}
    )
    assert refreshed.status_code == 200, refreshed.text
    storage_token = api.get(f"/htc/projects/{p1}/tasks/{t1}/storage/token")["credentials"][
        "OPENHTC_STORAGE_TOKEN"
    ]
    registry_token = api.request("GET", f"/htc/projects/{p1}/container-registry/token", expect=200).text
    credentials = {
        "workspace admin": module_server.token(),
        "project admin": module_server.token(
            _key(module_server, "create-user", f"pa-{uuid.uuid4().hex[:6]}@x.org", "--role", "project-admin")
        ),
        "member": module_server.token(
            _key(module_server, "create-user", f"m-{uuid.uuid4().hex[:6]}@x.org", "--role", "member")
        ),
        "other workspace admin": module_server.token(w2_key),
        "job token": job_bearer,
        "refreshed job token": refreshed.json()["tokenValue"],
        "storage token": storage_token,
        "registry token": registry_token,
        "none": None,
        "forged": _forged(),
    }
    assert set(credentials) == set(EXPECTED)

    base = module_server.api_url
    actual: dict[str, dict[str, tuple[Any, ...]]] = {}
    with httpx.Client(timeout=30) as http:
        for who, token in credentials.items():
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            row: dict[str, tuple[Any, ...]] = {}
            for family in FAMILIES:
                row[family] = tuple(_call(http, base, family, token, headers, *objects[o]) for o in OBJECTS)
            actual[who] = row
        # metrics of a workspace name only its own projects
        w1 = http.get(
            f"{base}/htc/metrics", headers={"Authorization": f"Bearer {credentials['workspace admin']}"}
        ).text
        w2 = http.get(
            f"{base}/htc/metrics", headers={"Authorization": f"Bearer {credentials['other workspace admin']}"}
        ).text
    assert p1 in w1 and p4 not in w1 and p4 in w2 and p1 not in w2

    wrong = [
        f"{who:22} {family:9} {obj:16} expected {EXPECTED[who][family][i]!s:8} got {actual[who][family][i]}"
        for who in EXPECTED
        for family in FAMILIES
        for i, obj in enumerate(OBJECTS)
        if actual[who][family][i] != EXPECTED[who][family][i]
    ]
    assert not wrong, "cells that differ from the documented table:\n" + "\n".join(wrong)


def _call(
    http: httpx.Client, base: str, family: str, token: str | None, headers: dict[str, str], pid: str, tid: str
) -> Any:
    if family == "registry":
        auth = (
            {"Authorization": "Basic " + base64.b64encode(f"AWS:{token}".encode()).decode()} if token else {}
        )
        resp = http.get(
            f"{base}/htc/registry/token",
            params={"service": "openhtc", "scope": f"repository:{pid}/app:pull"},
            headers=auth,
        )
        if resp.status_code != 200:
            return resp.status_code
        access = jwt.decode(resp.json()["token"], options={"verify_signature": False}).get("access") or []
        return GRANTED if any("pull" in a["actions"] for a in access) else EMPTY
    path = {
        "jobs": f"/htc/projects/{pid}/tasks/{tid}/jobs",
        "tasks": f"/htc/projects/{pid}/tasks/{tid}",
        "projects": f"/htc/projects/{pid}",
        "storage": "/htc/storage/list",
        "metrics": "/htc/metrics",
    }[family]
    params = {"prefix": f"projects/{pid}/tasks/{tid}/"} if family == "storage" else None
    resp = http.get(base + path, headers=headers, params=params)
    assert resp.status_code < 500, resp.text
    return resp.status_code
