"""The embedded registry: ``docker-registry serve`` as a supervised child process on loopback.

``htc server`` writes ``DATA_DIR/registry/config.yml`` (filesystem storage under DATA_DIR, token
auth pointing at this server), starts the registry from a supervising thread, waits until it
answers, restarts it when it dies and stops it with the server. The port is kept in the config
so image references (``127.0.0.1:PORT/{projectId}/repo:tag``) stay valid across restarts.

The child gets ``setpriv --pdeathsig KILL`` when available, so a server killed with SIGKILL does
not leave its registry behind; the next start also kills a registry a dead server left (found
through the pid file and its command line), the way the process runtime sweeps orphans.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

log = logging.getLogger("openhtc.registry")
READY_TIMEOUT = 20.0
MAX_BACKOFF = 30.0


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As the registry binds (Go sets SO_REUSEADDR): connections in TIME_WAIT do not count.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class EmbeddedRegistry:
    """One docker-registry child process. ``url`` is known before ``start`` (the kept port)."""

    def __init__(
        self,
        *,
        binary: str,
        root: Path,
        port: int | None,
        realm: str,
        service: str,
        issuer: str,
        cert_path: Path,
    ) -> None:
        self.binary_path = shutil.which(binary)
        self.binary = binary
        self.root = root
        self.config_path = root / "config.yml"
        self.pid_path = root / "registry.pid"
        self.log_path = root / "registry.log"
        self.realm = realm
        self.service = service
        self.issuer = issuer
        self.cert_path = cert_path
        self._fixed_port = port
        self.port = port or self._kept_port() or 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._ready = threading.Event()
        self.started = False

    @property
    def installed(self) -> bool:
        return self.binary_path is not None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- configuration --------------------------------------------------------------------------

    def _kept_port(self) -> int | None:
        with contextlib.suppress(OSError, yaml.YAMLError, AttributeError, KeyError, ValueError, TypeError):
            addr = yaml.safe_load(self.config_path.read_text())["http"]["addr"]
            return int(str(addr).rsplit(":", 1)[1])
        return None

    def _choose_port(self) -> int:
        if self._fixed_port:
            return self._fixed_port  # the user asked for it: fail loudly if it is taken
        if self.port:
            # A registry killed just before (see _kill_orphan) can release its socket a moment
            # after it is reaped: give the kept port a short while before picking another.
            deadline = time.monotonic() + 2
            while not port_is_free(self.port):
                if time.monotonic() > deadline:
                    return free_port()
                time.sleep(0.05)
            return self.port
        return free_port()

    def config(self) -> dict[str, Any]:
        return {
            "version": 0.1,
            "log": {"level": "warn", "accesslog": {"disabled": True}},
            "storage": {
                "filesystem": {"rootdirectory": str(self.root / "data")},
                "delete": {"enabled": True},
            },
            "http": {"addr": f"127.0.0.1:{self.port}", "secret": self._http_secret()},
            "auth": {
                "token": {
                    "realm": self.realm,
                    "service": self.service,
                    "issuer": self.issuer,
                    "rootcertbundle": str(self.cert_path),
                }
            },
        }

    def _http_secret(self) -> str:
        """Kept across restarts: the registry signs upload state with it."""
        with contextlib.suppress(OSError, yaml.YAMLError, AttributeError, KeyError, TypeError):
            secret = yaml.safe_load(self.config_path.read_text())["http"]["secret"]
            if isinstance(secret, str) and secret:
                return secret
        return secrets.token_hex(32)

    def _write_config(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.config_path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            yaml.safe_dump(self.config(), fh, sort_keys=False)
        os.replace(tmp, self.config_path)

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> bool:
        """Start and supervise the registry; True once it answers. Without the binary, warn."""
        if not self.installed:
            log.warning(
                "%s is not installed: the container registry is disabled (image push, image "
                "status and container jobs will fail). Install it with `apt-get install "
                "docker-registry`, or point --registry-url at an external registry.",
                self.binary,
            )
            return False
        self._kill_orphan()
        self.port = self._choose_port()
        self._write_config()
        self._stopping.clear()
        self._thread = threading.Thread(target=self._supervise, name="registry-supervisor", daemon=True)
        self._thread.start()
        self.started = True
        if not self._ready.wait(READY_TIMEOUT):
            log.error("docker-registry did not answer on %s within %.0f s; see %s", self.url,
                      READY_TIMEOUT, self.log_path)  # fmt: skip
            return False
        log.info("container registry on %s (data in %s)", self.url, self.root / "data")
        return True

    def stop(self) -> None:
        self._stopping.set()
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        if self._thread is not None:
            self._thread.join(timeout=15)
        with contextlib.suppress(OSError):
            self.pid_path.unlink()
        self.started = False

    def _command(self) -> list[str]:
        assert self.binary_path is not None
        cmd = [self.binary_path, "serve", str(self.config_path)]
        setpriv = shutil.which("setpriv")
        # The death signal follows the thread that forks: the long-lived supervisor thread.
        return [setpriv, "--pdeathsig", "KILL", *cmd] if setpriv else cmd

    def _spawn(self) -> subprocess.Popen[bytes]:
        # REGISTRY_* variables would override the config file; the child must see ours only.
        env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
        with open(self.log_path, "ab") as logfile:
            proc = subprocess.Popen(
                self._command(),
                stdin=subprocess.DEVNULL,
                stdout=logfile,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # a Ctrl-C meant for the server must not reach it first
            )
        self.pid_path.write_text(f"{proc.pid}\n")
        return proc

    def _answering(self) -> bool:
        try:
            # With token auth /v2/ answers 401 to an anonymous caller: that means "up".
            return httpx.get(f"{self.url}/v2/", timeout=1.0).status_code in (200, 401)
        except httpx.HTTPError:
            return False

    def _wait_ready(self, proc: subprocess.Popen[bytes]) -> bool:
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline and not self._stopping.is_set():
            if proc.poll() is not None:
                return False
            if self._answering():
                return True
            time.sleep(0.05)
        return False

    def _supervise(self) -> None:
        backoff = 1.0
        while not self._stopping.is_set():
            began = time.monotonic()
            try:
                proc = self._proc = self._spawn()
            except OSError as exc:
                log.error("cannot start %s: %s", self.binary, exc)
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)
                continue
            if self._wait_ready(proc):
                self._ready.set()
            code = proc.wait()
            if self._stopping.is_set():
                return
            if time.monotonic() - began > 60:
                backoff = 1.0
            log.warning("docker-registry exited with %s; restarting in %.0f s (log: %s)", code, backoff,
                        self.log_path)  # fmt: skip
            self._stopping.wait(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF)

    def _kill_orphan(self) -> None:
        """Kill the registry a killed server left running on this data directory, if any."""
        try:
            pid = int(self.pid_path.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            return
        if str(self.config_path).encode() not in cmdline:
            return  # the pid was reused by something else
        log.warning("stopping the registry (pid %d) a previous server left running", pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while _running(pid) and time.monotonic() < deadline:
            time.sleep(0.05)


def _running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (a zombie holds no port)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False
