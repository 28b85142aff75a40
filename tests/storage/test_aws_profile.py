"""`aws s3` the way Rescale's tutorial runs it: after a one-time `htc storage configure-aws`, the
three AWS_* keys of a task token are all `aws s3 cp` needs. On local storage the CLI says
plainly that S3 tools need another backend."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.one_db

BIN = Path(sys.executable).parent
TUTORIAL_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


def htc(s: Any, home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "OPENHTC_URL": s.server.url,
        "OPENHTC_API_KEY": s.server.api_key,
    }
    return subprocess.run(
        [str(BIN / "htc"), *args], env=env, capture_output=True, text=True, timeout=120, check=False
    )


@pytest.mark.backends("seaweedfs")
def test_configure_aws_then_the_three_keys_suffice(storage_server: Any, tmp_path: Path) -> None:
    s = storage_server
    pid, tid = s.api.project_and_task()
    task = f"projects/{pid}/tasks/{tid}/"
    s.store(s.token(pid, tid)).put(task + "out/result.txt", b"42\n")
    home = tmp_path / "home"
    home.mkdir()
    (home / ".aws").mkdir()
    (home / ".aws" / "config").write_text("[profile work]\nregion = eu-west-1\n")

    done = htc(s, home, "storage", "configure-aws")
    assert done.returncode == 0, done.stderr
    config = (home / ".aws" / "config").read_text()
    assert "[profile work]" in config and s.endpoint.endpoint in config  # other profiles kept

    token = s.token(pid, tid)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home)}
    env |= {k: token["credentials"][k] for k in TUTORIAL_KEYS}  # exactly what the tutorial exports
    got = subprocess.run(
        [s.aws_path(), "s3", "cp", token["storagePath"], str(tmp_path / "out"), "--recursive"],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert got.returncode == 0, got.stdout + got.stderr
    assert (tmp_path / "out" / "out" / "result.txt").read_text() == "42\n"


@pytest.mark.backends("local")
def test_local_storage_says_s3_tools_need_another_backend(storage_server: Any, tmp_path: Path) -> None:
    s = storage_server
    pid = s.api.create_project()["projectId"]
    token = htc(s, tmp_path, "storage", "token", "-p", pid)
    assert token.returncode == 0 and "export " in token.stdout  # still usable by htc storage
    assert "--storage seaweedfs" in token.stderr, token.stderr
    configure = htc(s, tmp_path, "storage", "configure-aws")
    assert configure.returncode == 1 and "--storage seaweedfs" in configure.stderr, configure.stderr
    assert not (tmp_path / ".aws").exists()
