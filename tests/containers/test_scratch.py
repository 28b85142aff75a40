"""The bwrap runtime's scratch disks (``ScratchPool``): real loop-mounted ext4 disks and overlays.

A job's disk must have all of its ``maxDiskGiB`` free whatever the job before it on that disk
did, and a job that wrote nothing must leave its overlay mounted for the next one.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from runtime_support import require_tool

from openhtc.runtimes.scratch import GIB, ScratchPool
from openhtc.testing.ci import skip_or_fail

pytestmark = pytest.mark.one_db

NEAR_CAP = 900 << 20  # of a 1 GiB disk (ext4 keeps about 20 MiB of it for itself)


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[ScratchPool]:
    if os.geteuid() != 0:
        skip_or_fail("scratch disks need root (loop mounts, overlays)")
    require_tool("mkfs.ext4", "mount")
    scratch = ScratchPool(str(tmp_path / "scratch"))
    scratch.adopt(uuid.uuid4().hex)
    yield scratch
    scratch.close()


@pytest.fixture
def lower(tmp_path: Path) -> str:
    (tmp_path / "lower" / "tmp").mkdir(parents=True)
    return str(tmp_path / "lower")


def allocate(path: str, size: int) -> None:
    """Take ``size`` bytes of the disk (ENOSPC if they are not free)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.posix_fallocate(fd, 0, size)
    finally:
        os.close(fd)


def test_a_disk_whose_space_is_still_held_is_not_handed_out(pool: ScratchPool, lower: str) -> None:
    with pool.layer(lower, GIB) as root:
        mounted = os.stat(root).st_dev
    with pool.layer(lower, GIB) as root:  # nothing written: the same overlay, no mount
        assert os.stat(root).st_dev == mounted
        big = os.path.join(root, "tmp", "big")
        allocate(big, NEAR_CAP)
        held = os.open(big, os.O_RDONLY)  # deleted but open: its blocks stay taken
        os.unlink(big)
    try:
        with pool.layer(lower, GIB) as root:
            allocate(os.path.join(root, "tmp", "big"), NEAR_CAP)
    finally:
        os.close(held)


def test_emptying_what_a_job_wrote_follows_no_symlink(pool: ScratchPool, lower: str, tmp_path: Path) -> None:
    """A job's files are truncated before they are removed, on the host: a link it made to a
    host path must not empty that path."""
    host_file, host_dir = tmp_path / "host-file", tmp_path / "host-dir"
    host_file.write_text("keep")
    host_dir.mkdir()
    (host_dir / "f").write_text("keep")
    with pool.layer(lower, GIB) as root:
        os.symlink(host_file, os.path.join(root, "tmp", "file-link"))
        os.symlink(host_dir, os.path.join(root, "tmp", "dir-link"))
        Path(root, "tmp", "written").write_text("x")
    assert host_file.read_text() == "keep" and (host_dir / "f").read_text() == "keep"
