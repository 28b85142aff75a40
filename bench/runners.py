"""W3's container command: busybox ``true`` under bubblewrap or podman, the same for every system.

openhtc's own container runtimes (``--runtime bwrap|podman``) are built elsewhere; the peers
have none, so each of their jobs runs the command below, which is also what the spawn floor
loops over. ``bwrap`` starts from a busybox rootfs unpacked once; ``podman`` from an image
imported once (``podman run --runtime runc`` with the rlimit overrides this machine needs, see
infrastructure-notes §8). Both are built offline by ``openhtc.testing.images``.
"""

from __future__ import annotations

import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from bench.common import log

RUNNERS = ("bwrap", "podman")
PODMAN_IMAGE = "localhost/openhtc-bench-bb:latest"


class RunnerUnavailable(Exception):
    pass


class ContainerRunner:
    """Prepares the rootfs or image on first use; ``argv`` is one job's command."""

    def __init__(self, kind: str) -> None:
        if kind not in RUNNERS:
            raise ValueError(f"unknown container runner {kind!r}; choose from {', '.join(RUNNERS)}")
        self.kind = kind
        self._dir: Path | None = None
        self._argv: list[str] | None = None
        self._error: str | None = None

    def argv(self) -> list[str]:
        if self._error:
            raise RunnerUnavailable(self._error)
        if self._argv is None:
            try:
                self._argv = self._prepare()
            except (RunnerUnavailable, RuntimeError, OSError, subprocess.CalledProcessError) as exc:
                self._error = f"{self.kind}: {exc}"
                raise RunnerUnavailable(self._error) from exc
        return self._argv

    def _prepare(self) -> list[str]:
        from openhtc.testing.images import busybox_rootfs_tar, podman_import

        if not shutil.which(self.kind):
            raise RunnerUnavailable(f"{self.kind} not found (make containers installs it)")
        self._dir = Path(tempfile.mkdtemp(prefix="openhtc-bench-w3-"))
        tar = busybox_rootfs_tar(self._dir / "rootfs.tar")
        if self.kind == "bwrap":
            rootfs = self._dir / "rootfs"
            rootfs.mkdir()
            with tarfile.open(tar) as tf:
                tf.extractall(rootfs, filter="tar")
            log(f"W3: busybox rootfs unpacked in {rootfs}")
            argv = ["bwrap", "--unshare-all", "--die-with-parent", "--ro-bind", str(rootfs), "/"]
            argv += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "/bin/true"]
        else:
            podman_import(tar, PODMAN_IMAGE)
            log(f"W3: busybox image imported into podman as {PODMAN_IMAGE}")
            argv = ["podman", "run", "--runtime", "runc", "--rm", "--network", "none"]
            argv += ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024", PODMAN_IMAGE, "/bin/true"]
        check = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        if check.returncode != 0:
            raise RunnerUnavailable(f"{' '.join(argv)} failed: {check.stderr.strip()[-300:]}")
        return argv

    def close(self) -> None:
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        if self.kind == "podman" and self._argv is not None:
            subprocess.run(["podman", "rmi", "-f", PODMAN_IMAGE], capture_output=True, timeout=120)
