"""openhtc.testing.slurm: ``down --dir D`` stops only the daemons started for D (no Slurm needed)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from openhtc.testing.slurm import _is

pytestmark = pytest.mark.unit


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[tuple[int, str, Path]]:
    """A process that looks like the slurmctld and munged of ``tmp_path/a/slurm``: its arguments
    name its configuration file and socket there."""
    here = tmp_path / "a" / "slurm"
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()", "-f", str(here / "slurm.conf"),
         f"--socket={here / 'munge' / 'munge.socket'}"],
        stdin=subprocess.PIPE,
    )  # fmt: skip
    try:
        yield proc.pid, os.path.basename(sys.executable), tmp_path
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(timeout=10)


def test_a_daemon_is_ours_only_when_its_paths_lie_inside_our_directory(daemon: tuple[int, str, Path]) -> None:
    pid, name, tmp = daemon
    assert _is(pid, name, tmp / "a" / "slurm")  # its own directory
    # `--dir a/slurm` makes a/slurm/slurm: a prefix of the other's a/slurm/slurm.conf, not its parent
    assert not _is(pid, name, tmp / "a" / "slurm" / "slurm")
    assert not _is(pid, name, tmp / "a" / "slurm" / "munge" / "munge")  # a prefix of munge.socket
    assert not _is(pid, name, Path("/a/slurm"))  # a suffix of its paths
    assert not _is(pid, name + "-not", tmp / "a" / "slurm")  # another program
