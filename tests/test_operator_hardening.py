"""An operator's mistakes and bad luck: a second server on a data directory, settings that would
be ignored, a port in use, an unusable database, a database outage, a full disk, a large log.

Each failure must be one clear line (exit 2, no traceback) or a clear HTTP error with the
project's error body, and must leave what runs untouched.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from openhtc.api.pagination import encode_cursor
from openhtc.config import Settings
from openhtc.testing.postgres import PostgresCluster, free_port, running_cluster

HTC = str(Path(sys.executable).parent / "htc")


def run_server(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`htc server ARGS` expected to refuse to start (it is killed if it starts after all)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENHTC_")}
    proc = subprocess.Popen(
        [HTC, "server", "--runtime", "process", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"htc server {' '.join(args)} started instead of refusing:\n{err[-3000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def one_line_refusal(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    """The refusal's last stderr line, after checking exit 2, no traceback and the needles."""
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("htc server: "), result.stderr[-3000:]
    for needle in needles:
        assert needle in line, (needle, line)
    return line


# --------------------------------------------------------------------------------------------
# One server per data directory (issue 13 item 5)
# --------------------------------------------------------------------------------------------


def registry_url(log: str) -> str:
    found = re.search(r"container registry on (http://127\.0\.0\.1:\d+)", log)
    assert found, "the server log names no embedded registry"
    return found.group(1)


@pytest.mark.one_db
def test_a_second_server_on_a_data_dir_is_refused_and_the_first_runs_on(server: Any) -> None:
    api = server.api()
    pid, tid = api.project_and_task()
    marker = server.data_dir / "job-ran"
    request = api.job_request(
        ["sh", "-c", f"echo started; while [ ! -e {marker} ]; do sleep 0.1; done; echo done"]
    )
    parent = api.submit_one(pid, tid, request)["parentJobId"]
    api.wait_jobs(pid, tid, lambda jobs: jobs[0]["status"] == "RUNNING", what="the job to run")
    log = server.log_path.read_text()
    registry = registry_url(log) if "container registry on" in log else None  # docker-registry installed
    if registry:
        assert httpx.get(f"{registry}/v2/").status_code in (200, 401)

    cmd = server.command()
    other_port = free_port()
    cmd[cmd.index("--port") + 1] = str(other_port)
    result = run_server(*cmd[cmd.index("server") + 1 :])
    one_line_refusal(
        result,
        f"data directory {server.data_dir} is in use by another openhtc server",
        f"pid {server.proc.pid}",
        f"127.0.0.1:{server.port}",
    )

    # The first server, its registry and its running job are untouched.
    assert server.alive
    if registry:
        assert httpx.get(f"{registry}/v2/").status_code in (200, 401)
    marker.touch()
    job = api.wait_terminal(pid, tid, 1)[0]
    assert job["status"] == "SUCCEEDED", job
    assert api.log_lines(pid, tid, f"{parent}:0") == ["started", "done"]
    # ... and its start-up summary names where it listens and what it uses.
    for line in (
        f"listening on http://127.0.0.1:{server.port}",
        f"data directory: {server.data_dir}",
        "database: SQLite " if server.db_url is None else "database: PostgreSQL ",
        f"storage: local ({server.data_dir / 'storage'})",
        "executor runtime: process (configured: process)",
    ):
        assert line in log, line


def test_the_start_up_summary_hides_the_database_password(tmp_path: Path) -> None:
    from openhtc.startup import describe

    settings = Settings(data_dir=tmp_path, database_url="postgresql://htc:s3cret@db.example:5432/htc")
    text = "\n".join(describe(settings, "bwrap"))
    assert "s3cret" not in text
    assert "database: PostgreSQL htc:***@db.example:5432/htc" in text


# --------------------------------------------------------------------------------------------
# Settings that would be ignored (item 6), and start-up failures (item 12)
# --------------------------------------------------------------------------------------------


