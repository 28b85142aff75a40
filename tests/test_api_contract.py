"""The wire contract, checked with raw HTTP (httpx) against a live ``htc server``.

Reference: ../shared/reference/rescale-htc-api-notes.md (§2 conventions, §3 endpoint table and
status codes, §4 lifecycles, §7 client quirks) and the OpenAPI file beside it. Every test runs
on SQLite and on PostgreSQL and creates its own project and task on the module's shared server,
except where it needs a server of its own (expired tokens, a one-vCPU executor).

One job with ``execTimeoutSeconds: 60`` (the minimum the spec allows) is submitted when the
module starts, so the timeout test at the end of the file does not add a minute of waiting.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from openhtc.client import JOB_STATUSES

REGION = "AWS_US_EAST_1"
ERROR_KEYS = ("error", "errorType", "errorDescription", "message")
# §2 "Nulls": the only HTCJob fields that may be null; every other absent field is omitted.
NULLABLE_JOB_FIELDS = {
    "completedAt", "startedAt", "instanceId", "maxGpus", "maxSwap", "statusReason", "failureCode",
    "container", "instanceLabels",
}  # fmt: skip
NULLABLE_EVENT_FIELDS = {"statusReason", "instanceId", "container", "instanceLabels"}


def tp(project_id: str, task_id: str) -> str:
    return f"/htc/projects/{project_id}/tasks/{task_id}"


def assert_error(resp: httpx.Response, status: int, field: str | None = None) -> dict[str, Any]:
    """An error response: the status, JSON, the superset body, and the offending field named."""
    assert resp.status_code == status, f"expected {status}, got {resp.status_code}: {resp.text[:2000]}"
    assert resp.headers.get("content-type", "").startswith("application/json"), resp.headers
    body = resp.json()
    for key in ERROR_KEYS:
        assert isinstance(body.get(key), str), f"error body lacks string {key!r}: {body}"
    if field:
        text = f"{body['errorDescription']} {body['message']}"
        assert field in text, f"the error does not name {field!r}: {body}"
    return dict(body)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_json(part: str) -> dict[str, Any]:
    return dict(json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))))


def rescale_instant(value: Any) -> bool:
    return isinstance(value, str) and value.endswith("Z") and "T" in value


def event_statuses(events: list[dict[str, Any]]) -> list[str]:
    return [e["status"] for e in events]


# --------------------------------------------------------------------------------------------
# module-wide: a job that must time out, started first
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def timeout_job(module_server: Any, db_kind: str, request: pytest.FixtureRequest) -> dict[str, Any]:
    """A job of execTimeoutSeconds=60 (the API's minimum), submitted when the module starts so its
    minute passes while the other tests run. Its test runs on one database (``one_db``): the
    timeout is the runtime's, tested per runtime in tests/containers/test_containment.py."""
    if request.config.getoption("--db") == "both" and db_kind != "sqlite":
        return {}  # the test does not run on this database
    api = module_server.api()
    project_id, task_id = api.project_and_task()
    request = api.job_request(["sleep", "300"], execTimeoutSeconds=60)
    submitted = api.submit_one(project_id, task_id, request)
    return {
        "project": project_id,
        "task": task_id,
        "job": f"{submitted['parentJobId']}:0",
        "at": time.monotonic(),
    }


# --------------------------------------------------------------------------------------------
# prefixes, content type, authentication
# --------------------------------------------------------------------------------------------


def test_routes_answer_under_api_v1_and_root(module_server: Any, api: Any) -> None:
    project = api.create_project()
    token = module_server.token()
    for prefix in ("/api/v1", ""):
        resp = httpx.get(
            f"{module_server.url}{prefix}/auth/token",
            headers={"Authorization": f"Token {module_server.api_key}"},
        )
        assert resp.status_code == 200, (prefix, resp.text)
        client = module_server.client(token, prefix=prefix)
        listed = client.get("/htc/projects", params={"pageSize": 1000})
        assert listed.status_code == 200 and listed.headers["content-type"].startswith("application/json")
        assert project["projectId"] in [p["projectId"] for p in listed.json()["items"]]
        one = client.get(f"/htc/projects/{project['projectId']}")
        assert one.status_code == 200 and one.json()["projectName"] == project["projectName"]


def test_api_key_exchanges_for_a_long_lived_jwt(module_server: Any) -> None:
    resp = httpx.get(
        f"{module_server.api_url}/auth/token", headers={"Authorization": f"Token {module_server.api_key}"}
    )
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("application/json")
    body = resp.json()
    assert isinstance(body["expiresIn"], int) and body["expiresIn"] >= 3 * 3600, body
    header, payload, signature = body["tokenValue"].split(".")
    assert b64url_json(header)["alg"] == "RS256" and signature
    claims = b64url_json(payload)
    assert claims["exp"] > time.time() + 3 * 3600 - 60 and "workspaceId" in claims


@pytest.mark.parametrize(
    "authorization",
    [None, "Token 0000000000000000000000000000000000000000", "Bearer abc", "Basic dXNlcjpwYXNz"],
    ids=["missing", "unknown-key", "bearer-instead-of-token", "basic"],
)
def test_token_endpoint_refuses_bad_credentials(module_server: Any, authorization: str | None) -> None:
    headers = {"Authorization": authorization} if authorization else {}
    resp = httpx.get(f"{module_server.api_url}/auth/token", headers=headers)
    assert resp.status_code == 401, resp.text


def _forged_tokens(real: str) -> dict[str, str]:
    header, payload, signature = real.split(".")
    claims = b64url_json(payload)
    tampered = dict(claims, workspaceId="99-9999999", exp=int(time.time()) + 99999)
    other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    kid = b64url_json(header).get("kid")
    return {
        "tampered-payload": f"{header}.{b64url(json.dumps(tampered).encode())}.{signature}",
        "alg-none": f"{b64url(json.dumps({'alg': 'none', 'typ': 'JWT'}).encode())}.{payload}.",
        "other-key-same-kid": jwt.encode(
            claims, other_key, algorithm="RS256", headers={"kid": kid} if kid else None
        ),
        "hs256-with-public-kid": jwt.encode(
            claims, "x" * 32, algorithm="HS256", headers={"kid": kid} if kid else None
        ),
        "garbage": "not.a.jwt",
    }


def test_protected_routes_refuse_missing_and_forged_tokens(module_server: Any) -> None:
    url = f"{module_server.api_url}/htc/projects"
    assert httpx.get(url).status_code == 401
    assert httpx.get(url, headers={"Authorization": f"Token {module_server.api_key}"}).status_code == 401
    assert httpx.get(url, headers={"Authorization": f"Bearer {module_server.api_key}"}).status_code == 401
    for name, token in _forged_tokens(module_server.token()).items():
        resp = httpx.get(url, headers={"Authorization": f"Bearer {token}"})
        assert resp.status_code == 401, f"{name}: {resp.status_code} {resp.text[:300]}"


def test_expired_tokens_are_refused(start_server: Callable[..., Any]) -> None:
    """A bearer token stops working once its exp has passed (server with 2-second tokens)."""
    srv = start_server(env={"OPENHTC_TOKEN_TTL_SECONDS": "2"})
    token = srv.token()
    exp = b64url_json(token.split(".")[1])["exp"]
    assert exp <= time.time() + 60, "OPENHTC_TOKEN_TTL_SECONDS was not applied"
    url = f"{srv.api_url}/htc/projects"
    assert httpx.get(url, headers={"Authorization": f"Bearer {token}"}).status_code == 200
    deadline = time.monotonic() + 30
    while True:
        resp = httpx.get(url, headers={"Authorization": f"Bearer {token}"})
        if resp.status_code == 401:
            break
        assert time.monotonic() < deadline, f"token still accepted {time.time() - exp:.0f} s after exp"
        time.sleep(0.5)


# --------------------------------------------------------------------------------------------
# status codes of the endpoint table
# --------------------------------------------------------------------------------------------


def test_project_and_task_status_codes(api: Any) -> None:
    project = api.request(
        "POST",
        "/htc/projects",
        json={"projectName": "codes", "projectDescription": "d", "regions": [REGION]},
        expect=200,
    ).json()
    pid = project["projectId"]
    assert project["regions"] == [REGION] and project["projectName"] == "codes"
    api.request("GET", f"/htc/projects/{pid}", expect=200)
    patched = api.request("PATCH", f"/htc/projects/{pid}", json={"regions": [REGION]}, expect=200).json()
    assert REGION in patched["regions"]

    task = api.request(
        "POST", f"/htc/projects/{pid}/tasks", json={"taskName": "t", "taskDescription": "d"}, expect=200
    ).json()
    tid = task["taskId"]
    assert (
        task["lifecycleStatus"] == "ACTIVE"
        and task["projectId"] == pid
        and rescale_instant(task["createdAt"])
    )
    api.request("GET", tp(pid, tid), expect=200)
    archived = api.request("PATCH", tp(pid, tid), json={"lifecycleStatus": "ARCHIVED"}, expect=200).json()
    assert archived["lifecycleStatus"] == "ARCHIVED"
    api.request("PATCH", tp(pid, tid), json={"lifecycleStatus": "ACTIVE"}, expect=200)
    deleted = api.request("DELETE", tp(pid, tid), expect=200)
    assert deleted.headers["content-type"].startswith("application/json")
    assert deleted.json()["lifecycleStatus"] == "DELETED" and rescale_instant(deleted.json()["deletedAt"])
    assert api.get(tp(pid, tid))["lifecycleStatus"] == "DELETED"
    listed = api.list_all(f"/htc/projects/{pid}/tasks")
    assert [t["lifecycleStatus"] for t in listed if t["taskId"] == tid] == ["DELETED"]


def test_limits_dimensions_and_retention_status_codes(module_server: Any, api: Any) -> None:
    pid = api.create_project()["projectId"]
    workspace_id = b64url_json(module_server.token().split(".")[1])["workspaceId"]

    dims = api.get(f"/htc/workspaces/{workspace_id}/dimensions")
    assert isinstance(dims, list)
    chosen = [{k: v for k, v in d.items() if k != "derived"} for d in dims[:1]]
    put = api.request("PUT", f"/htc/projects/{pid}/dimensions", json=chosen, expect=201).json()
    assert isinstance(put, list) and len(put) == len(chosen)
    assert isinstance(api.get(f"/htc/projects/{pid}/dimensions"), list)
    assert api.request("PUT", f"/htc/projects/{pid}/dimensions", json=[], expect=201).json() == []

    limit = api.request(
        "POST", f"/htc/projects/{pid}/limits", json={"vCPUs": 5, "modifierRole": "PROJECT_ADMIN"}, expect=201
    ).json()
    assert limit["vCPUs"] == 5 and isinstance(limit["id"], int)
    assert [x["vCPUs"] for x in api.get(f"/htc/projects/{pid}/limits")] == [5]  # a bare array
    assert api.get(f"/htc/projects/{pid}/limits/{limit['id']}")["vCPUs"] == 5
    assert (
        api.request(
            "PATCH", f"/htc/projects/{pid}/limits/{limit['id']}", json={"vCPUs": 7}, expect=200
        ).json()["vCPUs"]
        == 7
    )
    assert api.request("DELETE", f"/htc/projects/{pid}/limits/{limit['id']}", expect=204).content == b""
    api.request(
        "POST",
        f"/htc/projects/{pid}/limits",
        json={"vCPUs": 5, "modifierRole": "WORKSPACE_ADMIN"},
        expect=201,
    )
    assert api.request("DELETE", f"/htc/projects/{pid}/limits", expect=204).content == b""
    assert api.get(f"/htc/projects/{pid}/limits") == []

    policy = {"deleteAfter": 48, "archiveAfter": 24}
    put_policy = api.request(
        "PUT", f"/htc/projects/{pid}/task-retention-policy", json=policy, expect=201
    ).json()
    assert put_policy["deleteAfter"] == 48 and put_policy["archiveAfter"] == 24
    assert api.get(f"/htc/projects/{pid}/task-retention-policy")["deleteAfter"] == 48
    api.request("DELETE", f"/htc/projects/{pid}/task-retention-policy", expect=204)
    assert_error(api.request("GET", f"/htc/projects/{pid}/task-retention-policy"), 404)

    ws_policy = api.request(
        "PUT",
        f"/htc/workspaces/{workspace_id}/task-retention-policy",
        json={"deleteAfter": 0, "archiveAfter": 0},
        expect=201,
    ).json()
    assert ws_policy["deleteAfter"] == 0
    api.request("GET", f"/htc/workspaces/{workspace_id}/task-retention-policy", expect=200)
    assert "vCPUs" in api.get(f"/htc/workspaces/{workspace_id}/limits")
    regions = api.get("/htc/regions")
    assert isinstance(regions, list) and REGION in [r["region"] for r in regions]
    assert api.get(f"/htc/regions/{REGION}")["region"] == REGION
    whoami = api.get("/auth/token/whoami")
    assert isinstance(whoami, dict) and whoami["workspaceId"] == workspace_id


def test_job_endpoint_status_codes_and_shapes(api: Any) -> None:
    pid, tid = api.project_and_task()
    request = api.job_request(["sh", "-c", "echo hi"], batch_size=2)
    resp = api.request("POST", f"{tp(pid, tid)}/jobs/batch", json=[request], expect=200)
    echo = resp.json()[0]
    for key in ("parentJobId", "group", "projectId", "taskId", "batchSize", "htcJobDefinition"):
        assert key in echo, f"submit echo lacks {key}: {echo}"
    assert (echo["projectId"], echo["taskId"], echo["batchSize"]) == (pid, tid, 2)
    assert isinstance(echo["group"], str) and echo["group"]
    assert echo["htcJobDefinition"]["imageName"] == "busybox:latest"

    job_id = f"{echo['parentJobId']}:1"
    job = api.request("GET", f"{tp(pid, tid)}/jobs/{job_id}", expect=200).json()  # ':' in the path segment
    assert job["jobUUID"] == job_id and "jobName" not in job
    api.wait_terminal(pid, tid, 2)
    job = api.job(pid, tid, job_id)
    assert job["status"] == "SUCCEEDED" and job["architecture"] == "X86" and job["group"] == echo["group"]
    for key in ("createdAt", "startedAt", "completedAt", "updatedAt"):
        assert rescale_instant(job.get(key)), f"{key}={job.get(key)!r}"
    nulls = {k for k, v in job.items() if v is None}
    assert nulls <= NULLABLE_JOB_FIELDS, f"null where the Go client forbids it: {nulls - NULLABLE_JOB_FIELDS}"

    events = api.events(pid, tid, job_id)
    for event in events:
        assert event["status"] in JOB_STATUSES and rescale_instant(event["dateTime"])
        assert {k for k, v in event.items() if v is None} <= NULLABLE_EVENT_FIELDS, event
    ordered = sorted(events, key=lambda e: (e["dateTime"], JOB_STATUSES.index(e["status"])))
    assert event_statuses(ordered)[-1] == "SUCCEEDED"
    assert set(JOB_STATUSES[:5]) <= set(event_statuses(events)), event_statuses(events)

    assert api.get(f"{tp(pid, tid)}/summary-statistics")["jobStatuses"]["SUCCEEDED"] == 2
    group_summary = api.pages(f"{tp(pid, tid)}/group-summary-statistics")[0]["items"]
    assert [g["group"] for g in group_summary] == [echo["group"]]
    assert api.get(f"{tp(pid, tid)}/groups") == [echo["group"]]
    cancel = api.request("POST", f"{tp(pid, tid)}/jobs/cancel", expect=200)
    assert cancel.content == b"", cancel.text


@pytest.mark.parametrize(
    "path",
    [
        "/htc/projects/{missing}",
        "/htc/projects/{missing}/tasks",
        "/htc/projects/{pid}/tasks/{missing}",
        "/htc/projects/{pid}/tasks/{missing}/summary-statistics",
        "/htc/projects/{pid}/tasks/{tid}/jobs/{missing}:0",
        "/htc/projects/{pid}/tasks/{tid}/jobs/{parent}:5",
        "/htc/projects/{pid}/tasks/{other}/jobs/{parent}:0",
        "/htc/projects/{pid}/tasks/{tid}/jobs/{missing}:0/events",
        "/htc/projects/{pid}/tasks/{tid}/jobs/{missing}:0/logs",
        "/htc/projects/{pid}/limits/987654",
        "/htc/regions/{disabled_region}",
    ],
)
def test_unknown_ids_answer_404(api: Any, path: str) -> None:
    pid, tid = api.project_and_task()
    other = api.create_task(pid)["taskId"]
    parent = api.submit_one(pid, tid, api.job_request(["true"], batch_size=2))["parentJobId"]
    enabled = {r["region"] for r in api.get("/htc/regions")}
    disabled = next(r for r in ("AWS_EU_WEST_3", "GCP_US_EAST_4", "AWS_SA_EAST_1") if r not in enabled)
    url = path.format(
        missing=uuid.uuid4(), pid=pid, tid=tid, other=other, parent=parent, disabled_region=disabled
    )
    assert_error(api.request("GET", url), 404)


def test_submitting_to_a_deleted_task_is_refused(api: Any) -> None:
    pid, tid = api.project_and_task()
    api.request("DELETE", tp(pid, tid), expect=200)
    resp = api.request("POST", f"{tp(pid, tid)}/jobs/batch", json=[api.job_request(["true"])])
    assert 400 <= resp.status_code < 500, resp.text
    assert_error(resp, resp.status_code)
    assert api.jobs(pid, tid) == []


# --------------------------------------------------------------------------------------------
# submit validation: 400 naming the field, and nothing stored
# --------------------------------------------------------------------------------------------


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(request: dict[str, Any]) -> None:
        *parents, leaf = path.split(".")
        target = request
        for part in parents:
            target = target[part]
        if value is _DELETE:
            del target[leaf]
        else:
            target[leaf] = value

    return mutate


_DELETE = object()
D = "htcJobDefinition"
INVALID = {
    "image-name-spaces": (_set(f"{D}.imageName", "my image"), "imageName"),
    "image-name-uppercase": (_set(f"{D}.imageName", "Busybox:latest"), "imageName"),
    "image-name-missing": (_set(f"{D}.imageName", _DELETE), "imageName"),
    "maxVCpus-0": (_set(f"{D}.maxVCpus", 0), "maxVCpus"),
    "maxVCpus-65": (_set(f"{D}.maxVCpus", 65), "maxVCpus"),
    "maxMemory-3": (_set(f"{D}.maxMemory", 3), "maxMemory"),
    "execTimeout-59": (_set(f"{D}.execTimeoutSeconds", 59), "execTimeoutSeconds"),
    "env-AWS_BATCH_JOB_ID": (_set(f"{D}.envs", [{"name": "AWS_BATCH_JOB_ID", "value": "x"}]), "envs"),
    "env-AWS_BATCH_JOB_ARRAY_INDEX": (
        _set(f"{D}.envs", [{"name": "AWS_BATCH_JOB_ARRAY_INDEX", "value": "1"}]),
        "envs",
    ),
    "env-RESCALE_JOB_ID": (_set(f"{D}.envs", [{"name": "RESCALE_JOB_ID", "value": "x"}]), "envs"),
    "env-RESCALE_PROJECT_ID": (_set(f"{D}.envs", [{"name": "RESCALE_PROJECT_ID", "value": "x"}]), "envs"),
    "env-AWS_ACCESS_KEY_ID": (_set(f"{D}.envs", [{"name": "AWS_ACCESS_KEY_ID", "value": "x"}]), "envs"),
    "env-TASK_SHARED_FOLDER": (_set(f"{D}.envs", [{"name": "TASK_SHARED_FOLDER", "value": "x"}]), "envs"),
    "env-RESCALE_HTC_BEARER_TOKEN": (
        _set(f"{D}.envs", [{"name": "RESCALE_HTC_BEARER_TOKEN", "value": "x"}]),
        "envs",
    ),
    "env-RDF_": (_set(f"{D}.envs", [{"name": "RDF_AGENT", "value": "x"}]), "envs"),
    "priority-enum": (_set(f"{D}.priority", "URGENT"), "priority"),
    "architecture-enum": (_set(f"{D}.architecture", "RISCV"), "architecture"),
    "architecture-unsupported-in-region": (_set(f"{D}.architecture", "AARCH64"), "architecture"),
    "batchSize-0": (_set("batchSize", 0), "batchSize"),
    "batchSize-1001": (_set("batchSize", 1001), "batchSize"),
    "maxRetries-11": (_set("retryStrategy", {"maxRetries": 11}), "maxRetries"),
    "region-unknown": (_set("regions", ["MARS_NORTH_1"]), "region"),
    "definition-missing": (_set(D, _DELETE), D),
}


@pytest.mark.parametrize("mutate,field", INVALID.values(), ids=INVALID.keys())
def test_invalid_submissions_answer_400_naming_the_field(
    api: Any, mutate: Callable[..., None], field: str
) -> None:
    pid, tid = api.project_and_task()
    request = api.job_request(["true"], batch_size=2)
    mutate(request)
    resp = api.request("POST", f"{tp(pid, tid)}/jobs/batch", json=[request])
    assert_error(resp, 400, field)
    assert api.jobs(pid, tid) == []
    assert set(api.summary(pid, tid).values()) == {0}


def test_one_invalid_batch_rejects_the_whole_submission(api: Any) -> None:
    pid, tid = api.project_and_task()
    good = api.job_request(["true"], batch_size=3)
    bad = api.job_request(["true"], maxVCpus=99)
    assert_error(api.request("POST", f"{tp(pid, tid)}/jobs/batch", json=[good, bad]), 400, "maxVCpus")
    assert api.jobs(pid, tid) == []


@pytest.mark.parametrize(
    "body", ["{not json", "[]", '{"jobName": "x"}'], ids=["malformed", "empty-array", "object"]
)
def test_malformed_submit_bodies_answer_400(api: Any, body: str) -> None:
    pid, tid = api.project_and_task()
    resp = api.request(
        "POST", f"{tp(pid, tid)}/jobs/batch", content=body, headers={"Content-Type": "application/json"}
    )
    assert_error(resp, 400)
    assert api.jobs(pid, tid) == []


def test_unknown_request_fields_are_ignored(api: Any) -> None:
    project = api.request(
        "POST",
        "/htc/projects",
        json={"projectName": "x", "projectDescription": "y", "futureField": {"a": 1}},
        expect=200,
    ).json()
    pid = project["projectId"]
    tid = api.request(
        "POST",
        f"/htc/projects/{pid}/tasks",
        json={"taskName": "t", "taskDescription": "", "colour": "red"},
        expect=200,
    ).json()["taskId"]
    # What rescalehtc sends: a string `region` and `cloudProvider`, no `regions`, plus unknown keys.
    request = api.job_request(["true"])
    del request["regions"]
    request.update(region=REGION, cloudProvider="AWS", somethingNew=True, jobDefinitionName="ignored")
    request[D]["futureOption"] = {"x": 1}
    request[D]["tags"] = {"k": "v"}
    request[D]["claims"] = [{"name": "c", "value": "v"}]
    request[D]["maxSwap"] = 0
    request[D]["maxDiskGiB"] = 10
    echo = api.submit_one(pid, tid, request)
    api.wait_terminal(pid, tid, 1)
    assert api.job(pid, tid, f"{echo['parentJobId']}:0")["status"] == "SUCCEEDED"


# --------------------------------------------------------------------------------------------
# pagination
# --------------------------------------------------------------------------------------------


def test_pagination_envelope(module_server: Any, api: Any) -> None:
    pid = api.create_project()["projectId"]
    created = [api.create_task(pid, f"page-{i}")["taskId"] for i in range(7)]
    pages = api.pages(f"/htc/projects/{pid}/tasks", pageSize=3)  # checks next/emptiness rules
    assert [len(p["items"]) for p in pages] == [3, 3, 1]
    assert "next" not in pages[-1]
    for page in pages[:-1]:
        assert page["next"].startswith(module_server.url + "/")
    listed = [t["taskId"] for p in pages for t in p["items"]]
    assert sorted(listed) == sorted(created) and len(set(listed)) == 7
    # exact multiple: no empty page may carry next
    for size in (7, 1):
        ids = [
            t["taskId"] for p in api.pages(f"/htc/projects/{pid}/tasks", pageSize=size) for t in p["items"]
        ]
        assert sorted(ids) == sorted(created)


def test_job_list_pagination(api: Any) -> None:
    pid, tid = api.project_and_task()
    parent = api.submit_one(pid, tid, api.job_request(["true"], batch_size=10))["parentJobId"]
    pages = api.pages(f"{tp(pid, tid)}/jobs", pageSize=4)
    assert [len(p["items"]) for p in pages] == [4, 4, 2]
    ids = [j["jobUUID"] for p in pages for j in p["items"]]
    assert sorted(ids) == sorted(f"{parent}:{i}" for i in range(10))


def test_next_is_built_from_forwarded_headers(api: Any) -> None:
    """Behind a TLS proxy, `next` must point at the proxy or rescalehtc stops after page 1."""
    pid = api.create_project()["projectId"]
    for i in range(3):
        api.create_task(pid, f"fwd-{i}")
    resp = api.request(
        "GET",
        f"/htc/projects/{pid}/tasks",
        params={"pageSize": 2},
        headers={"X-Forwarded-Proto": "https", "X-Forwarded-Host": "htc.example.org"},
        expect=200,
    )
    assert resp.json()["next"].startswith("https://htc.example.org/"), resp.json()["next"]


def test_duplicated_page_size_takes_the_first(api: Any) -> None:
    """rescalehtc re-sends pageSize on `next` URLs, so the query carries it twice."""
    pid = api.create_project()["projectId"]
    for i in range(4):
        api.create_task(pid, f"dup-{i}")
    resp = api.request("GET", f"/htc/projects/{pid}/tasks?pageSize=2&pageSize=50", expect=200)
    assert len(resp.json()["items"]) == 2


def test_keyset_paging_is_stable_under_inserts(api: Any) -> None:
    pid, tid = api.project_and_task()
    first = api.submit_one(pid, tid, api.job_request(["true"], batch_size=6))["parentJobId"]
    page1 = api.request("GET", f"{tp(pid, tid)}/jobs", params={"pageSize": 3}, expect=200)
    second = api.submit_one(pid, tid, api.job_request(["true"], batch_size=6))["parentJobId"]
    seen = [j["jobUUID"] for page in api.pages_from(page1) for j in page["items"]]
    assert len(seen) == len(set(seen)), f"duplicates across pages: {Counter(seen).most_common(3)}"
    originals = {f"{first}:{i}" for i in range(6)}
    assert originals <= set(seen), f"skipped: {originals - set(seen)}"
    assert set(seen) <= originals | {f"{second}:{i}" for i in range(6)}

    tasks_before = [api.create_task(pid)["taskId"] for _ in range(4)]
    page1 = api.request("GET", f"/htc/projects/{pid}/tasks", params={"pageSize": 2}, expect=200)
    for _ in range(3):
        api.create_task(pid)
    seen = [t["taskId"] for page in api.pages_from(page1) for t in page["items"]]
    assert len(seen) == len(set(seen)) and set([*tasks_before, tid]) <= set(seen)


# --------------------------------------------------------------------------------------------
# what jobs see and report
# --------------------------------------------------------------------------------------------


def test_runtime_environment_is_injected(api: Any) -> None:
    pid, tid = api.project_and_task()
    names = [
        "AWS_BATCH_JOB_ARRAY_INDEX", "AWS_BATCH_JOB_ID", "AWS_BATCH_JOB_ATTEMPT", "RESCALE_JOB_ID",
        "RESCALE_TASK_ID", "RESCALE_PROJECT_ID", "RESCALE_HTC_TASK_ID", "RESCALE_HTC_PROJECT_ID",
        "RESCALE_HTC_REGION", "GREETING",
    ]  # fmt: skip
    script = "; ".join(f'echo "{n}=${n}"' for n in names)
    envs = [{"name": "GREETING", "value": "hello world"}]
    parent = api.submit_one(pid, tid, api.job_request(["sh", "-c", script], batch_size=3, envs=envs))[
        "parentJobId"
    ]
    api.wait_terminal(pid, tid, 3)
    for i in range(3):
        job_id = f"{parent}:{i}"
        env = dict(line.split("=", 1) for line in api.log_lines(pid, tid, job_id))
        assert env["AWS_BATCH_JOB_ARRAY_INDEX"] == str(i)
        assert env["RESCALE_JOB_ID"] == job_id
        assert env["RESCALE_TASK_ID"] == env["RESCALE_HTC_TASK_ID"] == tid
        assert env["RESCALE_PROJECT_ID"] == env["RESCALE_HTC_PROJECT_ID"] == pid
        assert env["RESCALE_HTC_REGION"] == REGION
        assert env["AWS_BATCH_JOB_ID"] and env["AWS_BATCH_JOB_ATTEMPT"]
        assert env["GREETING"] == "hello world"


def test_single_job_batch_still_gets_index_zero(api: Any) -> None:
    pid, tid = api.project_and_task()
    parent = api.submit_one(pid, tid, api.job_request(["sh", "-c", 'echo "i=$AWS_BATCH_JOB_ARRAY_INDEX"']))[
        "parentJobId"
    ]
    api.wait_terminal(pid, tid, 1)
    assert api.log_lines(pid, tid, f"{parent}:0") == ["i=0"]


def test_nonzero_exit_fails_with_exit_code(api: Any) -> None:
    pid, tid = api.project_and_task()
    parent = api.submit_one(pid, tid, api.job_request(["sh", "-c", "exit 3"]))["parentJobId"]
    api.wait_terminal(pid, tid, 1)
    job = api.job(pid, tid, f"{parent}:0")
    assert job["status"] == "FAILED" and job["failureCode"] == "ErrorNonZeroContainerExitCode"
    assert job["container"]["exitCode"] == 3
    assert rescale_instant(job["completedAt"])
    assert event_statuses(api.events(pid, tid, f"{parent}:0")).count("FAILED") >= 1


def test_retries_run_again_until_success(api: Any, tmp_path: Any) -> None:
    flag = tmp_path / "second-attempt"
    script = f'if [ -e "{flag}" ]; then echo second; else touch "{flag}"; echo first; exit 1; fi'
    pid, tid = api.project_and_task()
    parent = api.submit_one(pid, tid, api.job_request(["sh", "-c", script], max_retries=2))["parentJobId"]
    api.wait_terminal(pid, tid, 1)
    job_id = f"{parent}:0"
    assert api.job(pid, tid, job_id)["status"] == "SUCCEEDED"
    statuses = event_statuses(api.events(pid, tid, job_id))
    assert statuses.count("RUNNING") == 2, statuses
    assert "second" in api.log_lines(pid, tid, job_id)


def test_retries_stop_after_max_retries(api: Any) -> None:
    pid, tid = api.project_and_task()
    parent = api.submit_one(pid, tid, api.job_request(["sh", "-c", "exit 1"], max_retries=2))["parentJobId"]
    api.wait_terminal(pid, tid, 1)
    job = api.job(pid, tid, f"{parent}:0")
    assert job["status"] == "FAILED" and job["failureCode"] == "ErrorNonZeroContainerExitCode"
    statuses = event_statuses(api.events(pid, tid, f"{parent}:0"))
    assert statuses.count("RUNNING") == 3, statuses  # the first attempt and two retries
    api.assert_summary_matches_jobs(pid, tid, 1)


def test_logs_newest_first_sort_asc_and_paging(api: Any) -> None:
    pid, tid = api.project_and_task()
    parent = api.submit_one(
        pid, tid, api.job_request(["sh", "-c", "for i in $(seq 1 25); do echo line-$i; done"])
    )["parentJobId"]
    api.wait_terminal(pid, tid, 1)
    path = f"{tp(pid, tid)}/jobs/{parent}:0/logs"
    expected = [f"line-{i}" for i in range(1, 26)]
    default = api.list_all(path)
    assert [e["message"] for e in default] == expected[::-1], "logs must be newest first by default"
    assert all(rescale_instant(e["timestamp"]) for e in default)
    assert [e["message"] for e in api.list_all(path, sort="asc")] == expected
    assert [e["message"] for e in api.list_all(path, sort="desc")] == expected[::-1]
    pages = api.pages(path, pageSize=10, sort="asc")
    assert [len(p["items"]) for p in pages] == [10, 10, 5]
    assert [e["message"] for p in pages for e in p["items"]] == expected
    # rescalehtc's last_n_lines: one page of pageSize=N, newest first
    tail = api.request("GET", path, params={"pageSize": 4}, expect=200).json()
    assert [e["message"] for e in tail["items"]] == expected[:-5:-1]


def test_summary_filters_and_views_agree_with_the_job_list(api: Any) -> None:
    pid, tid = api.project_and_task()
    ok = api.submit_one(pid, tid, api.job_request(["true"], batch_size=3), group="good")
    bad = api.submit_one(pid, tid, api.job_request(["sh", "-c", "exit 2"], batch_size=2), group="bad")
    assert (ok["group"], bad["group"]) == ("good", "bad")
    api.wait_terminal(pid, tid, 5)
    summary = api.assert_summary_matches_jobs(pid, tid, 5)
    assert (summary["SUCCEEDED"], summary["FAILED"]) == (3, 2)

    failed = api.jobs(pid, tid, status="FAILED")
    assert sorted(j["jobUUID"] for j in failed) == [f"{bad['parentJobId']}:{i}" for i in range(2)]
    assert {j["group"] for j in api.jobs(pid, tid, group="good")} == {"good"}
    assert len(api.jobs(pid, tid, group="good")) == 3
    picked = api.jobs(pid, tid, jobId=[f"{ok['parentJobId']}:0", f"{bad['parentJobId']}:1"])
    assert sorted(j["jobUUID"] for j in picked) == sorted(
        [f"{ok['parentJobId']}:0", f"{bad['parentJobId']}:1"]
    )
    simple = api.jobs(pid, tid, viewType="SIMPLE")
    assert len(simple) == 5 and all("jobUUID" in j and "status" in j for j in simple)

    assert sorted(api.get(f"{tp(pid, tid)}/groups")) == ["bad", "good"]
    per_group = api.list_all(f"{tp(pid, tid)}/group-summary-statistics", group="bad")
    assert [(g["group"], g["jobStatuses"]["FAILED"], g["jobStatuses"]["SUCCEEDED"]) for g in per_group] == [
        ("bad", 2, 0)
    ]
    everything = {
        g["group"]: g["jobStatuses"] for g in api.list_all(f"{tp(pid, tid)}/group-summary-statistics")
    }
    assert set(everything) == {"good", "bad"} and set(everything["good"]) == set(JOB_STATUSES)


# --------------------------------------------------------------------------------------------
# cancel, limits, priority
# --------------------------------------------------------------------------------------------


def test_cancel_fails_running_and_queued_jobs_and_stops_processes(api: Any, marker: Any) -> None:
    pid, tid = api.project_and_task()
    parent = api.submit_one(pid, tid, api.job_request(["sleep", "120"], batch_size=4, envs=marker.envs))[
        "parentJobId"
    ]
    api.wait_jobs(pid, tid, lambda js: any(j["status"] == "RUNNING" for j in js), what="a RUNNING job")
    assert marker.pids(), "the RUNNING job has no process on the host"
    api.cancel(pid, tid)
    jobs = api.wait_terminal(pid, tid, 4, timeout=30)
    assert {j["status"] for j in jobs} == {"FAILED"}
    for i in range(4):
        events = api.events(pid, tid, f"{parent}:{i}")
        assert any(e.get("userCancelledEvent") is True for e in events), events
    api.assert_summary_matches_jobs(pid, tid, 4)
    deadline = time.monotonic() + 15
    while marker.pids():
        assert time.monotonic() < deadline, f"cancelled job processes still alive: {marker.pids()}"
        time.sleep(0.2)


def test_cancel_with_group_cancels_only_that_group(api: Any) -> None:
    pid, tid = api.project_and_task()
    api.submit_one(pid, tid, api.job_request(["sleep", "120"], batch_size=2), group="stop-me")
    api.submit_one(pid, tid, api.job_request(["sleep", "120"], batch_size=2), group="keep-me")
    api.cancel(pid, tid, group="stop-me")
    api.wait_jobs(
        pid,
        tid,
        lambda js: len(js) == 2 and all(j["status"] == "FAILED" for j in js),
        group="stop-me",
        what="group stop-me cancelled",
    )
    assert all(j["status"] not in ("SUCCEEDED", "FAILED") for j in api.jobs(pid, tid, group="keep-me"))
    api.cancel(pid, tid)
    api.wait_terminal(pid, tid, 4, timeout=30)


def test_vcpu_limit_holds_jobs_until_limits_are_deleted(api: Any) -> None:
    pid, tid = api.project_and_task()
    api.request(
        "POST", f"/htc/projects/{pid}/limits", json={"vCPUs": 1, "modifierRole": "PROJECT_ADMIN"}, expect=201
    )
    api.submit_one(pid, tid, api.job_request(["sleep", "120"], batch_size=3))
    api.wait_jobs(
        pid, tid, lambda js: any(j["status"] == "RUNNING" for j in js), what="one admitted job to run"
    )
    deadline = time.monotonic() + 3  # a bounded look: the other two stay held
    while time.monotonic() < deadline:
        counts = Counter(j["status"] for j in api.jobs(pid, tid))
        assert counts["SUBMITTED_TO_RESCALE"] == 2, dict(counts)
        time.sleep(0.3)
    api.request("DELETE", f"/htc/projects/{pid}/limits", expect=204)
    api.wait_admitted(pid, tid, timeout=30, what="held jobs to be released")
    api.cancel(pid, tid)
    api.wait_terminal(pid, tid, 3, timeout=30)


def test_priority_jobs_start_before_economy_jobs(
    start_server: Callable[..., Any], instant: Callable[[str], float]
) -> None:
    """On a one-vCPU executor, queued ON_DEMAND_PRIORITY jobs run before ON_DEMAND_ECONOMY ones
    submitted in the same request ahead of them."""
    srv = start_server(env={"OPENHTC_EXECUTOR_VCPUS": "1"})
    api = srv.api()
    pid, tid = api.project_and_task()
    api.submit_one(pid, tid, api.job_request(["sleep", "2"]))
    api.wait_jobs(pid, tid, lambda js: js[0]["status"] == "RUNNING", what="the blocker to run")
    economy, priority = api.submit(
        pid,
        tid,
        api.job_request(["true"], batch_size=3, priority="ON_DEMAND_ECONOMY"),
        api.job_request(["true"], batch_size=3, priority="ON_DEMAND_PRIORITY"),
    )
    jobs = {j["jobUUID"]: j for j in api.wait_terminal(pid, tid, 7)}
    started = {k: instant(j["startedAt"]) for k, j in jobs.items()}
    prio = [started[f"{priority['parentJobId']}:{i}"] for i in range(3)]
    econ = [started[f"{economy['parentJobId']}:{i}"] for i in range(3)]
    assert max(prio) <= min(econ), f"priority started {prio}, economy started {econ}"


# --------------------------------------------------------------------------------------------
# roles (tentative: uses `htc admin create-user`)
# --------------------------------------------------------------------------------------------


def test_member_key_works_but_cannot_change_workspace_retention(module_server: Any) -> None:
    result = module_server.cli(
        "admin", "create-user", f"member-{uuid.uuid4().hex[:6]}@example.org", "--role", "member"
    )
    key = result.stdout.split()[-1]
    member = module_server.api(module_server.token(key))
    assert isinstance(member.get("/htc/projects")["items"], list)
    workspace_id = member.get("/auth/token/whoami")["workspaceId"]
    resp = member.request(
        "PUT",
        f"/htc/workspaces/{workspace_id}/task-retention-policy",
        json={"deleteAfter": 1, "archiveAfter": 1},
    )
    assert resp.status_code == 403, resp.text  # the spec's "Not Allowed"


@pytest.mark.second_workspace
def test_another_workspace_sees_nothing_of_ours(module_server: Any, api: Any) -> None:
    """Tenancy: everything of workspace A answers 404 to workspace B's admin."""
    pid, tid = api.project_and_task()
    parent = api.submit_one(pid, tid, api.job_request(["true"]))["parentJobId"]
    api.wait_terminal(pid, tid, 1)
    result = module_server.cli(
        "admin", "create-workspace", f"other-{uuid.uuid4().hex[:6]}", "--admin-email", "b@x.org"
    )
    workspace_id, key = result.stdout.split()[-2:]
    other = module_server.api(module_server.token(key))
    assert other.get("/auth/token/whoami")["workspaceId"] == workspace_id
    assert workspace_id != api.get("/auth/token/whoami")["workspaceId"]
    assert pid not in [p["projectId"] for p in other.list_all("/htc/projects")]
    job = f"{tp(pid, tid)}/jobs/{parent}:0"
    for path in (
        f"/htc/projects/{pid}",
        tp(pid, tid),
        job,
        f"{job}/events",
        f"{job}/logs",
        f"{tp(pid, tid)}/jobs",
    ):
        assert_error(other.request("GET", path), 404)
    assert_error(other.request("POST", f"{tp(pid, tid)}/jobs/batch", json=[other.job_request(["true"])]), 404)
    assert_error(other.request("POST", f"{tp(pid, tid)}/jobs/cancel"), 404)
    assert_error(other.request("DELETE", tp(pid, tid)), 404)
    assert api.get(tp(pid, tid))["lifecycleStatus"] == "ACTIVE"
    # and the new workspace works on its own
    own_pid, own_tid = other.project_and_task()
    other.submit_one(own_pid, own_tid, other.job_request(["true"]))
    assert other.wait_terminal(own_pid, own_tid, 1)[0]["status"] == "SUCCEEDED"


# --------------------------------------------------------------------------------------------
# last: the job submitted when the module started has had its minute
# --------------------------------------------------------------------------------------------


@pytest.mark.one_db
def test_exec_timeout_fails_the_job_with_error_timeout(
    api: Any, timeout_job: dict[str, Any], instant: Callable[[str], float]
) -> None:
    pid, tid, job_id = timeout_job["project"], timeout_job["task"], timeout_job["job"]
    remaining = 150 - (time.monotonic() - timeout_job["at"])
    api.wait_terminal(pid, tid, 1, timeout=max(remaining, 5))
    job = api.job(pid, tid, job_id)
    assert job["status"] == "FAILED" and job["failureCode"] == "ErrorTimeout", job
    took = instant(job["completedAt"]) - instant(job["startedAt"])
    assert 55 <= took < 120, f"ran {took:.0f} s with execTimeoutSeconds=60"


def test_project_dimensions_restrict_what_jobs_may_run(api: Any) -> None:
    pid, tid = api.project_and_task()
    region = api.get(f"/htc/projects/{pid}")["regions"][0]
    resp = api.request(
        "PUT", f"/htc/projects/{pid}/dimensions", json=[{"region": region, "priority": "ON_DEMAND_ECONOMY"}]
    )
    assert resp.status_code == 201
    before = len(api.get(f"/htc/projects/{pid}/tasks/{tid}/jobs")["items"])
    refused = api.request(
        "POST",
        f"/htc/projects/{pid}/tasks/{tid}/jobs/batch",
        json=[api.job_request(["true"], priority="ON_DEMAND_PRIORITY")],
    )
    assert refused.status_code == 400 and "dimensions" in refused.json()["message"]
    assert len(api.get(f"/htc/projects/{pid}/tasks/{tid}/jobs")["items"]) == before
    allowed = api.request(
        "POST",
        f"/htc/projects/{pid}/tasks/{tid}/jobs/batch",
        json=[api.job_request(["true"], priority="ON_DEMAND_ECONOMY")],
    )
    assert allowed.status_code == 200
    # an empty list removes every restriction
    assert api.request("PUT", f"/htc/projects/{pid}/dimensions", json=[]).status_code == 201
    again = api.request(
        "POST",
        f"/htc/projects/{pid}/tasks/{tid}/jobs/batch",
        json=[api.job_request(["true"], priority="ON_DEMAND_PRIORITY")],
    )
    assert again.status_code == 200


def test_every_job_starts_in_an_empty_working_directory(api: Any) -> None:
    """Jobs that leave files behind do not leak them into the next job's working directory."""
    pid, tid = api.project_and_task()
    echo = api.submit_one(
        pid, tid, api.job_request(["sh", "-c", "ls -A | wc -l; echo x > leftover"], batch_size=8)
    )
    jobs = api.wait_terminal(pid, tid, 8)
    assert all(j["status"] == "SUCCEEDED" for j in jobs), jobs
    for i in range(8):
        lines = api.get(f"/htc/projects/{pid}/tasks/{tid}/jobs/{echo['parentJobId']}:{i}/logs", sort="asc")[
            "items"
        ]
        assert [line["message"].strip() for line in lines] == ["0"], lines


def test_oauth2_client_credentials_exchange_an_api_key_for_a_bearer_token(module_server: Any) -> None:
    url = f"{module_server.url}/oauth2/token"
    form = {"grant_type": "client_credentials", "client_secret": module_server.api_key}
    resp = httpx.post(url, data=form)
    assert resp.status_code == 200, resp.text
    token = resp.json()["access_token"]
    assert resp.json()["token_type"] == "Bearer"
    assert (
        httpx.get(
            f"{module_server.url}/htc/projects", headers={"Authorization": f"Bearer {token}"}
        ).status_code
        == 200
    )
    basic = httpx.post(url, data={"grant_type": "client_credentials"}, auth=("any", module_server.api_key))
    assert basic.status_code == 200
    assert httpx.post(url, data={"grant_type": "password"}).status_code == 400
    assert (
        httpx.post(url, data={"grant_type": "client_credentials", "client_secret": "0" * 40}).status_code
        == 401
    )


def test_group_names_with_control_characters_round_trip(api: Any) -> None:
    """The bulk job insert (COPY on PostgreSQL) must keep every character of a group name."""
    pid, tid = api.project_and_task()
    group = "sweep\\tab\there\\\\back\nslash"
    echo = api.submit_one(pid, tid, api.job_request(["true"], batch_size=3), group=group)
    assert echo["group"] == group
    jobs = api.list_all(f"/htc/projects/{pid}/tasks/{tid}/jobs", group=group)
    assert len(jobs) == 3 and {j["group"] for j in jobs} == {group}
    assert api.get(f"/htc/projects/{pid}/tasks/{tid}/groups") == [group]
