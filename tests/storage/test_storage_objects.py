"""openhtc's object API (/htc/storage/objects, /htc/storage/list) on every backend, who it lets
through, and the managed SeaweedFS of ``htc server --storage seaweedfs``."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from openhtc.testing.procstats import alive

# Nothing here depends on the database: run on the first of --db only.
pytestmark = pytest.mark.one_db


def test_objects_round_trip_with_pages(storage_server: Any, instant: Any) -> None:
    s = storage_server
    pid, tid = s.api.project_and_task()
    task = f"projects/{pid}/tasks/{tid}/"
    big = os.urandom(3 * 1024 * 1024 + 17)
    names = ["a.txt", "b/c.txt", "b/d.txt", "b-e.txt", "big.bin"]
    with s.objects(s.server.token()) as http:
        for name in names:
            body = big if name == "big.bin" else name.encode()
            resp = http.put(f"/htc/storage/objects/{task}{name}", content=body)
            assert resp.status_code == 200 and resp.json() == {"key": task + name, "size": len(body)}
        got = http.get(f"/htc/storage/objects/{task}big.bin")
        assert got.status_code == 200 and got.content == big
        assert got.headers["content-type"] == "application/octet-stream"

        pages = [http.get("/htc/storage/list", params={"prefix": task, "pageSize": 2}).json()]
        while "next" in pages[-1]:  # absolute, carrying `after`; omitted on the last page
            assert pages[-1]["next"].startswith(s.server.api_url + "/htc/storage/list?")
            pages.append(http.get(pages[-1]["next"]).json())
        items = [item for page in pages for item in page["items"]]
        assert [len(p["items"]) for p in pages] == [2, 2, 1]
        keys = [i["key"] for i in items]
        if s.s3:  # SeaweedFS lists a folder before its name's siblings ("b/c" before "b-e"), consistently
            assert sorted(keys) == sorted(task + n for n in names) and len(set(keys)) == len(keys)
        else:
            assert keys == sorted(task + n for n in names)  # plain key order, as S3 specifies
        assert all(instant(i["lastModified"]) > 0 for i in items)
        listed = http.get("/htc/storage/list", params={"prefix": task + "b/"}).json()
        assert [i["key"] for i in listed["items"]] == [task + "b/c.txt", task + "b/d.txt"]

        assert http.delete(f"/htc/storage/objects/{task}b/c.txt").status_code == 204
        assert http.get(f"/htc/storage/objects/{task}b/c.txt").status_code == 404
        assert http.delete(f"/htc/storage/objects/{task}b/c.txt").status_code == 204  # idempotent
        missing = http.get(f"/htc/storage/objects/{task}nothing-here")
        assert missing.status_code == 404 and missing.json()["errorType"] == "NOT_FOUND"
        assert http.get("/htc/storage/list", params={"prefix": ""}).status_code == 400
        # A name both object and folder: S3 keeps both, a filesystem cannot (400, nothing changes).
        clash = http.put(f"/htc/storage/objects/{task}a.txt/inner", content=b"x")
        assert clash.status_code == (200 if s.s3 else 400), clash.text
        assert http.get(f"/htc/storage/objects/{task}a.txt").content == b"a.txt"
    assert httpx.get(f"{s.server.api_url}/htc/storage/objects/{task}a.txt").status_code == 401


def test_object_api_keeps_users_and_jobs_in_their_scopes(storage_server: Any) -> None:
    s = storage_server
    pid, tid = s.api.project_and_task()
    other_tid = s.api.create_task(pid)["taskId"]
    other_pid, third_tid = s.api.project_and_task()
    shared, task, other_task = (
        f"projects/{pid}/shared/",
        f"projects/{pid}/tasks/{tid}/",
        f"projects/{pid}/tasks/{other_tid}/",
    )
    with s.objects(s.server.token()) as admin:
        for key in (shared + "in.txt", other_task + "o.txt", f"projects/{other_pid}/shared/p.txt"):
            assert admin.put(f"/htc/storage/objects/{key}", content=b"x").status_code == 200
    bearers = {"job": s.job_bearer(pid, tid)}
    if not s.s3:  # local storage tokens are openhtc's own
        bearers["user task token"] = s.token(pid, tid)["credentials"]["OPENHTC_STORAGE_TOKEN"]
        bearers["job task token"] = s.token(pid, tid, bearer=bearers["job"])["credentials"][
            "OPENHTC_STORAGE_TOKEN"
        ]
    for who, bearer in bearers.items():
        job = who.startswith("job")
        with s.objects(bearer) as http:
            assert http.put(f"/htc/storage/objects/{task}{who}.txt", content=b"mine").status_code == 200, who
            assert http.get(f"/htc/storage/objects/{shared}in.txt").content == b"x", who
            assert http.get("/htc/storage/list", params={"prefix": shared}).status_code == 200
            writes_shared = http.put(f"/htc/storage/objects/{shared}{who}.txt", content=b"y").status_code
            assert writes_shared == (403 if job else 200), who
            assert http.delete(f"/htc/storage/objects/{shared}in.txt").status_code == (403 if job else 204)
            for key in (other_task + "o.txt", f"projects/{other_pid}/shared/p.txt"):
                assert http.get(f"/htc/storage/objects/{key}").status_code == 403, (who, key)
                assert http.put(f"/htc/storage/objects/{key}", content=b"z").status_code == 403, (who, key)
                assert http.delete(f"/htc/storage/objects/{key}").status_code == 403, (who, key)
            for prefix in (other_task, f"projects/{other_pid}/shared/", f"projects/{pid}/", "projects/"):
                assert http.get("/htc/storage/list", params={"prefix": prefix}).status_code == 403, prefix
        if not job:  # restore the input a user deleted
            s.store(s.token(pid)).put(shared + "in.txt", b"x")
    with s.objects(s.server.token()) as admin:
        assert admin.get(f"/htc/storage/objects/{other_task}o.txt").content == b"x"
        third = admin.get(f"/htc/storage/objects/projects/{other_pid}/tasks/{third_tid}/none")
        assert third.status_code == 404


@pytest.mark.backends("local")
def test_links_left_by_a_job_are_not_followed(start_storage_server: Any, storage_backend: str) -> None:
    """A job may leave symbolic links in its (bind-mounted) task folder; the object API must not
    serve host files or another project's files through them."""
    s = start_storage_server()
    pid, tid = s.api.project_and_task()
    other_pid = s.api.create_project()["projectId"]
    s.store(s.token(other_pid)).put(f"projects/{other_pid}/shared/secret.txt", b"secret")
    secret_dir = Path(s.server.data_dir) / "storage" / "projects" / other_pid / "shared"
    script = f'ln -s /etc "$TASK_SHARED_FOLDER/etc" && ln -s {secret_dir} "$TASK_SHARED_FOLDER/other"'
    s.api.submit_one(pid, tid, s.api.job_request(["sh", "-c", script]))
    (job,) = s.api.wait_terminal(pid, tid, 1)
    assert job["status"] == "SUCCEEDED"
    task = f"projects/{pid}/tasks/{tid}/"
    with s.objects(s.token(pid, tid)["credentials"]["OPENHTC_STORAGE_TOKEN"]) as http:
        assert http.get(f"/htc/storage/objects/{task}etc/hostname").status_code == 403
        assert http.get(f"/htc/storage/objects/{task}other/secret.txt").status_code == 403
        assert http.put(f"/htc/storage/objects/{task}other/planted.txt", content=b"p").status_code == 403
        assert http.get("/htc/storage/list", params={"prefix": task}).json() == {"items": []}
    assert not (secret_dir / "planted.txt").exists()


