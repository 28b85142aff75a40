"""``htc storage`` on every backend (local files, a real SeaweedFS), run as users run it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from openhtc.client import Connection
from openhtc.client.storage import StorageClient

# Nothing here depends on the database: run on the first of --db only.
pytestmark = pytest.mark.one_db

BIN = Path(sys.executable).parent


def htc(s: Any, *args: str, cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    """``htc <args>`` as a user logged in to the server (and nothing else in the environment)."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(s.tmp),
        "XDG_CONFIG_HOME": str(s.tmp / "config"),
        "OPENHTC_URL": s.server.url,
        "OPENHTC_API_KEY": s.server.api_key,
    }
    result = subprocess.run(
        [str(BIN / "htc"), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=300, check=False
    )
    if check and result.returncode != 0:
        raise AssertionError(f"htc {' '.join(args)} -> {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


def ls(s: Any, pid: str, tid: str | None, *args: str) -> dict[str, int]:
    where = ("-p", pid, "-t", tid) if tid else ("-p", pid)
    listed = json.loads(htc(s, "storage", "ls", *where, "--json", *args).stdout)
    return {item["path"]: item["size"] for item in listed}


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_cp_a_file_up_and_down_and_ls(storage_server: Any, tmp_path: Path) -> None:
    s = storage_server
    pid, tid = s.api.project_and_task()
    src = tmp_path / "hello.txt"
    src.write_text("hello storage\n")

    up = htc(s, "storage", "cp", str(src), "htc:inputs/", "-p", pid, "-t", tid)
    assert "inputs/hello.txt" in up.stdout
    htc(s, "storage", "cp", str(src), "htc:renamed.txt", "-p", pid, "-t", tid)
    assert ls(s, pid, tid) == {"inputs/": 0, "renamed.txt": 14}
    assert ls(s, pid, tid, "-r") == {"inputs/hello.txt": 14, "renamed.txt": 14}
    assert ls(s, pid, tid, "htc:inputs") == {"inputs/hello.txt": 14}
    # the human listing shows the same names, relative to the task's storage
    assert "inputs/hello.txt" in htc(s, "storage", "ls", "-r", "-p", pid, "-t", tid).stdout

    down = tmp_path / "down"
    down.mkdir()
    htc(s, "storage", "cp", "htc:inputs/hello.txt", str(down), "-p", pid, "-t", tid)
    htc(s, "storage", "cp", "htc:renamed.txt", str(down / "copy.txt"), "-p", pid, "-t", tid)
    assert tree(down) == {"copy.txt": b"hello storage\n", "hello.txt": b"hello storage\n"}

    # what the CLI stored is what the token's own credentials see
    task_prefix = f"projects/{pid}/tasks/{tid}/"
    assert s.store(s.token(pid, tid)).get(task_prefix + "inputs/hello.txt") == b"hello storage\n"


def test_recursive_cp_both_ways_with_a_large_file_then_rm(storage_server: Any, tmp_path: Path) -> None:
    s = storage_server
    pid, tid = s.api.project_and_task()
    src = tmp_path / "results"
    (src / "deep" / "er").mkdir(parents=True)
    (src / "a.txt").write_text("a\n")
    (src / "deep" / "b.txt").write_text("bb\n")
    (src / "deep" / "er" / "c.bin").write_bytes(os.urandom(20 << 20))  # multipart on S3

    up = htc(s, "storage", "cp", "-r", str(src), "htc:run1", "-p", pid, "-t", tid)
    assert up.stdout.count("upload:") == 3, up.stdout
    assert ls(s, pid, tid, "-r") == {
        "run1/a.txt": 2,
        "run1/deep/b.txt": 3,
        "run1/deep/er/c.bin": 20 << 20,
    }
    assert ls(s, pid, tid, "htc:run1/") == {"run1/a.txt": 2, "run1/deep/": 0}

    down = tmp_path / "back"
    htc(s, "storage", "cp", "-r", "htc:run1", str(down), "-p", pid, "-t", tid)
    assert tree(down) == tree(src)

    htc(s, "storage", "rm", "htc:run1/a.txt", "-p", pid, "-t", tid)
    assert "run1/a.txt" not in ls(s, pid, tid, "-r")
    removed = htc(s, "storage", "rm", "-r", "htc:run1/deep", "-p", pid, "-t", tid)
    assert "2 objects deleted" in removed.stdout
    assert ls(s, pid, tid, "-r") == {}


def test_shared_storage_is_the_root_without_a_task(storage_server: Any, tmp_path: Path) -> None:
    s = storage_server
    pid, tid = s.api.project_and_task()
    src = tmp_path / "in.csv"
    src.write_text("x,y\n")
    htc(s, "storage", "cp", str(src), "htc:", "-p", pid)
    assert ls(s, pid, None) == {"in.csv": 4}
    assert ls(s, pid, tid, "--shared") == {"in.csv": 4}
    assert ls(s, pid, tid) == {}
    # a task's command line reaches shared storage by its URI too
    shared = s.token(pid)["projectSharedStoragePath"]
    htc(s, "storage", "cp", shared + "in.csv", str(tmp_path / "again.csv"), "-p", pid, "-t", tid)
    assert (tmp_path / "again.csv").read_text() == "x,y\n"


def test_mistakes_end_with_one_line_errors_and_change_nothing(storage_server: Any, tmp_path: Path) -> None:
    s = storage_server
    pid, tid = s.api.project_and_task()
    where = ("-p", pid, "-t", tid)
    (tmp_path / "f.txt").write_text("f")

    missing = htc(s, "storage", "cp", "htc:nope.txt", str(tmp_path), *where, check=False)
    assert missing.returncode == 1 and "nope.txt" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1, missing.stderr

    both_local = htc(
        s, "storage", "cp", str(tmp_path / "f.txt"), str(tmp_path / "g.txt"), *where, check=False
    )
    assert both_local.returncode == 2 and "remote" in both_local.stderr

    folder = htc(s, "storage", "cp", str(tmp_path), "htc:x/", *where, check=False)
    assert folder.returncode == 1 and "-r" in folder.stderr

    escape = htc(s, "storage", "cp", str(tmp_path / "f.txt"), "htc:../other/f.txt", *where, check=False)
    assert escape.returncode == 1 and ".." in escape.stderr

    other = s.api.create_task(pid)["taskId"]
    foreign = s.token(pid, other)["storagePath"]
    if s.s3:  # a URI of another task's storage: the token does not reach it
        denied = htc(s, "storage", "cp", str(tmp_path / "f.txt"), foreign + "f.txt", *where, check=False)
        assert denied.returncode == 1, denied.stdout
    assert ls(s, pid, tid, "-r") == {}
    assert ls(s, pid, other, "-r") == {}


def test_token_exports_feed_the_aws_cli(storage_server: Any, tmp_path: Path) -> None:
    s = storage_server
    pid, tid = s.api.project_and_task()
    (tmp_path / "r.txt").write_text("result\n")
    htc(s, "storage", "cp", str(tmp_path / "r.txt"), "htc:out/r.txt", "-p", pid, "-t", tid)

    exports = htc(s, "storage", "token", "-p", pid, "-t", tid).stdout
    assert "export STORAGE_PATH=" in exports
    if not s.s3:
        assert "export OPENHTC_STORAGE_TOKEN=" in exports
        return
    assert "export AWS_SESSION_TOKEN=" in exports
    script = f'eval "$(cat exports)" && {s.aws_path()} s3 ls --recursive "$STORAGE_PATH"'
    (tmp_path / "exports").write_text(exports)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path)}
    result = subprocess.run(
        ["bash", "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert f"projects/{pid}/tasks/{tid}/out/r.txt" in result.stdout


@pytest.mark.backends("local")  # S3 tokens live >= 15 min
def test_a_storage_client_outlives_its_first_token(start_storage_server: Any, tmp_path: Path) -> None:
    s = start_storage_server(env={"OPENHTC_STORAGE_TOKEN_TTL_SECONDS": "2"})
    pid, tid = s.api.project_and_task()
    (tmp_path / "a").write_text("a")
    fetched: list[str] = []
    with Connection(s.server.url, api_key=s.server.api_key) as conn:

        def fetch() -> Any:
            token = conn.get(f"/htc/projects/{pid}/tasks/{tid}/storage/token")
            fetched.append(token["expiration"])
            return token

        with StorageClient(fetch) as store:
            store.upload(tmp_path / "a", store.resolve("a"))
            first = s.store({"provider": "OPENHTC", **store.token.raw})
            # let the first token expire: it stops working, the client carries on with a new one
            expires = datetime.fromisoformat(fetched[0].replace("Z", "+00:00")).timestamp()
            time.sleep(max(0.0, expires - time.time()) + 0.5)
            with pytest.raises(httpx.HTTPStatusError):
                first.list(store.root_key)
            store.upload(tmp_path / "a", store.resolve("b"))
            assert [e.key for e in store.list(store.root_key)] == [store.resolve("a"), store.resolve("b")]
    assert len(fetched) >= 2
