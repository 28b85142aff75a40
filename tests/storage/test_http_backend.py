"""``HttpBackend``: the storage contract over the server's object API, with a real job's token
(what ``htc agent`` stages PROJECT_SHARED_FOLDER and TASK_SHARED_FOLDER through)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

from openhtc.agent.storage import LeaseStager
from openhtc.domain.errors import NotFound, PermissionDenied, Unauthenticated, Unavailable
from openhtc.domain.models import JobLaunch
from openhtc.storage.http_backend import HttpBackend, JobToken

# Nothing here depends on the database: run on the first of --db only.
pytestmark = pytest.mark.one_db


def test_a_job_token_reaches_its_task_and_reads_the_shared_folder(
    storage_server: Any, tmp_path: Path
) -> None:
    s = storage_server
    pid, tid = s.api.project_and_task()
    other_tid = s.api.create_task(pid)["taskId"]
    shared, task = f"projects/{pid}/shared/", f"projects/{pid}/tasks/{tid}/"
    big = os.urandom(2 * 1024 * 1024 + 3)
    with s.objects(s.server.token()) as http:  # the user uploads inputs
        for name, body in (("in.txt", b"input"), ("dir/big.bin", big), ("odd name+%.txt", b"odd")):
            assert http.put(f"/htc/storage/objects/{shared}{name}", content=body).status_code == 200

    backend = HttpBackend(s.server.api_url)
    with pytest.raises(Unauthenticated):  # no token, no call
        backend.list(shared, None, 10)
    token = JobToken(s.job_bearer(pid, tid))
    with backend.acting_as(token):
        listed = backend.list(shared, None, 1000)
        assert [o.key for o in listed] == sorted(
            shared + n for n in ("in.txt", "dir/big.bin", "odd name+%.txt")
        )
        assert all(o.last_modified > 0 for o in listed)
        assert [o.size for o in backend.list(shared, None, 1000) if o.key.endswith("big.bin")] == [len(big)]
        assert len(backend.list(shared, None, 1)) == 1
        assert [o.key for o in backend.list(shared, listed[0].key, 1000)] == [o.key for o in listed[1:]]
        backend.download(shared + "dir/big.bin", str(tmp_path / "big"))
        assert (tmp_path / "big").read_bytes() == big
        assert b"".join(backend.get(shared + "odd name+%.txt").chunks) == b"odd"
        with pytest.raises(NotFound):
            backend.get(shared + "missing")

        (tmp_path / "out.txt").write_bytes(b"result")
        backend.put_file(task + "out/out.txt", str(tmp_path / "out.txt"))
        upload = backend.begin_put(task + "streamed.bin")
        upload.write(b"a" * 10)
        upload.write(b"b")
        assert upload.commit() == 11
        assert [o.key for o in backend.list(task, None, 100)] == [task + "out/out.txt", task + "streamed.bin"]

        # read-only shared folder, other tasks unreachable: the job's scope, never broader
        with pytest.raises(PermissionDenied):
            backend.put_file(shared + "evil.txt", str(tmp_path / "out.txt"))
        with pytest.raises(PermissionDenied):
            backend.put_file(f"projects/{pid}/tasks/{other_tid}/x", str(tmp_path / "out.txt"))
        with pytest.raises(PermissionDenied):
            backend.list(f"projects/{pid}/tasks/{other_tid}/", None, 10)

        assert backend.delete_prefix(task + "out/") == 1
        backend.delete(task + "out/out.txt")  # already gone: no error
        assert not backend.task_deleted(pid, tid)
    with s.objects(s.server.token()) as http:  # what the job wrote is the user's to download
        assert http.get(f"/htc/storage/objects/{task}streamed.bin").content == b"a" * 10 + b"b"
        assert http.delete(f"/htc/projects/{pid}/tasks/{tid}").status_code in (200, 204)
    with backend.acting_as(token):
        assert backend.task_deleted(pid, tid)
        # a job's late output cannot bring a deleted task's storage back
        with pytest.raises(PermissionDenied):
            backend.put_file(task + "late.txt", str(tmp_path / "out.txt"))
    backend.close()


@pytest.mark.backends("local")
def test_an_agents_shared_copy_serves_while_the_server_is_away(storage_server: Any, tmp_path: Path) -> None:
    """``htc agent`` keeps running jobs while its server is away: a job starting then gets the
    last copy of its project's shared folder (a project never synced cannot start: Unavailable)."""
    s = storage_server
    pid, tid = s.api.project_and_task()
    other_pid, other_tid = s.api.project_and_task()
    with s.objects(s.server.token()) as http:
        assert (
            http.put(f"/htc/storage/objects/projects/{pid}/shared/in.txt", content=b"input").status_code
            == 200
        )
    envs = (
        ("RESCALE_HTC_BEARER_TOKEN", s.job_bearer(pid, tid)),
        ("RESCALE_HTC_BEARER_TOKEN", "user's, ignored"),
    )
    other_envs = (("RESCALE_HTC_BEARER_TOKEN", s.job_bearer(other_pid, other_tid)),)
    stager = LeaseStager(s.server.api_url, tmp_path / "agent", shared_ttl=0)

    def launch(job_id: int, project: str, task: str, batch_envs: tuple[tuple[str, str], ...]) -> JobLaunch:
        return JobLaunch(job_id, 1, f"parent:{job_id}", 1, job_id, project, task, "AWS_US_EAST_1", "img",
                         (), (), 1, 512, 1, None, None, batch_envs=batch_envs)  # fmt: skip

    def shared_file(mounts: tuple[Any, ...]) -> bytes:
        return (
            Path(next(m.host_path for m in mounts if m.env_name == "PROJECT_SHARED_FOLDER")) / "in.txt"
        ).read_bytes()

    assert shared_file(stager.prepare(launch(1, pid, tid, envs))) == b"input"
    s.server.stop()
    try:
        assert shared_file(stager.prepare(launch(2, pid, tid, envs))) == b"input"  # the last copy
        for job_id in range(3, 13):  # staging that fails keeps nothing of the attempt (it never ends)
            with pytest.raises(Unavailable):
                stager.prepare(launch(job_id, other_pid, other_tid, other_envs))
        assert sorted(stager._tokens) == [(1, 1), (2, 1)]
    finally:
        s.server.start()
    stager.close()


