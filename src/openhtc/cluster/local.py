"""A whole cluster on this machine: PostgreSQL, API servers, and agents in network namespaces.

``LocalCluster(spec).up()`` starts a private PostgreSQL in ``DIR/postgres``, ``spec.servers``
``htc server --no-executor`` processes on the bridge address (``netns.py``), mints one agent
token, and starts ``spec.agents`` ``htc agent`` processes, each in its own namespace, agent K
talking to server ``K % servers``. Everything is recorded in ``DIR/cluster.json`` so that a later
``htc cluster status|down`` (another process) finds it: ``LocalCluster.load(DIR)``.

The servers share what a real deployment shares through PostgreSQL and external stores: the
signing keys (server 0's ``keys/`` is copied to the others before they start), and the job logs
and local storage (``logs/`` and ``storage/`` of every server are links to ``DIR/shared``, as an
NFS mount would be). Processes run in sessions of their own, so they outlive the command that
started them and no terminal signal reaches them.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from openhtc.cluster import netns
from openhtc.testing.postgres import PostgresCluster, free_port

STATE_FILE = "cluster.json"
START_TIMEOUT = 60.0


def htc_executable() -> str:
    """The ``htc`` beside this Python (the same installation), else the one on PATH."""
    beside = Path(sys.executable).parent / "htc"
    if beside.exists():
        return str(beside)
    found = shutil.which("htc")
    if not found:
        raise netns.ClusterNetError("the `htc` command is not installed")
    return found


def _clean_env(extra: dict[str, str]) -> dict[str, str]:
    """The caller's environment without its OPENHTC_ settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENHTC_")}
    env.update(extra)
    return env


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of this process is dead too: reap it if it is ours.
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True
    return done == 0


