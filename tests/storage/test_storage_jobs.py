"""Real jobs (process runtime) and storage, on every backend: PROJECT_SHARED_FOLDER holds the
project's inputs, what a job writes to TASK_SHARED_FOLDER lands in task storage (also when the
job fails), and deleting a task frees its storage."""

from __future__ import annotations

from typing import Any

import pytest

# Nothing here depends on the database: run on the first of --db only.
pytestmark = pytest.mark.one_db


def _run(s: Any, pid: str, tid: str, script: str, batch_size: int = 1, **kw: Any) -> list[dict[str, Any]]:
    s.api.submit_one(pid, tid, s.api.job_request(["sh", "-c", script], batch_size=batch_size, **kw))
    return s.api.wait_terminal(pid, tid, batch_size, timeout=120)


def test_a_job_reads_shared_inputs_and_its_outputs_land_in_task_storage(storage_server: Any) -> None:
    s = storage_server
    pid, tid = s.api.project_and_task()
    shared, task = f"projects/{pid}/shared/", f"projects/{pid}/tasks/{tid}/"
    s.store(s.token(pid)).put(shared + "inputs/numbers.txt", b"3 4 5\n")
    script = (
        'read a b c < "$PROJECT_SHARED_FOLDER/inputs/numbers.txt" && '
        'mkdir -p "$TASK_SHARED_FOLDER/out" && '
        'i="$AWS_BATCH_JOB_ARRAY_INDEX" && echo "$i: $((a * b * c))" > "$TASK_SHARED_FOLDER/out/$i.txt"'
    )
    jobs = _run(s, pid, tid, script, batch_size=3)
    assert [j["status"] for j in jobs] == ["SUCCEEDED"] * 3, jobs

    expected = {f"{task}out/{i}.txt": f"{i}: 60\n".encode() for i in range(3)}
    store = s.store(s.token(pid, tid))  # the task token's own credentials (boto3 on S3)
    assert store.list(task) == sorted(expected)
    assert {k: store.get(k) for k in expected} == expected
    with s.objects(s.server.token()) as http:  # and openhtc's object API, with an API bearer token
        listed = http.get("/htc/storage/list", params={"prefix": task}).json()
        assert [item["key"] for item in listed["items"]] == sorted(expected)
        assert all(item["size"] == 6 for item in listed["items"])
        assert http.get(f"/htc/storage/objects/{task}out/1.txt").content == b"1: 60\n"


def test_outputs_of_a_failing_job_still_appear(storage_server: Any) -> None:
    s = storage_server
    pid, tid = s.api.project_and_task()
    (job,) = _run(s, pid, tid, 'echo partial > "$TASK_SHARED_FOLDER/partial.txt"; exit 3')
    assert (job["status"], job["container"]["exitCode"]) == ("FAILED", 3), job
    key = f"projects/{pid}/tasks/{tid}/partial.txt"
    assert s.store(s.token(pid, tid)).get(key) == b"partial\n"


def test_deleting_a_task_frees_its_storage_and_archiving_keeps_it(storage_server: Any) -> None:
    s = storage_server
    pid, tid = s.api.project_and_task()
    kept_tid = s.api.create_task(pid)["taskId"]
    for t in (tid, kept_tid):
        _run(s, pid, t, 'mkdir -p "$TASK_SHARED_FOLDER/d" && echo x > "$TASK_SHARED_FOLDER/d/f.txt"')
    task, kept = f"projects/{pid}/tasks/{tid}/", f"projects/{pid}/tasks/{kept_tid}/"
    with s.objects(s.server.token()) as http:
        assert [i["key"] for i in http.get("/htc/storage/list", params={"prefix": task}).json()["items"]]

        s.api.request("PATCH", f"/htc/projects/{pid}/tasks/{kept_tid}", json={"lifecycleStatus": "ARCHIVED"})
        deleted = s.api.request("DELETE", f"/htc/projects/{pid}/tasks/{tid}", expect=200).json()
        assert deleted["lifecycleStatus"] == "DELETED"

        assert http.get("/htc/storage/list", params={"prefix": task}).json() == {"items": []}
        assert http.get(f"/htc/storage/objects/{task}d/f.txt").status_code == 404
        kept_keys = [i["key"] for i in http.get("/htc/storage/list", params={"prefix": kept}).json()["items"]]
        assert kept_keys == [kept + "d/f.txt"]
    if s.s3:  # with the store's own admin credentials: nothing is left under the prefix
        import boto3

        ep = s.endpoint
        admin = boto3.client(
            "s3",
            endpoint_url=ep.endpoint,
            aws_access_key_id=ep.access_key,
            aws_secret_access_key=ep.secret_key,
            region_name=ep.region,
        )
        assert admin.list_objects_v2(Bucket=s.bucket, Prefix=task).get("KeyCount") == 0
    else:
        assert not (s.server.data_dir / "storage" / task).exists()
    # The deleted task hands out no more credentials.
    s.api.get(f"/htc/projects/{pid}/tasks/{tid}/storage/token", expect=400)


def test_jobs_on_s3_get_job_scoped_aws_credentials(storage_server: Any) -> None:
    """The job's own AWS_* environment lists and reads shared storage, writes its task's
    storage, and is refused writing shared storage (S3 only: local jobs use the folders)."""
    s = storage_server
    pid, tid = s.api.project_and_task()
    s.store(s.token(pid)).put(f"projects/{pid}/shared/in.txt", b"input")
    bucket_path = f"s3://{s.bucket}/projects/{pid}"
    script = (
        'if [ -z "$AWS_ACCESS_KEY_ID" ]; then echo NO-CREDENTIALS; exit 0; fi; '
        f'"$AWS" s3 ls {bucket_path}/shared/ && '
        f'"$AWS" s3 cp {bucket_path}/shared/in.txt "$TASK_SHARED_FOLDER/copied.txt" && '
        f'echo direct | "$AWS" s3 cp - {bucket_path}/tasks/{tid}/direct.txt && '
        f'if echo bad | "$AWS" s3 cp - {bucket_path}/shared/evil.txt; then echo WROTE-SHARED; fi'
    )
    (job,) = _run(s, pid, tid, script, envs=[{"name": "AWS", "value": s.aws_path()}] if s.s3 else [])
    lines = s.api.log_lines(pid, tid, job["jobUUID"])
    if not s.s3:
        assert job["status"] == "SUCCEEDED" and lines == ["NO-CREDENTIALS"], lines
        return
    assert job["status"] == "SUCCEEDED", lines
    assert "WROTE-SHARED" not in lines and any("AccessDenied" in line for line in lines), lines
    store = s.store(s.token(pid, tid))
    task = f"projects/{pid}/tasks/{tid}/"
    assert store.list(task) == [task + "copied.txt", task + "direct.txt"]
    assert store.get(task + "copied.txt") == b"input"
    assert store.list(f"projects/{pid}/shared/") == [f"projects/{pid}/shared/in.txt"]
