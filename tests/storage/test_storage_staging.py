"""The executor's S3 staging (``SyncStager``) against a real SeaweedFS, without a server: the
shared copy follows the bucket, unsafe keys stay out, outputs go up, a deleted task's do not."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import pytest

from openhtc.domain.models import JobLaunch
from openhtc.storage.s3 import S3Backend
from openhtc.storage.staging import SyncStager

# Nothing here depends on the database: run on the first of --db only.
pytestmark = pytest.mark.one_db


def _launch(job_id: int, project: str = "p1", task: str = "t1") -> JobLaunch:
    return JobLaunch(job_id, 1, f"parent:{job_id}", 1, job_id, project, task, "AWS_US_EAST_1", "img",
                     (), (), 1, 512, 1, None, None)  # fmt: skip


class _Log:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self) -> Any:
        log = self

        class Writer(io.StringIO):
            def close(self) -> None:
                log.lines += self.getvalue().splitlines()
                super().close()

        return Writer()


@pytest.fixture
def backend(seaweed: Any, tmp_path: Path, request: pytest.FixtureRequest) -> S3Backend:
    bucket = f"stage-{abs(hash(request.node.name)) % 10**8}"
    s3 = S3Backend(
        endpoint=seaweed.endpoint,
        bucket=bucket,
        access_key=seaweed.access_key,
        secret_key=seaweed.secret_key,
        role_arn=seaweed.role_arn,
        region=seaweed.region,
        spool_dir=tmp_path / "spool",
    )
    s3.open()
    return s3


def _put(backend: S3Backend, key: str, data: bytes) -> None:
    backend.s3.put_object(Bucket=backend.bucket, Key=key, Body=data)


def test_the_shared_copy_follows_the_bucket(backend: S3Backend, tmp_path: Path) -> None:
    _put(backend, "projects/p1/shared/a.txt", b"v1")
    _put(backend, "projects/p1/shared/dir/b.txt", b"b")
    _put(backend, "projects/p1/shared/%2e%2e/escape.txt", b"x")  # a legal S3 key, not a safe path
    stager = SyncStager(backend, tmp_path / "stage", lambda p, t: False, shared_ttl=0)
    shared, task = stager.prepare(_launch(1))
    assert (shared.env_name, shared.read_only, task.env_name, task.read_only) == (
        "PROJECT_SHARED_FOLDER", True, "TASK_SHARED_FOLDER", False,
    )  # fmt: skip
    root = Path(shared.host_path)
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    assert files == ["a.txt", "dir/b.txt"]
    assert not list((tmp_path / "stage").rglob("escape.txt"))

    _put(backend, "projects/p1/shared/a.txt", b"version 2")
    backend.delete("projects/p1/shared/dir/b.txt")
    stager.prepare(_launch(2))
    assert (root / "a.txt").read_bytes() == b"version 2"
    assert not (root / "dir" / "b.txt").exists()

    cached = SyncStager(backend, tmp_path / "stage2", lambda p, t: False, shared_ttl=3600)
    first, _ = cached.prepare(_launch(3))
    _put(backend, "projects/p1/shared/new.txt", b"later")
    cached.prepare(_launch(4))  # within the TTL: no second listing
    assert not (Path(first.host_path) / "new.txt").exists()


def test_outputs_are_uploaded_and_problems_logged(backend: S3Backend, tmp_path: Path) -> None:
    stager = SyncStager(backend, tmp_path / "stage", lambda p, t: False)
    launch = _launch(7)
    _, task = stager.prepare(launch)
    folder = Path(task.host_path)
    assert not any(folder.iterdir()), "an attempt starts with an empty folder"
    (folder / "sub").mkdir()
    (folder / "sub" / "r.txt").write_bytes(b"result")
    (folder / "big.bin").write_bytes(os.urandom(9 << 20))  # multipart
    os.mkfifo(folder / "pipe")
    os.symlink("/etc/passwd", folder / "passwd")
    log = _Log()
    stager.finish(launch, False, log)
    keys = [o.key for o in backend.list("projects/p1/tasks/t1/", None, 100)]
    assert sorted(keys) == ["projects/p1/tasks/t1/big.bin", "projects/p1/tasks/t1/sub/r.txt"]
    assert len(log.lines) == 2 and all("not a regular file" in line for line in log.lines), log.lines
    assert not folder.exists(), "the attempt's folder is removed"


def test_a_deleted_task_gets_no_uploads(backend: S3Backend, tmp_path: Path) -> None:
    stager = SyncStager(backend, tmp_path / "stage", lambda p, t: True)
    launch = _launch(9, task="gone")
    _, task = stager.prepare(launch)
    (Path(task.host_path) / "late.txt").write_bytes(b"late")
    stager.finish(launch, True, _Log())
    assert backend.list("projects/p1/tasks/gone/", None, 10) == []
    assert not Path(task.host_path).exists()


def test_an_empty_attempt_folder_serves_only_its_own_task(backend: S3Backend, tmp_path: Path) -> None:
    """A folder its job left empty is used again by a later attempt of the same task only: a
    process job A left behind writing into it late must not put files into another task's
    outputs (before: the next job, of any task or project, got it)."""
    stager = SyncStager(backend, tmp_path / "stage", lambda p, t: False)
    a = _launch(1, task="ta")
    _, a_task = stager.prepare(a)
    stager.finish(a, True, _Log())  # empty: kept for a later attempt of task ta
    b = _launch(2, project="p2", task="tb")
    _, b_task = stager.prepare(b)
    assert b_task.host_path != a_task.host_path
    (Path(a_task.host_path) / "late.txt").write_bytes(b"job A's leftover process")
    stager.finish(b, False, _Log())
    assert backend.list("projects/p2/tasks/tb/", None, 10) == []

    c = _launch(3, task="tc")  # within one task the folder is still used again
    _, c_task = stager.prepare(c)
    stager.finish(c, False, _Log())
    _, again = stager.prepare(_launch(4, task="tc"))
    assert again.host_path == c_task.host_path
