"""Peer systems' plumbing: the side virtualenv, Debian packages, and the driver subprocesses.

Peers never share the harness's interpreter. HyperQueue, Dask and Ray are pip-installed on demand
into ``bench/.peers-venv`` (git-ignored); Slurm comes from Debian (``slurm-wlm`` + ``munge``). A
peer's measurement runs in a *driver*: a small stdlib-only script in ``bench/drivers/`` started
with the side venv's Python, which starts the peer, runs one workload and prints one JSON line.
Drivers of peers that bind every interface run inside ``unshare --net`` with only loopback up.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.common import REPO, log

PEERS_VENV = REPO / "bench" / ".peers-venv"
DRIVERS = REPO / "bench" / "drivers"


class PeerUnavailable(Exception):
    """A peer that could not be installed or started here; reported as 'unavailable: why'."""


def _venv_python() -> Path:
    return PEERS_VENV / "bin" / "python"


def _base_python() -> str:
    # The interpreter the harness's own venv was made from (sys.executable is the venv's shim).
    return getattr(sys, "_base_executable", None) or sys.executable


def _installed(python: Path, module: str) -> str | None:
    """The version of ``module`` importable by ``python``, or None."""
    probe = f"import importlib.metadata as m, {module}; print(m.version({module!r}))"
    run = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, timeout=120)
    return run.stdout.strip() or None if run.returncode == 0 else None


def ensure_pip(module: str, requirement: str, *, dist: str | None = None) -> str:
    """Make ``module`` importable in the side venv (pip install ``requirement`` if needed).

    Returns the installed version; raises PeerUnavailable with pip's last words on failure.
    """
    python = _venv_python()
    if not python.exists():
        log(f"creating the peers' side virtualenv: {_base_python()} -m venv {PEERS_VENV}")
        made = subprocess.run([_base_python(), "-m", "venv", str(PEERS_VENV)], capture_output=True, text=True)
        if made.returncode != 0:
            raise PeerUnavailable(f"python -m venv failed: {made.stderr.strip()[-300:]}")
    version = _installed(python, dist or module)
    if version:
        return version
    cmd = [str(python), "-m", "pip", "install", "--disable-pip-version-check", "--quiet", requirement]
    log(f"installing {requirement} into {PEERS_VENV}: {shlex.join(cmd)}")
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if run.returncode != 0:
        raise PeerUnavailable(f"pip install {requirement} failed: {run.stderr.strip()[-400:]}")
    version = _installed(python, dist or module)
    if not version:
        raise PeerUnavailable(f"{module} is still not importable after pip install {requirement}")
    return version


def ensure_apt(packages: list[str], binaries: list[str]) -> None:
    """apt-get install ``packages`` unless every one of ``binaries`` is already on PATH."""
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    if all(shutil.which(b, path=path) for b in binaries):
        return
    if not shutil.which("apt-get"):
        raise PeerUnavailable(f"{', '.join(binaries)} not found and there is no apt-get to install them")
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = [*sudo, "apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages]
    for step in ([*sudo, "apt-get", "update", "-qq"], install):
        log(f"installing Slurm from Debian: {shlex.join(step)}")
        run = subprocess.run(step, capture_output=True, text=True, env=env, timeout=1800)
        if run.returncode != 0:
            raise PeerUnavailable(f"{shlex.join(step)} failed: {(run.stderr or run.stdout).strip()[-400:]}")
    missing = [b for b in binaries if not shutil.which(b, path=path)]
    if missing:
        raise PeerUnavailable(f"still missing after apt-get install: {', '.join(missing)}")


def netns_available() -> str | None:
    """None when ``unshare --net`` with loopback works here; else why not."""
    if not shutil.which("unshare") or not shutil.which("ip"):
        return "unshare or ip (iproute2) not found"
    run = subprocess.run(
        ["unshare", "--net", "sh", "-c", "ip link set lo up && ip -o addr show lo"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if run.returncode != 0:
        return f"unshare --net failed: {run.stderr.strip()[-200:]}"
    return None


def run_driver(
    driver: str,
    params: dict[str, Any],
    *,
    python: str | None = None,
    netns: bool = False,
    netns_address: bool = False,
    timeout: float = 600.0,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Run ``bench/drivers/<driver>.py`` with ``params``; returns its JSON result line.

    The driver's stderr (progress bars, peer logs) goes to a temporary file whose tail is
    quoted when the driver fails. With ``netns`` it runs in a fresh network namespace where
    only loopback is up, so nothing it binds is reachable from outside; ``netns_address`` also
    puts a private non-loopback address on ``lo`` for programs that resolve with
    ``AI_ADDRCONFIG`` (Slurm's daemons cannot bind without one).
    """
    interpreter = python or str(_venv_python())
    argv = [interpreter, str(DRIVERS / f"{driver}.py"), json.dumps(params)]
    if netns:
        why = netns_available()
        if why:
            raise PeerUnavailable(f"needs a private network namespace: {why}")
        setup = "ip link set lo up" + (" && ip addr add 10.254.254.254/32 dev lo" if netns_address else "")
        argv = ["unshare", "--net", "sh", "-c", setup + ' && exec "$@"', "driver", *argv]
    # The peer's own executables (hq workers' programs, ray's workers) come from the side venv.
    venv_bin = str(Path(interpreter).parent)
    child_env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("OPENHTC_", "VIRTUAL_ENV", "PYTHON"))},
        "PATH": venv_bin + os.pathsep + os.environ.get("PATH", "/usr/bin:/bin"),
        **(env or {}),
    }
    with tempfile.TemporaryFile("w+") as err:
        try:
            run = subprocess.run(
                argv,
                stdout=subprocess.PIPE,
                stderr=err,
                stdin=subprocess.DEVNULL,
                text=True,
                env=child_env,
                timeout=timeout,
                start_new_session=True,
            )
        except subprocess.TimeoutExpired as exc:
            raise TimeoutError(f"{driver} driver did not finish in {timeout:.0f} s: {_tail(err)}") from exc
        lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
        out: dict[str, Any] = json.loads(lines[-1]) if lines else {}
        if run.returncode != 0 or out.get("event") != "result":
            why = out.get("error") or f"exit status {run.returncode}"
            if out.get("unavailable"):
                raise PeerUnavailable(why)
            raise RuntimeError(f"{driver} driver failed: {why}; stderr: {_tail(err)}")
    return out


def _tail(fh: Any, chars: int = 1500) -> str:
    fh.seek(0)
    return " ".join(str(fh.read()[-chars:]).split())
