"""Storage tokens and presigned URLs on every backend: shapes, scopes, expiry, path validation.

Scopes are checked with the token's credentials alone, through the tools a user would use:
boto3 and the ``aws`` CLI on S3 (SeaweedFS), openhtc's object API on local storage.
"""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest

# Nothing here depends on the database: run on the first of --db only.
pytestmark = pytest.mark.one_db

REGION = "AWS_US_EAST_1"


def _prefixes(pid: str, tid: str) -> tuple[str, str]:
    return f"projects/{pid}/shared/", f"projects/{pid}/tasks/{tid}/"


def test_token_routes_answer_the_rescale_shapes(storage_server: Any, instant: Any) -> None:
    s = storage_server
    pid, tid = s.api.project_and_task()
    whoami = s.api.get("/auth/token/whoami")
    project_token, task_token = s.token(pid), s.token(pid, tid)
    shared, task = _prefixes(pid, tid)
    if s.s3:
        root, provider, name = f"s3://{s.bucket}/", "AWS", s.bucket
        keys = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"}
        keys |= {"AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION"}  # SeaweedFS is not AWS
    else:
        root, provider, name = "openhtc://openhtc-local/", "UNASSIGNED", "openhtc-local"
        keys = {"OPENHTC_STORAGE_TOKEN", "OPENHTC_STORAGE_URL"}
        assert task_token["credentials"]["OPENHTC_STORAGE_URL"] == s.server.api_url
    for token in (project_token, task_token):
        assert token["projectSharedStoragePath"] == root + shared
        assert token["projectId"] == pid
        assert (token["storageName"], token["region"], token["provider"]) == (name, REGION, provider)
        assert token["user"] == f"{whoami['workspaceId']}:{whoami['sub']}"
        assert set(token["credentials"]) == keys
        assert 0 < instant(token["expiration"]) - time.time() <= 3600 + 60
    assert "storagePath" not in project_token and "taskId" not in project_token
    assert (task_token["storagePath"], task_token["taskId"]) == (root + task, tid)

    base = f"/htc/projects/{pid}"
    assert s.api.get(f"{base}/storage/token/{REGION}")["projectId"] == pid
    assert s.api.get(f"{base}/tasks/{tid}/storage/token/{REGION}")["taskId"] == tid
    for path in (f"{base}/storage/token/GCP_US_CENTRAL_1", f"{base}/tasks/{tid}/storage/token/NOWHERE"):
        s.api.get(path, expect=404)
    for path in (f"{base}/storage/tokens", f"{base}/tasks/{tid}/storage/tokens"):
        many = s.api.get(path)
        assert many["defaultRegion"] == REGION and [t["region"] for t in many["regionStores"]] == [REGION]
    regional = s.api.get(f"{base}/tasks/{tid}/storage/regional-storage")
    assert regional["rescaleRegion"] == REGION
    (store,) = regional["regionalStores"]
    assert (store["projectPath"], store["taskPath"], store["provider"]) == (
        root + shared,
        root + task,
        provider,
    )
    assert set(store["credentials"]) == keys

    option = {"storageName": name, "region": REGION, "provider": provider}
    assert s.api.get("/htc/storage") == [option]
    assert s.api.get(f"/htc/storage/region/{REGION}") == option
    s.api.get("/htc/storage/region/GCP_US_CENTRAL_1", expect=404)
    s.api.get(f"/htc/projects/{pid}/tasks/not-a-task/storage/token", expect=404)


