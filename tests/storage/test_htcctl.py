"""``htcctl`` as Rescale's tutorial uses it: from a workstation with an API key, and inside real
jobs (process runtime) with nothing but the job's own environment."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

# Nothing here depends on the database: run on the first of --db only.
pytestmark = pytest.mark.one_db

BIN = Path(sys.executable).parent


def htcctl(
    s: Any, *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``htcctl <args>`` outside a job: an API key in RESCALE_API_TOKEN and the API's URL."""
    base = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(cwd),
        "XDG_CONFIG_HOME": str(cwd / ".config"),
        "RESCALE_API_TOKEN": s.server.api_key,
        "OPENHTC_API_URL": s.server.api_url,
    }
    return subprocess.run(
        [str(BIN / "htcctl"), *args],
        env={**base, **(env or {})},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"{result.args} -> {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def test_upload_list_download_from_a_workstation(storage_server: Any, tmp_path: Path) -> None:
    s = storage_server
    pid, tid = s.api.project_and_task()
    work = tmp_path / "work"
    (work / "data").mkdir(parents=True)
    (work / "data" / "in.txt").write_text("1 2 3\n")
    (work / "list.txt").write_text("data/in.txt\n")

    ok(htcctl(s, "--project-shared", "--project-id", pid, "upload", "data/in.txt", "list.txt", cwd=work))
    assert ok(htcctl(s, "-s", "--project-id", pid, "list", cwd=work)).split() == ["data/in.txt", "list.txt"]
    shared = f"projects/{pid}/shared/"
    assert s.store(s.token(pid)).get(shared + "data/in.txt") == b"1 2 3\n"

    ok(htcctl(s, "-s", "--project-id", pid, "download", "data/in.txt", "list.txt", "-d", "fetched", cwd=work))
    assert (work / "fetched" / "data" / "in.txt").read_text() == "1 2 3\n"
    assert (work / "fetched" / "list.txt").read_text() == "data/in.txt\n"
    # a folder key fetches everything under it
    ok(htcctl(s, "-s", "--project-id", pid, "download", "data", "-d", "folder", cwd=work))
    assert (work / "folder" / "data" / "in.txt").exists()

    # task storage, chosen by --task-id or RESCALE_HTC_TASK_ID
    ok(htcctl(s, "--project-id", pid, "--task-id", tid, "upload", "data", cwd=work))
    assert ok(
        htcctl(s, "list", cwd=work, env={"RESCALE_HTC_PROJECT_ID": pid, "RESCALE_HTC_TASK_ID": tid})
    ) == ("data/in.txt\n")


def test_failures_exit_non_zero_with_one_line(storage_server: Any, tmp_path: Path) -> None:
    s = storage_server
    pid = s.api.create_project()["projectId"]
    cases = [
        (("-s", "--project-id", pid, "download", "missing.txt"), "missing.txt"),
        (("-s", "--project-id", pid, "upload", "absent.txt"), "absent.txt"),
        (("--project-id", pid, "list"), "--task-id"),  # task storage without a task
        (("-s", "--project-id", "no-such-project", "list"), "no-such-project"),
    ]
    for args, needle in cases:
        result = htcctl(s, *args, cwd=tmp_path)
        assert result.returncode != 0, (args, result.stdout)
        assert needle in result.stderr, (args, result.stderr)
    bad_key = htcctl(s, "-s", "--project-id", pid, "list", cwd=tmp_path, env={"RESCALE_API_TOKEN": "0" * 40})
    assert bad_key.returncode == 1 and len(bad_key.stderr.strip().splitlines()) == 1, bad_key.stderr
    assert ok(htcctl(s, "-s", "--project-id", pid, "list", cwd=tmp_path)) == ""


# The tutorial's job: fetch its input from project storage, write its output, push it to task
# storage -- the very commands of face_tagger.py, which gets project and task from the job.
JOB_SCRIPT = """
set -e
htcctl -s download inputs/words.txt
mkdir -p out
tr a-z A-Z < inputs/words.txt > "out/words-$AWS_BATCH_JOB_ARRAY_INDEX.txt"
htcctl upload "out/words-$AWS_BATCH_JOB_ARRAY_INDEX.txt"
if htcctl -s upload "out/words-$AWS_BATCH_JOB_ARRAY_INDEX.txt" 2>/dev/null; then echo SHARED-WRITABLE; fi
htc storage ls -r
"""


def test_jobs_use_htcctl_and_htc_storage_with_no_set_up(start_storage_server: Any, tmp_path: Path) -> None:
    # The venv's bin on the server's PATH, as `pip install openhtc` would put htcctl on a node's.
    path = f"{BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}"
    s = start_storage_server(env={"PATH": path}, runtime="process")
    pid, tid = s.api.project_and_task()
    work = tmp_path / "work"
    (work / "inputs").mkdir(parents=True)
    (work / "inputs" / "words.txt").write_text("hello htc\n")
    ok(htcctl(s, "-s", "--project-id", pid, "upload", "inputs/words.txt", cwd=work))

    s.api.submit_one(pid, tid, s.api.job_request(["sh", "-c", JOB_SCRIPT], batch_size=2))
    jobs = s.api.wait_terminal(pid, tid, 2, timeout=180)
    logs = {j["jobUUID"]: s.api.log_lines(pid, tid, j["jobUUID"]) for j in jobs}
    assert [j["status"] for j in jobs] == ["SUCCEEDED"] * 2, logs
    for uuid, lines in logs.items():
        assert "SHARED-WRITABLE" not in lines  # a job's shared storage is read-only
        own = f"out/words-{uuid.split(':')[1]}.txt"  # `htc storage ls -r` lists the task's storage
        assert any(line.split()[-1:] == [own] for line in lines), lines

    task = f"projects/{pid}/tasks/{tid}/"
    store = s.store(s.token(pid, tid))
    assert store.list(task) == [task + "out/words-0.txt", task + "out/words-1.txt"]
    assert store.get(task + "out/words-1.txt") == b"HELLO HTC\n"
    assert s.store(s.token(pid)).list(f"projects/{pid}/shared/") == [
        f"projects/{pid}/shared/inputs/words.txt"
    ]


def test_the_bundle_needs_only_the_standard_library(storage_server: Any, tmp_path: Path) -> None:
    """`htc htcctl-bundle` writes one file that works with python3 -I -S (no site-packages, so
    no openhtc, httpx or boto3), with the tutorial's variables: RESCALE_API_URL and an API key,
    then a job's bearer token only."""
    s = storage_server
    pid, tid = s.api.project_and_task()
    bundle = tmp_path / "bin" / "htcctl"
    out = subprocess.run(
        [str(BIN / "htc"), "htcctl-bundle", str(bundle)], capture_output=True, text=True, check=True
    )
    assert bundle.stat().st_mode & 0o111 and str(bundle) in out.stdout
    work = tmp_path / "work"
    (work / "inputs").mkdir(parents=True)
    (work / "inputs" / "a.txt").write_text("alpha\n")

    def run(*args: str, **env: str) -> str:
        clean = {"PATH": "/usr/bin:/bin", "HOME": str(work), "RESCALE_API_URL": s.server.url, **env}
        result = subprocess.run(
            [sys.executable, "-I", "-S", str(bundle), *args],
            env=clean, cwd=work, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        return ok(result)

    key = {"RESCALE_API_TOKEN": s.server.api_key}
    run("--project-shared", "--project-id", pid, "upload", "inputs", **key)
    assert run("-s", "--project-id", pid, "list", **key).split() == ["inputs/a.txt"]
    # as the tutorial simulates a job: the bearer token, project and task in the environment
    job = {"RESCALE_HTC_BEARER_TOKEN": s.job_bearer(pid, tid), "RESCALE_HTC_PROJECT_ID": pid}
    job["RESCALE_HTC_TASK_ID"] = tid
    run("-s", "download", "inputs/a.txt", "-d", "got", **job)
    assert (work / "got" / "inputs" / "a.txt").read_text() == "alpha\n"
    run("upload", "got/inputs/a.txt", **job)
    assert run("list", **job).split() == ["got/inputs/a.txt"]
    assert s.store(s.token(pid, tid)).get(f"projects/{pid}/tasks/{tid}/got/inputs/a.txt") == b"alpha\n"


def test_connection_hints_name_the_real_option_and_the_job_network(tmp_path: Path) -> None:
    """Nothing listens on the URL: outside a job the hint names --api-url and RESCALE_API_URL;
    inside one (its variables set) it says the job may have no network."""
    base = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "RESCALE_API_URL": "http://127.0.0.1:9/api/v1"}
    cases = [
        ({"RESCALE_API_TOKEN": "k"}, "--api-url or RESCALE_API_URL"),
        ({"RESCALE_HTC_BEARER_TOKEN": "t"}, "no network"),
    ]
    for env, needle in cases:
        result = subprocess.run(
            [str(BIN / "htcctl"), "-s", "--project-id", "p", "list"],
            env={**base, **env}, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert result.returncode == 1 and needle in result.stderr, result.stderr
        assert "127.0.0.1:9" in result.stderr and "8080" not in result.stderr
