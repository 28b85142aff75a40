"""The `htc` CLI where Rescale's tutorial and the quickstarts stumbled: `htc submit` with no or
an unknown image under a container runtime, and `--help` without type placeholders."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.one_db


def test_submit_needs_an_image_and_a_refused_submit_leaves_no_task(
    registry_server: Callable[..., Any], run_htc: Callable[..., Any]
) -> None:
    server = registry_server()  # bwrap: only images in the project's registry run
    api = server.api()
    pid = api.create_project()["projectId"]

    no_image = run_htc(server, "submit", "-p", pid, "--", "echo", "hi", check=False)
    assert no_image.returncode != 0 and "--image" in no_image.stderr, no_image.stderr
    assert "local/process" not in no_image.stderr + no_image.stdout

    unknown = run_htc(server, "submit", "-p", pid, "-i", "nosuch:1", "--", "echo", "hi", check=False)
    assert unknown.returncode == 1 and "nosuch:1" in unknown.stderr, unknown.stderr
    tasks = api.list_all(f"/htc/projects/{pid}/tasks")
    assert [t for t in tasks if t["lifecycleStatus"] == "ACTIVE"] == [], tasks


def test_help_shows_no_type_placeholders() -> None:
    htc = str(Path(sys.executable).parent / "htc")
    for command in (["server"], ["submit"], ["storage", "ls"], ["jobs"]):
        out = subprocess.run([htc, *command, "--help"], capture_output=True, text=True, check=True).stdout
        assert "--help" in out
        for placeholder in ("<bool>", "<str>", "<int>", "<path>"):
            assert placeholder not in out, (command, out)


def test_podman_login_and_push_as_the_tutorial_writes_them_after_htc_image_trust(
    registry_server: Callable[..., Any],
    registry_project: Callable[..., Any],
    run_htc: Callable[..., Any],
    busybox_image: str,
    tmp_path: Path,
) -> None:
    """`podman login` and `podman push "$REGISTRY_URI$REPO_NAME:$IMAGE_TAG"` with no
    --tls-verify=false, once `htc image trust` has marked the registry in registries.conf."""
    server = registry_server()
    proj = registry_project(server)
    conf = tmp_path / "registries.conf"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("OPENHTC_")},
        "CONTAINERS_REGISTRIES_CONF": str(conf),
        "REGISTRY_AUTH_FILE": str(tmp_path / "auth.json"),
    }

    def podman(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["podman", *args], input=stdin, env=env, capture_output=True, text=True, timeout=120, check=False
        )

    repo = proj.api.post(f"/htc/projects/{proj.project_id}/container-registry/repo/tutorial", {})
    reference = f"{repo['registryURI']}tutorial:v1"  # $REGISTRY_URI$REPO_NAME:$IMAGE_TAG
    assert podman("tag", busybox_image, reference).returncode == 0
    conf.write_text("unqualified-search-registries = []\n")
    refused = podman("login", "--username", "AWS", "--password-stdin", proj.host, stdin=proj.token)
    assert refused.returncode != 0  # HTTPS expected: the flag-free line fails before the trust step

    run_htc(server, "image", "trust", "--file", str(conf))
    run_htc(server, "image", "trust", "--file", str(conf))  # idempotent
    assert conf.read_text().count("[[registry]]") == 1
    login = podman("login", "--username", "AWS", "--password-stdin", proj.host, stdin=proj.token)
    assert login.returncode == 0, login.stderr
    pushed = podman("push", reference)
    assert pushed.returncode == 0, pushed.stderr
    assert proj.status("tutorial:v1", expect=200).json() == {"status": "READY"}
    podman("rmi", reference)
