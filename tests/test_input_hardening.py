"""Bad input gets a clear 4xx naming what is wrong, and changes nothing (issue 13 items 1, 3, 9-11).

Every test runs against the real server on SQLite and PostgreSQL: the store is where these used to
break (PostgreSQL refuses NUL and over-long names; orjson refuses lone surrogates on the way out).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

SPEC = json.loads((Path(__file__).parent / "spec" / "rescale-htc-openapi.json").read_text())
CLOUD_PROVIDERS = SPEC["components"]["schemas"]["CloudProvider"]["enum"]


def tp(project_id: str, task_id: str) -> str:
    return f"/htc/projects/{project_id}/tasks/{task_id}"


def raw(api: Any, method: str, path: str, body: Any, **params: Any) -> httpx.Response:
    """Send ``body`` as JSON text exactly as json.dumps writes it (lone surrogates as ``\\ud800``)."""
    return api.client.request(
        method,
        path,
        content=json.dumps(body).encode(),
        headers={"content-type": "application/json"},
        params=params or None,
    )


def refused(resp: httpx.Response, status: int, *words: str) -> str:
    assert resp.status_code == status, f"expected {status}, got {resp.status_code}: {resp.text[:1000]}"
    body = resp.json()
    assert body["errorType"] and body["message"] == body["errorDescription"], body
    for word in words:
        assert word in body["message"], (word, body["message"])
    return str(body["message"])


def job_count(api: Any, pid: str, tid: str) -> int:
    return len(api.jobs(pid, tid))


# -- item 1: lone surrogates ----------------------------------------------------------------------

SURROGATE = "\ud800"


def _with(request: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    doc = json.loads(json.dumps(request))
    node = doc
    keys = path.split(".")
    for key in keys[:-1]:
        node = node[int(key)] if isinstance(node, list) else node[key]
    last = keys[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return doc


def test_a_lone_surrogate_anywhere_in_a_submit_is_refused_naming_the_field(api: Any) -> None:
    pid, tid = api.project_and_task()
    base = api.job_request(["echo", "ok"], envs=[{"name": "A", "value": "b"}])
    cases = {
        "htcJobDefinition.commands[1]": _with(base, "htcJobDefinition.commands.1", f"x{SURROGATE}"),
        "htcJobDefinition.envs[0].value": _with(base, "htcJobDefinition.envs.0.value", SURROGATE),
        "htcJobDefinition.envs[0].name": _with(base, "htcJobDefinition.envs.0.name", f"A{SURROGATE}"),
        "jobName": _with(base, "jobName", SURROGATE),
        "tags[0].value": {**base, "tags": [{"key": "k", "value": SURROGATE}]},
    }
    for field, request in cases.items():
        resp = raw(api, "POST", f"{tp(pid, tid)}/jobs/batch", [request])
        refused(resp, 400, f"[0].{field}", "surrogate")
    assert job_count(api, pid, tid) == 0  # nothing stored, and the list still answers
    api.submit_one(pid, tid, api.job_request(["true"]))
    assert job_count(api, pid, tid) == 1


def test_a_lone_surrogate_in_names_and_descriptions_is_refused(api: Any) -> None:
    before = {p["projectId"] for p in api.list_all("/htc/projects")}
    for field in ("projectName", "projectDescription"):
        body = {"projectName": "p", "projectDescription": "d", field: f"a{SURROGATE}b"}
        refused(raw(api, "POST", "/htc/projects", body), 400, field, "surrogate")
    assert {p["projectId"] for p in api.list_all("/htc/projects")} == before
    pid = api.create_project()["projectId"]
    for field in ("taskName", "taskDescription"):
        body = {"taskName": "t", "taskDescription": "d", field: SURROGATE}
        refused(raw(api, "POST", f"/htc/projects/{pid}/tasks", body), 400, field, "surrogate")
    refused(raw(api, "POST", "/htc/projects", {"projectName": "p", SURROGATE: 1}), 400, "surrogate")
    assert api.list_all(f"/htc/projects/{pid}/tasks") == []


def test_a_job_stored_with_a_lone_surrogate_still_lists(api: Any, module_server: Any) -> None:
    """Rows written before the API refused surrogates read as U+FFFD instead of failing the list."""
    pid, tid = api.project_and_task()
    parent = api.submit_one(pid, tid, api.job_request(["echo", "placeholder"]))["parentJobId"]
    url = module_server.db_url or f"sqlite:///{module_server.data_dir / 'openhtc.db'}"
    engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
    try:
        with engine.begin() as conn:
            request = json.loads(
                conn.execute(
                    sa.text("SELECT request FROM batches WHERE parent_job_id = :p"), {"p": parent}
                ).scalar_one()
                if url.startswith("sqlite")
                else conn.execute(
                    sa.text("SELECT request::text FROM batches WHERE parent_job_id = :p"), {"p": parent}
                ).scalar_one()
            )
            request["htcJobDefinition"]["commands"] = ["echo", SURROGATE]
            text = json.dumps(request)  # ensure_ascii: the surrogate as a \ud800 escape
            cast = ":r" if url.startswith("sqlite") else "CAST(:r AS json)"
            conn.execute(
                sa.text(f"UPDATE batches SET request = {cast} WHERE parent_job_id = :p"),
                {"r": text, "p": parent},
            )
    finally:
        engine.dispose()
    module_server.restart()  # no cached copy of the batch
    api = module_server.api()
    jobs = api.jobs(pid, tid)
    assert jobs[0]["commands"] == ["echo", "\ufffd"], jobs
    assert api.job(pid, tid, f"{parent}:0")["commands"] == ["echo", "\ufffd"]


# -- item 3: forged cursors, NUL, lengths, out-of-range integers, storage paths ------------------


def _b64(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


FORGED_CURSORS = ["ImFiYyI", _b64("1e400"), _b64('{"a":1}'), _b64("[1,2]"), _b64("5"), _b64("[null,null]")]
FORGED_CURSORS += [_b64("-1"), _b64("true"), _b64(str(2**70)), _b64('"x"'), "!!!", _b64('[1e400,"a"]')]


def test_forged_page_index_cursors_answer_400_on_every_list(api: Any) -> None:
    pid, tid = api.project_and_task()
    parent = api.submit_one(pid, tid, api.job_request(["true"]))["parentJobId"]
    lists = [
        "/htc/projects",
        f"/htc/projects/{pid}/tasks",
        f"{tp(pid, tid)}/jobs",
        f"{tp(pid, tid)}/jobs/{parent}:0/events",
        f"{tp(pid, tid)}/group-summary-statistics",
    ]
    for path in lists:
        for cursor in FORGED_CURSORS:
            resp = api.client.get(path, params={"pageIndex": cursor})
            # a cursor of the right shape is a valid position: 5 on an id list, a string on groups
            valid = {
                (lists[2], _b64("5")),
                (lists[3], _b64("5")),
                (lists[4], _b64('"x"')),
                (lists[4], "ImFiYyI"),
            }
            if (path, cursor) in valid:
                assert resp.status_code == 200, (path, cursor, resp.text)
                continue
            refused(resp, 400, "pageIndex")


def test_nul_bytes_in_names_groups_and_ids_answer_400(api: Any) -> None:
    before = {p["projectId"] for p in api.list_all("/htc/projects")}
    refused(
        api.client.post("/htc/projects", json={"projectName": "a\x00b", "projectDescription": ""}),
        400,
        "projectName",
        "NUL",
    )
    pid, tid = api.project_and_task()
    refused(
        api.client.post(f"/htc/projects/{pid}/tasks", json={"taskName": "\x00", "taskDescription": ""}),
        400,
        "taskName",
    )
    batch = f"{tp(pid, tid)}/jobs/batch"
    refused(
        api.client.post(batch, json=[api.job_request(["true"])], params={"group": "g\x00"}),
        400,
        "group",
        "NUL",
    )
    for path in (f"/htc/projects/{pid}\x00", f"{tp(pid, tid)}\x00/jobs", f"{tp(pid, tid)}/jobs/x\x00y"):
        refused(api.client.get(path.replace("\x00", "%00")), 400, "NUL")
    refused(api.client.get(f"{tp(pid, tid)}/jobs", params={"group": "\x00"}), 400, "group")
    assert {p["projectId"] for p in api.list_all("/htc/projects")} - before == {pid}
    assert job_count(api, pid, tid) == 0


def test_names_and_groups_over_their_limit_answer_400_on_both_databases(api: Any) -> None:
    before = {p["projectId"] for p in api.list_all("/htc/projects")}
    long = "n" * 100_000
    refused(
        api.client.post("/htc/projects", json={"projectName": long, "projectDescription": ""}),
        400,
        "projectName",
        "name_chars",
        "500",
    )
    refused(
        api.client.post("/htc/projects", json={"projectName": "n" * 501, "projectDescription": ""}),
        400,
        "name_chars",
    )
    pid, tid = api.project_and_task()
    refused(
        api.client.post(f"/htc/projects/{pid}/tasks", json={"taskName": long, "taskDescription": ""}),
        400,
        "taskName",
    )
    batch = f"{tp(pid, tid)}/jobs/batch"
    refused(
        api.client.post(batch, json=[api.job_request(["true"])], params={"group": "g" * 501}),
        400,
        "group",
        "name_chars",
    )
    assert {p["projectId"] for p in api.list_all("/htc/projects")} - before == {pid}
    assert job_count(api, pid, tid) == 0
    # exactly at the limit is fine, and round-trips
    name = "é" * 500
    assert api.create_project(name)["projectName"] == name
    echo = api.submit_one(pid, tid, api.job_request(["true"]), group="g" * 500)
    assert echo["group"] == "g" * 500


def test_out_of_range_integers_in_paths_and_queries_answer_4xx(api: Any) -> None:
    pid = api.create_project()["projectId"]
    big = str(2**63)
    for method in ("GET", "PATCH", "DELETE"):
        resp = api.client.request(method, f"/htc/projects/{pid}/limits/{big}", json={"vCPUs": 1})
        refused(resp, 400, "limit_id")
    refused(api.client.get(f"/htc/projects/{pid}/limits/-1"), 400)
    tid = api.create_task(pid)["taskId"]
    parent = api.submit_one(pid, tid, api.job_request(["true"]))["parentJobId"]
    for index in (str(2**63), "99999999999", "\u00b2", "1e3", "-1"):
        assert api.client.get(f"{tp(pid, tid)}/jobs/{parent}:{index}").status_code == 404
        assert (
            api.client.get(f"{tp(pid, tid)}/jobs", params={"jobId": f"{parent}:{index}"}).json()["items"]
            == []
        )
    assert api.client.get(f"/htc/projects/{pid}/limits/{2**63 - 1}").status_code == 404
    for size in (big, "99999999999999999999999", "-5", "1e3"):
        refused(api.client.get("/htc/projects", params={"pageSize": size}), 400, "pageSize")
    refused(
        api.client.post(
            f"/htc/projects/{pid}/limits", json={"vCPUs": 2**63, "modifierRole": "PROJECT_ADMIN"}
        ),
        400,
        "vCPUs",
    )
    assert api.get(f"/htc/projects/{pid}/limits") == []


def test_storage_paths_over_filesystem_limits_get_no_presigned_url(api: Any) -> None:
    pid, tid = api.project_and_task()
    for path in (f"/htc/projects/{pid}/storage/presigned-url", f"{tp(pid, tid)}/storage/presigned-url"):
        refused(api.client.get(path, params={"filePath": "d/" + "s" * 300}), 400, "filePath", "255")
        refused(api.client.get(path, params={"filePath": "/".join(["s" * 200] * 6)}), 400, "filePath", "1024")
        assert api.client.get(path, params={"filePath": "d/" + "s" * 255}).status_code == 200


# -- item 9: what would be accepted, then fail or bloat -------------------------------------------


def _submit(api: Any, pid: str, tid: str, *requests: dict[str, Any]) -> httpx.Response:
    return api.client.post(f"{tp(pid, tid)}/jobs/batch", json=list(requests))


def test_submissions_that_could_never_run_or_would_bloat_the_store_are_refused(api: Any) -> None:
    pid, tid = api.project_and_task()
    ok = api.job_request(["true"])
    d = "htcJobDefinition"
    cases: dict[str, tuple[dict[str, Any] | list[Any], tuple[str, ...]]] = {
        "env name with =": (_with(ok, f"{d}.envs", [{"name": "A=B", "value": "x"}]), ("envs[0].name", "'='")),
        "env name with NUL": (
            _with(ok, f"{d}.envs", [{"name": "A\x00", "value": "x"}]),
            ("envs[0].name", "NUL"),
        ),
        "env value with NUL": (
            _with(ok, f"{d}.envs", [{"name": "A", "value": "\x00"}]),
            ("envs[0].value", "NUL"),
        ),
        "NUL in a command": (_with(ok, f"{d}.commands", ["echo", "a\x00b"]), ("commands[1]", "NUL")),
        "2 MB command": (_with(ok, f"{d}.commands", ["x" * 2_000_000]), ("commands", "string_chars")),
        "one argument over execve's limit": (
            _with(ok, f"{d}.commands", ["x" * 200_000]),
            ("commands[0]", "131072"),
        ),
        "commands over command_bytes": (_with(ok, f"{d}.commands", ["x" * 100_000] * 11), ("command_bytes",)),
        "1 MB jobName": (_with(ok, "jobName", "j" * 1_000_000), ("jobName", "name_chars")),
        "100,000-char imageName": (_with(ok, f"{d}.imageName", "a" * 100_000), ("imageName", "name_chars")),
        "10,000 envs": (
            _with(ok, f"{d}.envs", [{"name": f"E{i}", "value": ""} for i in range(10_000)]),
            ("envs", "envs_per_job"),
        ),
        "batchSize as a string": (_with(ok, "batchSize", "10"), ("batchSize",)),
        "batchSize true": (_with(ok, "batchSize", True), ("batchSize",)),
        "maxVCpus as a string": (_with(ok, f"{d}.maxVCpus", "1"), ("maxVCpus",)),
        "maxRetries 1.5": ({**ok, "retryStrategy": {"maxRetries": 1.5}}, ("maxRetries",)),
        "maxSwap 2^63": (_with(ok, f"{d}.maxSwap", 2**63), ("maxSwap",)),
        "maxSwap over int32": (_with(ok, f"{d}.maxSwap", 2**31), ("maxSwap",)),
    }
    for name, (request, words) in cases.items():
        assert name and refused(_submit(api, pid, tid, request), 400, *words)
    refused(_submit(api, pid, tid, *[ok] * 1001), 400, "requests_per_call", "1000")
    assert job_count(api, pid, tid) == 0, "a refused submit stored jobs"
    assert api.submit(pid, tid, ok, _with(ok, f"{d}.commands", ["x" * 100_000] * 10))  # within every limit
    assert job_count(api, pid, tid) == 2


def test_project_descriptions_and_scaling_policies_are_bounded(api: Any) -> None:
    before = {p["projectId"] for p in api.list_all("/htc/projects")}
    big = {"projectName": "p", "projectDescription": "d" * 65537}
    refused(api.client.post("/htc/projects", json=big), 400, "projectDescription", "description_chars")
    assert {p["projectId"] for p in api.list_all("/htc/projects")} == before
    pid = api.create_project()["projectId"]
    dims = f"/htc/projects/{pid}/dimensions"
    refused(api.client.put(dims, json=[{"computeScalingPolicy": "ANYTHING"}]), 400, "computeScalingPolicy")
    assert api.get(dims) == []
    refused(api.client.put(dims, json=[{"machineType": "m" * 501}]), 400, "[0].machineType", "name_chars")
    refused(api.client.put(dims, json=[{}] * 1001), 400, "body", "1000")
    assert api.get(dims) == []
    assert api.client.put(dims, json=[{"computeScalingPolicy": "BALANCED"}]).status_code == 201


@pytest.mark.one_db
def test_limits_are_settings_and_each_refusal_names_its_limit(start_server: Callable[..., Any]) -> None:
    srv = start_server(
        env={
            "OPENHTC_MAX_REQUEST_BYTES": "20000",
            "OPENHTC_MAX_REQUESTS_PER_CALL": "2",
            "OPENHTC_MAX_ENVS_PER_JOB": "3",
            "OPENHTC_MAX_COMMAND_BYTES": "64",
            "OPENHTC_MAX_NAME_CHARS": "20",
            "OPENHTC_MAX_DESCRIPTION_CHARS": "5",
            "OPENHTC_MAX_STRING_CHARS": "1000",
        }
    )
    api = srv.api()
    refused(
        api.client.post("/htc/projects", json={"projectName": "p" * 21, "projectDescription": ""}),
        400,
        "name_chars",
        "20",
    )
    refused(
        api.client.post("/htc/projects", json={"projectName": "p", "projectDescription": "123456"}),
        400,
        "description_chars",
        "5",
    )
    pid, tid = api.project_and_task(name="p")
    ok = api.job_request(["true"])
    refused(_submit(api, pid, tid, ok, ok, ok), 400, "requests_per_call", "2")
    envs = [{"name": f"E{i}", "value": ""} for i in range(4)]
    refused(_submit(api, pid, tid, _with(ok, "htcJobDefinition.envs", envs)), 400, "envs_per_job", "3")
    refused(
        _submit(api, pid, tid, _with(ok, "htcJobDefinition.commands", ["x" * 70])), 400, "command_bytes", "64"
    )
    refused(_submit(api, pid, tid, _with(ok, "jobName", "y" * 1001)), 400, "string_chars", "1000")
    resp = api.client.post(
        f"{tp(pid, tid)}/jobs/batch",
        content=b"[" + b" " * 30000 + b"]",
        headers={"content-type": "application/json"},
    )
    refused(resp, 413, "request_bytes", "20000")
    assert api.jobs(pid, tid) == []
    assert api.submit(pid, tid, ok, ok)


# -- items 10 and 11: strict clients, workspace-wide data ----------------------------------------


def test_storage_providers_are_inside_the_specs_cloud_provider_enum(api: Any) -> None:
    pid, tid = api.project_and_task()
    bodies = [
        api.get(f"/htc/projects/{pid}/storage/token"),
        api.get(f"{tp(pid, tid)}/storage/token"),
        *api.get(f"{tp(pid, tid)}/storage/tokens")["regionStores"],
        *api.get(f"/htc/projects/{pid}/storage/tokens")["regionStores"],
        *api.get(f"{tp(pid, tid)}/storage/regional-storage")["regionalStores"],
        *api.get("/htc/storage"),
    ]
    for body in bodies:
        assert body["provider"] in CLOUD_PROVIDERS, body


def _job_tokens(api: Any, pid: str, tid: str) -> tuple[str, str]:
    echo = api.submit_one(
        pid, tid, api.job_request(["sh", "-c", 'echo "$RESCALE_HTC_BEARER_TOKEN $RESCALE_HTC_REFRESH_TOKEN"'])
    )
    api.wait_terminal(pid, tid, 1)
    line = api.log_lines(pid, tid, f"{echo['parentJobId']}:0")[0].split()
    return line[0], line[1]


def test_a_job_token_reads_no_workspace_metrics_or_settings(api: Any, module_server: Any) -> None:
    pid, tid = api.project_and_task()
    bearer, _ = _job_tokens(api, pid, tid)
    job = module_server.api(bearer)
    workspace_id = api.get("/auth/token/whoami")["workspaceId"]
    for path in (
        "/htc/metrics",
        f"/htc/workspaces/{workspace_id}/limits",
        f"/htc/workspaces/{workspace_id}/dimensions",
        f"/htc/workspaces/{workspace_id}/task-retention-policy",
        f"/htc/gcp/clusters/{workspace_id}",
    ):
        refused(job.client.get(path), 403)
    assert job.client.get(f"{tp(pid, tid)}/jobs").status_code == 200  # its own task still works
    assert api.client.get("/htc/metrics").status_code == 200


def test_region_settings_and_claims_are_bounded_too(api: Any) -> None:
    before = {p["projectId"] for p in api.list_all("/htc/projects")}
    for settings, field in (
        (
            [{"computeSettings": {"computeRegion": "MOON_1"}}],
            "regionSettings[0].computeSettings.computeRegion",
        ),
        ([{"computeSettings": {}}], "regionSettings[0].storageSettings"),
        ([{"junk": "x" * 1000}] * 100, "regionSettings"),
        ("x", "regionSettings"),
    ):
        body = {"projectName": "p", "projectDescription": "", "regionSettings": settings}
        refused(api.client.post("/htc/projects", json=body), 400, field)
    assert {p["projectId"] for p in api.list_all("/htc/projects")} == before
    kept = [{"computeSettings": {"computeRegion": "AWS_US_EAST_1"}, "storageSettings": {}, "other": "x"}]
    project = api.create_project(regionSettings=kept)
    expected = [{"computeSettings": {"computeRegion": "AWS_US_EAST_1"}, "storageSettings": {}}]
    assert project["regionSettings"] == expected
    pid, tid = api.project_and_task()
    claims = [{"name": f"c{i}", "value": "v" * 100_000} for i in range(11)]
    resp = _submit(api, pid, tid, _with(api.job_request(["true"]), "htcJobDefinition.claims", claims))
    refused(resp, 400, "command_bytes")
    assert job_count(api, pid, tid) == 0
