"""The `htc` CLI where Rescale's tutorial and the quickstarts stumbled: `htc submit` with no or
an unknown image under a container runtime, and `--help` without type placeholders."""

from __future__ import annotations

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