def test_a_task_token_reaches_its_task_and_shared_storage_only(storage_server: Any) -> None:
    s = storage_server
    pid, tid = s.api.project_and_task()
    other_tid = s.api.create_task(pid)["taskId"]
    other_pid, third_tid = s.api.project_and_task()
    shared, task = _prefixes(pid, tid)
    s.store(s.token(pid, other_tid)).put(f"projects/{pid}/tasks/{other_tid}/secret.txt", b"other task")
    s.store(s.token(other_pid, third_tid)).put(f"projects/{other_pid}/shared/secret.txt", b"other project")

    store = s.store(s.token(pid, tid))
    store.put(task + "out/a.txt", b"output")
    store.put(shared + "inputs/in.txt", b"input")  # a user's task token also uploads inputs
    assert store.get(task + "out/a.txt") == b"output"
    assert store.list(task) == [task + "out/a.txt"]
    assert store.list(shared) == [shared + "inputs/in.txt"]
    store.delete(task + "out/a.txt")
    assert store.list(task) == []

    refused = [
        lambda: store.get(f"projects/{pid}/tasks/{other_tid}/secret.txt"),
        lambda: store.put(f"projects/{pid}/tasks/{other_tid}/x.txt", b"x"),
        lambda: store.list(f"projects/{pid}/tasks/{other_tid}/"),
        lambda: store.list(f"projects/{pid}/tasks/"),
        lambda: store.get(f"projects/{other_pid}/shared/secret.txt"),
        lambda: store.put(f"projects/{other_pid}/shared/x.txt", b"x"),
        lambda: store.list(f"projects/{other_pid}/"),
        lambda: store.list("projects/"),
        lambda: store.put("root.txt", b"x"),
    ]
    for attempt in refused:
        with pytest.raises(s.Denied):
            attempt()
    # The project token reaches shared storage but no task.
    project_store = s.store(s.token(pid))
    assert project_store.get(shared + "inputs/in.txt") == b"input"
    with pytest.raises(s.Denied):
        project_store.list(task)


@pytest.mark.backends("seaweedfs")
def test_aws_cli_works_with_a_task_token_alone(start_storage_server: Any, storage_backend: str) -> None:
    s = start_storage_server()
    pid, tid = s.api.project_and_task()
    other_tid = s.api.create_task(pid)["taskId"]
    token = s.token(pid, tid)
    path = token["storagePath"]
    upload = s.tmp / "result.csv"
    upload.write_text("a,b\n1,2\n")

    # awscli v1 reads AWS_ENDPOINT_URL from the environment: no --endpoint-url needed.
    done = s.aws(token, "s3", "cp", str(upload), path + "results/result.csv")
    assert done.returncode == 0, done.stderr
    listed = s.aws(token, "s3", "ls", path, "--recursive")
    assert listed.returncode == 0 and "results/result.csv" in listed.stdout, listed
    fetched = s.aws(token, "s3", "cp", path + "results/result.csv", "-")
    assert fetched.stdout == "a,b\n1,2\n", fetched.stderr

    for denied in (
        ("s3", "ls", f"s3://{s.bucket}/projects/{pid}/tasks/{other_tid}/"),
        ("s3", "cp", str(upload), f"s3://{s.bucket}/projects/{pid}/tasks/{other_tid}/x.csv"),
        ("s3", "ls", f"s3://{s.bucket}/"),
        ("s3", "ls", f"s3://{s.bucket}/projects/"),
        ("s3", "cp", str(upload), f"s3://{s.bucket}/x.csv"),
    ):
        result = s.aws(token, *denied)
        assert result.returncode != 0 and "AccessDenied" in result.stderr, (denied, result)


def test_a_job_token_reads_but_cannot_write_project_shared(storage_server: Any) -> None:
    s = storage_server
    pid, tid = s.api.project_and_task()
    other_tid = s.api.create_task(pid)["taskId"]
    shared, task = _prefixes(pid, tid)
    s.store(s.token(pid)).put(shared + "input.txt", b"shared input")
    bearer = s.job_bearer(pid, tid)

    job_store = s.store(s.token(pid, tid, bearer=bearer))
    assert job_store.get(shared + "input.txt") == b"shared input"
    assert job_store.list(shared) == [shared + "input.txt"]
    job_store.put(task + "out.txt", b"job output")
    with pytest.raises(s.Denied):
        job_store.put(shared + "evil.txt", b"x")
    with pytest.raises(s.Denied):
        job_store.delete(shared + "input.txt")
    with pytest.raises(s.Denied):
        job_store.list(f"projects/{pid}/tasks/{other_tid}/")
    with pytest.raises(s.Denied):  # the job's project token is read-only too
        s.store(s.token(pid, bearer=bearer)).put(shared + "evil.txt", b"x")
    assert s.store(s.token(pid)).list(shared) == [shared + "input.txt"]

    jobs_api = s.server.api(bearer)
    jobs_api.get(f"/htc/projects/{pid}/tasks/{other_tid}/storage/token", expect=404)
    jobs_api.get(f"/htc/projects/{pid}/storage/presigned-url", expect=403, filePath="evil.txt")
    assert jobs_api.get(f"/htc/projects/{pid}/tasks/{tid}/storage/presigned-url", filePath="o.txt")["url"]


