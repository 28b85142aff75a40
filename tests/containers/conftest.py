"""Fixtures for container tests: real docker-registry (started by ``htc server``), podman, skopeo.

``busybox_image``
    A busybox image in podman's local store, built offline (``openhtc.testing.images``), named
    ``localhost/htc-test-bb:<random>``; removed at the end of the session.
``registry_server``
    Factory: ``registry_server(runtime="bwrap", executor=False, env=..., args=...)`` starts an
    ``htc server`` whose embedded registry is up. With the default ``--runtime bwrap
    --no-executor`` the server requires images to exist (image status and submissions look them
    up) without running any job; pass ``executor=True`` to run jobs too.
``registry_project(server)``
    A new project on ``server`` with its registry address and login token, and ``push`` /
    ``reference`` helpers.

Missing tools skip these tests locally and fail them when ``CI=true``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from openhtc.testing.ci import require_tools as need
from openhtc.testing.ci import skip_or_fail
from openhtc.testing.images import busybox_rootfs_tar, find_busybox, podman_import, podman_push


@pytest.fixture
def require_tools() -> Callable[..., None]:
    """``require_tools("skopeo", ...)``: skip (locally) or fail (CI) when one is missing."""
    return need


@pytest.fixture(scope="session")
def busybox_image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    need("podman")
    if find_busybox() is None:
        skip_or_fail("no static busybox: apt-get install busybox-static")
    tar = busybox_rootfs_tar(tmp_path_factory.mktemp("bb") / "rootfs.tar")
    name = f"localhost/htc-test-bb:{uuid.uuid4().hex[:8]}"
    podman_import(tar, name, changes=['CMD ["/bin/sh", "-c", "echo hello from busybox"]'])
    yield name
    subprocess.run(["podman", "rmi", "--force", name], capture_output=True, check=False)


@pytest.fixture
def registry_server(start_server: Callable[..., Any]) -> Callable[..., Any]:
    def start(
        *,
        runtime: str = "bwrap",
        executor: bool = False,
        env: dict[str, str] | None = None,
        args: tuple[str, ...] = (),
    ) -> Any:
        need("docker-registry")
        extra = args if executor else ("--no-executor", *args)
        return start_server(runtime=runtime, env=env, args=extra)

    return start


@dataclass
class RegistryProject:
    """A project with its registry coordinates, as a user sees them through the API."""

    server: Any
    api: Any
    project_id: str
    registry: str  # containerRegistry: "host:port/{projectId}/"
    token: str  # the login token (password for user AWS)

    @property
    def host(self) -> str:
        return self.registry.split("/", 1)[0]

    def reference(self, image: str) -> str:
        return f"{self.registry}{image}"

    def push(self, local: str, image: str, token: str | None = None) -> None:
        podman_push(local, self.reference(image), token or self.token)

    def status(self, image: str, **kw: Any) -> Any:
        return self.api.request(
            "GET", f"/htc/projects/{self.project_id}/container-registry/images/{image}", **kw
        )


@pytest.fixture
def registry_project() -> Callable[[Any], RegistryProject]:
    def make(server: Any) -> RegistryProject:
        api = server.api()
        project = api.create_project()
        pid = project["projectId"]
        token = api.request("GET", f"/htc/projects/{pid}/container-registry/token", expect=200).text
        return RegistryProject(server, api, pid, project["containerRegistry"], token)

    return make


def htc_cli(server: Any, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``htc <args>`` as a user would, against ``server`` with its admin key."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENHTC_")}
    env.update(OPENHTC_URL=server.url, OPENHTC_API_KEY=server.api_key)
    htc = Path(sys.executable).parent / "htc"
    cmd = [str(htc) if htc.exists() else shutil.which("htc") or "htc", *args]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} -> {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture
def run_htc() -> Callable[..., subprocess.CompletedProcess[str]]:
    return htc_cli