@pytest.mark.backends("local")
def test_an_expired_job_token_is_renewed_with_the_jobs_refresh_token(
    start_storage_server: Any, tmp_path: Path
) -> None:
    """A job outliving its bearer token still gets its outputs uploaded: the backend renews the
    token once with the job's refresh token (GET /auth/token), as the job itself would."""
    s = start_storage_server(env={"OPENHTC_TOKEN_TTL_SECONDS": "2"})
    pid, tid = s.api.project_and_task()
    job = s.api.submit_one(
        pid,
        tid,
        s.api.job_request(
            ["sh", "-c", "echo B=$RESCALE_HTC_BEARER_TOKEN; echo R=$RESCALE_HTC_REFRESH_TOKEN"]
        ),
    )
    s.api.wait_terminal(pid, tid, 1)
    found = dict(line.split("=", 1) for line in s.api.log_lines(pid, tid, f"{job['parentJobId']}:0"))
    token = JobToken(found["B"], found["R"])
    deadline = time.monotonic() + 30
    shared = {"prefix": f"projects/{pid}/shared/"}
    while s.server.client(token.bearer).get("/htc/storage/list", params=shared).status_code != 401:
        assert time.monotonic() < deadline, "the job's bearer token did not expire"
        time.sleep(0.2)
    expired = token.bearer
    (tmp_path / "out.txt").write_bytes(b"late output")
    backend = HttpBackend(s.server.api_url)
    with backend.acting_as(token):
        backend.put_file(f"projects/{pid}/tasks/{tid}/out.txt", str(tmp_path / "out.txt"))
    assert token.bearer != expired
    with backend.acting_as(token):  # (renewed again if it expired meanwhile: 2 s tokens here)
        assert b"".join(backend.get(f"projects/{pid}/tasks/{tid}/out.txt").chunks) == b"late output"
    with pytest.raises(Unauthenticated), backend.acting_as(JobToken(expired)):  # no refresh token: refused
        backend.list(f"projects/{pid}/shared/", None, 10)
    backend.close()