def test_storage_tokens_expire(start_storage_server: Any, storage_backend: str, instant: Any) -> None:
    s = start_storage_server(env={"OPENHTC_STORAGE_TOKEN_TTL_SECONDS": "2"})
    pid, tid = s.api.project_and_task()
    token = s.token(pid, tid)
    lifetime = instant(token["expiration"]) - time.time()
    if s.s3:
        # STS refuses sessions shorter than 15 minutes: S3 tokens live at least that long.
        assert 850 < lifetime <= 900 + 30, token["expiration"]
        s.store(token).put(token["storagePath"].split("/", 3)[3] + "x.txt", b"x")
        return
    assert lifetime <= 2 + 1, token["expiration"]
    key = f"projects/{pid}/tasks/{tid}/x.txt"
    s.store(token).put(key, b"x")
    time.sleep(max(0.0, instant(token["expiration"]) - time.time()) + 1)
    with s.objects(token["credentials"]["OPENHTC_STORAGE_TOKEN"]) as http:
        resp = http.get(f"/htc/storage/objects/{key}")
    assert resp.status_code == 401 and "expired" in resp.json()["message"], resp.text


def test_presigned_put_url_works_then_expires(start_storage_server: Any, instant: Any) -> None:
    s = start_storage_server(env={"OPENHTC_PRESIGNED_URL_TTL_SECONDS": "3"})
    pid, tid = s.api.project_and_task()
    shared, task = _prefixes(pid, tid)
    project_url = s.api.get(f"/htc/projects/{pid}/storage/presigned-url", filePath="inputs/data.bin")
    task_url = s.api.get(f"/htc/projects/{pid}/tasks/{tid}/storage/presigned-url", filePath="out/r.txt")
    assert project_url["storageName"] == task_url["storageName"] and project_url["region"] == REGION

    assert httpx.put(project_url["url"], content=b"\x00\x01 presigned").status_code == 200
    assert httpx.put(task_url["url"], content=b"task upload").status_code == 200
    store = s.store(s.token(pid, tid))
    assert store.get(shared + "inputs/data.bin") == b"\x00\x01 presigned"
    assert store.get(task + "out/r.txt") == b"task upload"

    time.sleep(max(0.0, instant(project_url["expiration"]) - time.time()) + 1.5)
    late = httpx.put(project_url["url"], content=b"too late")
    assert late.status_code == 403, late.text
    tampered = httpx.put(task_url["url"].replace("out/r.txt", "out/other.txt"), content=b"x")
    assert tampered.status_code == 403
    assert store.get(shared + "inputs/data.bin") == b"\x00\x01 presigned"
    assert store.list(task) == [task + "out/r.txt"]


TRAVERSALS = [
    "..%2Fsecret",  # ../secret
    "%2e%2e/secret",
    "a/%2E%2E/%2E%2E/b",
    "%252e%252e%252fsecret",  # double-encoded
    "%2Fetc%2Fpasswd",  # absolute
    "a%5C..%5Cb",  # backslashes
    "a%00b",  # NUL
    "a%2F%2Fb",  # empty segment
    "./a",
    "",
]


def test_unsafe_paths_are_refused_and_change_nothing(storage_server: Any) -> None:
    s = storage_server
    pid, tid = s.api.project_and_task()
    shared, task = _prefixes(pid, tid)
    presign = (
        f"/htc/projects/{pid}/storage/presigned-url",
        f"/htc/projects/{pid}/tasks/{tid}/storage/presigned-url",
    )
    for raw in TRAVERSALS:
        for path in presign:
            resp = s.api.client.get(f"{path}?filePath={raw}")
            assert resp.status_code == 400, (raw, resp.text)
            assert "filePath" in resp.json()["message"], resp.text
        if "%" in raw:  # the same keys on the object API (httpx itself would resolve a literal ./)
            resp = s.api.client.put(f"/htc/storage/objects/{task}{raw}", content=b"escaped")
            assert resp.status_code == 400, (raw, resp.text)
            assert "key" in resp.json()["message"], resp.text
    resp = s.api.client.get(presign[0])  # no filePath at all
    assert resp.status_code == 400 and "filePath" in resp.json()["message"]
    store = s.store(s.token(pid, tid))
    assert store.list(task) == [] and store.list(shared) == []
    if not s.s3:
        assert not any(p.is_file() for p in (s.server.data_dir / "storage").rglob("*")), "a file was written"