def test_s3_settings_without_s3_storage_are_refused(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    result = run_server(
        "--data-dir", str(data_dir), "--port", str(free_port()),
        "--s3-endpoint", "http://127.0.0.1:9", "--s3-bucket", "results",
    )  # fmt: skip
    one_line_refusal(result, "--s3-endpoint, --s3-bucket", "storage is 'local'", "--storage s3")
    assert not data_dir.exists(), "nothing may be created before the settings are checked"


def test_a_port_in_use_is_reported_before_anything_is_made(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_server("--data-dir", str(data_dir), "--port", str(port))
    one_line_refusal(result, f"cannot listen on 127.0.0.1:{port}: address already in use")
    assert not data_dir.exists(), "no data directory, database or admin key before the port check"


def time_wait_port() -> int:
    """A port whose only trace is a closed connection in TIME_WAIT, left as a previous server
    leaves it: its listener had SO_REUSEADDR (as uvicorn's has) and closed first."""
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = int(listener.getsockname()[1])
        client = socket.create_connection(("127.0.0.1", port))
        conn, _ = listener.accept()
        conn.close()  # the active close: this end, on `port`, enters TIME_WAIT
        client.recv(1)
        client.close()
    return port


def test_a_port_in_time_wait_is_not_in_use(tmp_path: Path) -> None:
    port = time_wait_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENHTC_")}
    cmd = [HTC, "server", "--runtime", "noop", "--data-dir", str(tmp_path / "d"), "--port", str(port)]
    with open(tmp_path / "server.log", "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        assert proc.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
        assert httpx.get(f"http://127.0.0.1:{port}/health").json()["database"] == "ok"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def readonly(path: Path, *command: str) -> list[str]:
    """``command`` run with ``path`` mounted read-only, in a mount namespace of its own (we are
    root in the test machines, so permissions alone would not stop a write)."""
    script = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"'
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, str(path), *command]


needs_unshare = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare (mount namespaces)"
)


def test_a_corrupted_database_fails_start_up_in_one_line(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    db = data_dir / "openhtc.db"
    db.write_bytes(os.urandom(64 * 1024))
    result = run_server("--data-dir", str(data_dir), "--port", str(free_port()))
    one_line_refusal(result, f"database SQLite {db} is corrupted", "restore it from a backup")
    assert not (data_dir / "admin-api-key").exists()


def test_an_unreachable_postgresql_fails_start_up_in_one_line(tmp_path: Path) -> None:
    url = f"postgresql://htc:secret@127.0.0.1:{free_port()}/htc"
    result = run_server("--data-dir", str(tmp_path / "d"), "--port", str(free_port()), "--database-url", url)
    line = one_line_refusal(
        result, f"cannot reach the database PostgreSQL htc:***@127.0.0.1:{url.split(':')[3]}"
    )
    assert "secret" not in result.stderr, line


@needs_unshare
def test_a_read_only_data_dir_or_database_fails_start_up_in_one_line(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENHTC_")}
    server = [HTC, "server", "--runtime", "process", "--data-dir", str(data_dir), "--port", str(free_port())]

    def run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60, check=False)

    one_line_refusal(run(readonly(data_dir, *server)), f"data directory {data_dir} is not writable")
    # A database made by a server that has since stopped, then made read-only.
    made = run([HTC, "admin", "create-workspace", "w", "--data-dir", str(data_dir)])
    assert made.returncode == 0, made.stderr
    db = data_dir / "openhtc.db"
    one_line_refusal(run(readonly(db, *server)), f"database SQLite {db} cannot be written")


# --------------------------------------------------------------------------------------------
# Outages and full disks while running (item 12)
# --------------------------------------------------------------------------------------------


@pytest.fixture
def private_pg() -> Iterator[PostgresCluster]:
    """A PostgreSQL cluster of this test's own, to stop and start without disturbing others."""
    with running_cluster() as cluster:
        yield cluster


def assert_error_body(resp: httpx.Response, status: int, kind: str) -> dict[str, Any]:
    assert resp.status_code == status, (resp.status_code, resp.text[:2000])
    assert resp.headers["content-type"].startswith("application/json"), resp.headers
    body = dict(resp.json())
    assert body["errorType"] == body["error"] == kind, body
    assert body["message"] == body["errorDescription"] and body["message"], body
    return body


@pytest.mark.one_db
def test_a_postgresql_outage_answers_503_and_health_names_the_database(
    private_pg: PostgresCluster, start_server: Callable[..., Any]
) -> None:
    server = start_server(db_url=private_pg.new_database())
    api = server.api()
    pid, tid = api.project_and_task()
    jobs_path = f"{api.task_path(pid, tid)}/jobs"
    before = api.jobs(pid, tid)

    log_start = server.log_path.stat().st_size
    private_pg.pause()
    try:
        assert_error_body(api.client.get(jobs_path), 503, "SERVICE_UNAVAILABLE")
        body = {"projectName": "during-outage", "projectDescription": "x"}
        assert_error_body(api.client.post("/htc/projects", json=body), 503, "SERVICE_UNAVAILABLE")
        health = httpx.get(f"{server.url}/health")
        assert health.status_code == 503 and health.json()["database"] == "unavailable", health.text
    finally:
        private_pg.resume()

    # Back without a restart; the request made during the outage changed nothing.
    deadline = time.monotonic() + 30
    while httpx.get(f"{server.url}/health").status_code != 200:
        assert time.monotonic() < deadline, "the server did not recover from the outage"
        time.sleep(0.2)
    assert api.jobs(pid, tid) == before
    names = [p["projectName"] for p in api.get("/htc/projects")["items"]]
    assert "during-outage" not in names
    with open(server.log_path, "rb") as fh:
        fh.seek(log_start)
        during = fh.read().decode(errors="replace")
    assert "Traceback" not in during, during[-3000:]  # an outage is logged in one line per event


# `htc ARGS` with the SQLite database on an 8 MiB tmpfs at DATA_DIR/db, in a mount namespace of
# its own: the test fills that disk through /proc/PID/root without touching the machine's.
ON_SMALL_DISK = """#!/bin/sh
data=""; previous=""
for arg in "$@"; do [ "$previous" = "--data-dir" ] && data="$arg"; previous="$arg"; done
mkdir -p "$data/db" && mount -t tmpfs -o size=8m tmpfs "$data/db" || exit 1
exec {htc} "$@" --database-url "sqlite:///$data/db/openhtc.db"
"""


@needs_unshare
@pytest.mark.one_db
def test_a_full_disk_answers_507_and_changes_nothing(
    start_server: Callable[..., Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wrapper = tmp_path / "htc-on-small-disk"
    wrapper.write_text(ON_SMALL_DISK.format(htc=HTC))
    wrapper.chmod(0o755)
    monkeypatch.setenv("OPENHTC_TEST_HTC", f"unshare --mount --propagation private {wrapper}")
    server = start_server(db_url=None)  # SQLite whatever --db says: PostgreSQL's disk is its own
    api = server.api()
    pid, tid = api.project_and_task()
    request = api.job_request(["true"], batch_size=5)
    api.submit(pid, tid, request)
    api.wait_terminal(pid, tid, 5)
    summary = api.summary(pid, tid)

    filler = Path(f"/proc/{server.proc.pid}/root") / str(server.data_dir / "db").lstrip("/") / "filler"
    with open(filler, "wb", buffering=0) as fh, pytest.raises(OSError):
        while True:
            fh.write(b"\0" * (1 << 20))

    resp = api.client.post(f"{api.task_path(pid, tid)}/jobs/batch", json=[request])
    assert_error_body(resp, 507, "INSUFFICIENT_STORAGE")
    filler.unlink()
    assert api.summary(pid, tid) == summary, "the refused submit must change nothing"
    assert len(api.jobs(pid, tid)) == 5
    api.submit(pid, tid, request)  # space is back: submits work again, no restart
    api.wait_terminal(pid, tid, 10)


def unread_by(pid: int) -> int:
    """Bytes waiting, unread, in the Unix stream sockets of process ``pid`` (``ss -x``)."""
    out = subprocess.run(["ss", "-xpn"], capture_output=True, text=True, check=True).stdout
    return sum(int(line.split()[2]) for line in out.splitlines() if f"pid={pid}," in line)


@pytest.mark.one_db
@pytest.mark.crash
@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2)")
def test_kill_9_of_the_server_leaves_one_line_from_the_job_launcher(server: Any, marker: Any) -> None:
    api = server.api()
    pid, tid = api.project_and_task()
    api.submit_one(pid, tid, api.job_request(["sh", "-c", "sleep 1"], envs=marker.envs))
    api.wait_jobs(pid, tid, lambda jobs: jobs[0]["status"] == "RUNNING", what="the job to run")
    # Stopped, the server reads nothing: the launcher's "exited" for the job stays unread, as
    # when a busy server dies; its death then resets the launcher's connection.
    os.kill(server.proc.pid, signal.SIGSTOP)
    deadline = time.monotonic() + 30
    while unread_by(server.proc.pid) == 0:
        assert time.monotonic() < deadline, "the job launcher reported nothing"
        time.sleep(0.05)
    server.kill9()
    said = "openhtc job launcher: the server went away"
    deadline = time.monotonic() + 30
    while said not in server.log_path.read_text():
        assert time.monotonic() < deadline, server.log_tail()
        time.sleep(0.05)
    assert "Traceback" not in server.log_path.read_text(), server.log_tail()


# --------------------------------------------------------------------------------------------
# Logs: paged with seeks (item 7)
# --------------------------------------------------------------------------------------------

LOG_LINES = 300_000


def peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


@pytest.mark.one_db
def test_a_large_log_is_paged_in_order_exactly_once_without_reading_it_whole(server: Any) -> None:
    api = server.api()
    pid, tid = api.project_and_task()
    pad = "x" * 80
    command = f"seq -f 'line-%07g-{pad}' 1 {LOG_LINES}"
    parent = api.submit_one(pid, tid, api.job_request(["sh", "-c", command]))["parentJobId"]
    api.wait_terminal(pid, tid, 1, timeout=120)
    path = f"{api.task_path(pid, tid)}/jobs/{parent}:0/logs"
    log_file = next((server.data_dir / "logs" / tid).rglob("*.log"))
    assert log_file.stat().st_size > 30 * 1024 * 1024

    # Peak memory while four clients read one line each, oldest and newest first: O(page).
    Path(f"/proc/{server.proc.pid}/clear_refs").write_text("5")  # peak RSS := current RSS
    before = peak_rss_kib(server.proc.pid)

    def read_one(order: str) -> None:
        items = api.client.get(path, params={"pageSize": 1, "sort": order}).json()["items"]
        assert len(items) == 1

    readers = [threading.Thread(target=read_one, args=(order,)) for order in ("asc", "desc") * 2]
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join()
    grown_mib = (peak_rss_kib(server.proc.pid) - before) / 1024
    assert grown_mib < 48, f"reading one line of a 30 MB log took {grown_mib:.0f} MiB more memory"

    expected = [f"line-{i:07d}-{pad}" for i in range(1, LOG_LINES + 1)]
    oldest_first = [e["message"] for e in api.list_all(path, sort="asc", pageSize=10000)]
    assert oldest_first == expected
    newest_first = [e["message"] for e in api.list_all(path, pageSize=7777)]
    assert newest_first == expected[::-1]
    last = api.get(path, pageSize=3)["items"]
    assert [e["message"] for e in last] == expected[:-4:-1]

    for forged in (5, [2, 0], [1, -1], [1, True], {"a": 1}, [1, 1.5], "x", [0, 0]):
        resp = api.client.get(path, params={"pageIndex": encode_cursor(forged)})
        assert_error_body(resp, 400, "VALIDATION_ERROR")