@pytest.mark.backends("seaweedfs")
def test_staged_uploads_skip_links(start_storage_server: Any, storage_backend: str) -> None:
    s = start_storage_server()
    pid, tid = s.api.project_and_task()
    script = 'ln -s /etc/passwd "$TASK_SHARED_FOLDER/passwd" && echo ok > "$TASK_SHARED_FOLDER/ok.txt"'
    s.api.submit_one(pid, tid, s.api.job_request(["sh", "-c", script]))
    (job,) = s.api.wait_terminal(pid, tid, 1)
    task = f"projects/{pid}/tasks/{tid}/"
    assert s.store(s.token(pid, tid)).list(task) == [task + "ok.txt"]
    lines = s.api.log_lines(pid, tid, job["jobUUID"])
    assert any("passwd" in line and "not uploaded" in line for line in lines), lines


def test_htc_server_runs_its_own_seaweedfs(start_server: Any, weed_binary: str) -> None:
    """``--storage seaweedfs``: the server starts SeaweedFS, hands out working S3 tokens, and
    stops it when it stops."""
    srv = start_server(args=("--storage", "seaweedfs"))
    api = srv.api()
    pid, tid = api.project_and_task()
    token = api.get(f"/htc/projects/{pid}/tasks/{tid}/storage/token")
    assert token["provider"] == "AWS" and token["storagePath"].startswith("s3://openhtc/projects/")
    assert token["credentials"]["AWS_ENDPOINT_URL"].startswith("http://127.0.0.1:")
    import boto3

    creds = token["credentials"]
    s3 = boto3.client(
        "s3",
        endpoint_url=creds["AWS_ENDPOINT_URL"],
        aws_access_key_id=creds["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=creds["AWS_SECRET_ACCESS_KEY"],
        aws_session_token=creds["AWS_SESSION_TOKEN"],
        region_name=creds["AWS_DEFAULT_REGION"],
    )
    key = f"projects/{pid}/tasks/{tid}/hello.txt"
    s3.put_object(Bucket="openhtc", Key=key, Body=b"hello")
    assert s3.get_object(Bucket="openhtc", Key=key)["Body"].read() == b"hello"

    pid_file = Path(srv.data_dir) / "seaweedfs" / "weed.pid"
    weed = int(pid_file.read_text())
    assert Path(f"/proc/{weed}").exists()
    srv.stop()
    deadline = time.monotonic() + 30  # weed shuts down cleanly, in about 2 s
    while alive(weed):
        assert time.monotonic() < deadline, "weed outlived the server"
        time.sleep(0.1)