def _stop_pid(pid: int, timeout: float = 15.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout``."""
    if not _alive(pid):
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


@dataclass
class ClusterSpec:
    """What ``htc cluster up`` starts. ``server_env`` and ``agent_env`` are OPENHTC_ settings for
    the servers and agents (e.g. a short OPENHTC_AGENT_LIVENESS_SECONDS in tests)."""

    directory: Path
    agents: int = 3
    servers: int = 2
    runtime: str = "process"
    region: str = "AWS_US_EAST_1"
    agent_vcpus: int | None = None
    agent_memory_mb: int | None = None
    server_env: dict[str, str] = field(default_factory=dict)
    agent_env: dict[str, str] = field(default_factory=dict)


@dataclass
class ClusterState:
    """What ``cluster.json`` holds: enough for another process to inspect and stop the cluster."""

    bridge: int
    agents: int
    region: str
    runtime: str
    database_url: str
    pg_base: str
    pg_port: int
    token: str = ""
    server_ports: list[int] = field(default_factory=list)
    server_pids: list[int] = field(default_factory=list)
    agent_pids: list[int] = field(default_factory=list)
    agent_args: list[list[str]] = field(default_factory=list)


class LocalCluster:
    def __init__(self, spec: ClusterSpec, state: ClusterState | None = None) -> None:
        self.spec = spec
        self.dir = spec.directory.resolve()
        self.state = state

    # -- addresses and credentials -------------------------------------------------------------

    @property
    def bridge(self) -> netns.Bridge:
        assert self.state is not None
        return netns.Bridge(self.state.bridge)

    @property
    def urls(self) -> list[str]:
        assert self.state is not None
        return [f"http://{self.bridge.address}:{port}" for port in self.state.server_ports]

    @property
    def url(self) -> str:
        return self.urls[0]

    @property
    def api_key(self) -> str:
        return (self.server_dir(0) / "admin-api-key").read_text().strip()

    def server_dir(self, index: int) -> Path:
        return self.dir / f"server-{index}"

    def agent_dir(self, index: int) -> Path:
        return self.dir / f"agent-{index}"

    def _save(self) -> None:
        assert self.state is not None
        path = self.dir / STATE_FILE
        path.write_text(json.dumps({"spec": _spec_json(self.spec), "state": asdict(self.state)}, indent=1))
        path.chmod(0o600)  # it holds the agent token

    @classmethod
    def load(cls, directory: Path) -> LocalCluster:
        """The cluster ``htc cluster up`` started in ``directory``."""
        path = directory / STATE_FILE
        if not path.exists():
            raise netns.ClusterNetError(f"no cluster in {directory} (no {STATE_FILE})")
        data = json.loads(path.read_text())
        spec = data["spec"]
        spec["directory"] = Path(spec["directory"])
        return cls(ClusterSpec(**spec), ClusterState(**data["state"]))

    # -- up ------------------------------------------------------------------------------------

    def up(self) -> None:
        """Start everything; on a failure, stop what was started and raise."""
        netns.require_root()
        if (self.dir / STATE_FILE).exists():
            raise netns.ClusterNetError(f"a cluster already runs from {self.dir}: `htc cluster down` first")
        if self.spec.servers < 1 or self.spec.agents < 0:
            raise netns.ClusterNetError("a cluster needs at least one server")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dir.chmod(0o755)  # PostgreSQL runs as 'postgres' under root: it must reach DIR/postgres
        try:
            self._up()
        except BaseException:
            self.down()
            raise

    def _up(self) -> None:
        pg = PostgresCluster(base=self.dir / "postgres")
        pg.start()
        try:
            bridge = netns.create_bridge()
        except BaseException:
            pg.stop()
            raise
        self.state = ClusterState(
            bridge=bridge.number, agents=0, region=self.spec.region, runtime=self.spec.runtime,
            database_url=pg.new_database(), pg_base=str(pg.base), pg_port=pg.port,
        )  # fmt: skip
        self._save()
        for index in range(self.spec.servers):
            self._start_server(index)
        if self.spec.agents:
            self.state.token = self._agent_token()
        for index in range(self.spec.agents):
            netns.add_namespace(bridge, index)
            self.state.agents = index + 1
            self.state.agent_pids.append(0)
            self.start_agent(index)
        self._save()

    def _start_server(self, index: int) -> None:
        assert self.state is not None
        data = self.server_dir(index)
        data.mkdir(parents=True, exist_ok=True)
        shared = self.dir / "shared"
        for name in ("logs", "storage"):
            (shared / name).mkdir(parents=True, exist_ok=True)
            link = data / name
            if not link.is_symlink():
                link.symlink_to(shared / name)
        if index > 0:  # one signing key for every server: a token minted by one passes all
            shutil.copytree(self.server_dir(0) / "keys", data / "keys", dirs_exist_ok=True)
        port = free_port()
        cmd = [
            htc_executable(), "server", "--data-dir", str(data), "--host", self.bridge.address,
            "--port", str(port), "--database-url", self.state.database_url, "--no-executor",
            "--runtime", self.spec.runtime, "--region", self.spec.region,
        ]  # fmt: skip
        with open(self.dir / f"server-{index}.log", "ab") as log:
            proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=_clean_env(self.spec.server_env), start_new_session=True,
            )  # fmt: skip
        self.state.server_ports.append(port)
        self.state.server_pids.append(proc.pid)
        self._save()
        self._wait_healthy(f"http://{self.bridge.address}:{port}", proc, index)

    def _wait_healthy(self, url: str, proc: subprocess.Popen[bytes], index: int) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        tail = (self.dir / f"server-{index}.log").read_text(errors="replace")[-3000:]
        raise netns.ClusterNetError(f"server {index} did not answer {url}/health:\n{tail}")

    def _agent_token(self) -> str:
        assert self.state is not None
        cmd = [
            htc_executable(), "admin", "create-agent-token", "--region", self.spec.region,
            "--name", f"cluster-{self.state.bridge}", "--agents", str(max(1, self.spec.agents)),
            "--data-dir", str(self.server_dir(0)),
            "--database-url", self.state.database_url,
        ]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True, env=_clean_env({}), timeout=60, check=False)
        lines = [line.strip() for line in out.stdout.splitlines() if line.strip()]
        if out.returncode != 0 or not lines:
            raise netns.ClusterNetError(f"htc admin create-agent-token failed:\n{out.stdout}{out.stderr}")
        return lines[-1]

    # -- agents --------------------------------------------------------------------------------

    def agent_command(self, index: int) -> list[str]:
        assert self.state is not None
        cmd = [
            "ip", "netns", "exec", self.bridge.namespace(index), htc_executable(), "agent",
            "--server", self.urls[index % len(self.urls)],  # the token: in the environment, not ps
            "--region", self.spec.region, "--runtime", self.spec.runtime,
            "--work-dir", str(self.agent_dir(index)),
        ]  # fmt: skip
        if self.spec.agent_vcpus:
            cmd += ["--vcpus", str(self.spec.agent_vcpus)]
        if self.spec.agent_memory_mb:
            cmd += ["--memory-mb", str(self.spec.agent_memory_mb)]
        return cmd

    def start_agent(self, index: int) -> int:
        """(Re)start agent ``index`` in its namespace; returns its pid."""
        assert self.state is not None
        self.agent_dir(index).mkdir(parents=True, exist_ok=True)
        with open(self.dir / f"agent-{index}.log", "ab") as log:
            proc = subprocess.Popen(
                self.agent_command(index), stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
                env=_clean_env({**self.spec.agent_env, "OPENHTC_AGENT_TOKEN": self.state.token}),
            )  # fmt: skip
        self.state.agent_pids[index] = proc.pid
        self._save()
        return proc.pid

    def kill_agent(self, index: int) -> list[int]:
        """SIGKILL every process in agent ``index``'s namespace: the agent and all its jobs."""
        return netns.kill_namespace(self.bridge.namespace(index))

    def cut(self, index: int) -> None:
        netns.set_link(self.bridge, index, up=False)

    def restore(self, index: int) -> None:
        netns.set_link(self.bridge, index, up=True)

    # -- status and down -----------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        assert self.state is not None
        servers = []
        for index, (url, pid) in enumerate(zip(self.urls, self.state.server_pids, strict=True)):
            try:
                healthy = httpx.get(f"{url}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                healthy = False
            servers.append({"index": index, "url": url, "pid": pid, "alive": _alive(pid), "healthy": healthy})
        agents = []
        for index in range(self.state.agents):
            pid = self.state.agent_pids[index]
            link = netns.ip("-o", "link", "show", self.bridge.host_veth(index), check=False)
            agents.append({
                "index": index, "namespace": self.bridge.namespace(index),
                "address": self.bridge.agent_address(index), "server": self.urls[index % len(self.urls)],
                "pid": pid, "alive": bool(pid) and _alive(pid), "link_up": "state UP" in link,
                "processes": len(netns.namespace_pids(self.bridge.namespace(index))),
            })  # fmt: skip
        return {
            "directory": str(self.dir), "bridge": self.bridge.name, "address": self.bridge.address,
            "database_url": self.state.database_url, "servers": servers, "agents": agents,
        }  # fmt: skip

    def down(self) -> None:
        """Stop agents (SIGTERM, then every process of their namespaces), servers, PostgreSQL;
        delete the namespaces, veths and bridge. The logs stay in the directory."""
        if self.state is None:
            return
        for pid in self.state.agent_pids:
            if pid:
                _stop_pid(pid, timeout=5)
        for pid in self.state.server_pids:
            _stop_pid(pid)
        netns.remove(self.bridge, self.state.agents)
        if self.state.pg_port:
            try:
                PostgresCluster.attach(Path(self.state.pg_base), self.state.pg_port).stop()
            except Exception:  # already stopped: the directory still goes
                shutil.rmtree(self.state.pg_base, ignore_errors=True)
        (self.dir / STATE_FILE).unlink(missing_ok=True)
        self.state = None


def _spec_json(spec: ClusterSpec) -> dict[str, Any]:
    data = asdict(spec)
    data["directory"] = str(spec.directory.resolve())
    return data
