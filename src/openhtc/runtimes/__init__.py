"""Runtimes turn a JobLaunch into a running job: bwrap and podman (containers from registry
images), process (host processes; development only), noop (benchmarks)."""

from __future__ import annotations

import shutil
from collections.abc import Iterable

from openhtc.runtimes.base import ImagePull, ImageSource, Outcome, RunHandle, Runtime
from openhtc.runtimes.jobnet import Endpoint, JobNetwork
from openhtc.runtimes.noop import NoopRuntime
from openhtc.runtimes.process import ProcessRuntime
from openhtc.runtimes.scratch import GIB

__all__ = [
    "ImagePull",
    "ImageSource",
    "NoopRuntime",
    "Outcome",
    "ProcessRuntime",
    "RunHandle",
    "Runtime",
    "RuntimeUnavailable",
    "build_runtime",
    "choose_runtime",
]


class RuntimeUnavailable(RuntimeError):
    """No runtime can be used as configured; the message tells the user what to do."""


def choose_runtime(name: str) -> str:
    """Resolve 'auto': bwrap if bubblewrap is installed, else podman; never process silently."""
    if name != "auto":
        return name
    if shutil.which("bwrap"):
        return "bwrap"
    if shutil.which("podman"):
        return "podman"
    raise RuntimeUnavailable(
        "no container runtime found: install bubblewrap (Debian: apt-get install bubblewrap) or "
        "podman, or pass --runtime process to run jobs as plain host processes (no isolation)"
    )


def build_runtime(
    name: str,
    work_root: str,
    images: ImageSource | None = None,
    *,
    image_cache_gib: float = 10.0,
    job_network: str | bool = "none",
    job_endpoints: Iterable[Endpoint] = (),
    max_log_bytes: int | None = None,
    launcher_dir: str | None = None,
    adopt_seconds: float = 0.0,
) -> Runtime:
    """The runtime called ``name`` ('auto' resolved by ``choose_runtime``).

    ``images`` resolves job images to registry pulls (the server's registry); without it the
    container runtimes fail every job with ErrorStartingContainer. ``job_network`` is none,
    openhtc (only ``job_endpoints`` are reachable) or full (True/False: full/none).
    ``max_log_bytes``: output a job may write to its log (None: no cap); past it the rest is
    discarded after a marker. ``launcher_dir``, ``adopt_seconds``: where the process runtime's
    job launchers wait for the next server after a crash, and for how long.
    """
    name = choose_runtime(name)
    if name == "process":
        return ProcessRuntime(work_root, max_log_bytes, launcher_dir, adopt_seconds)
    if name == "noop":
        return NoopRuntime()
    if name not in ("bwrap", "podman"):
        raise ValueError(f"unknown runtime {name!r} (choose auto, bwrap, podman, process or noop)")
    if isinstance(job_network, bool):
        job_network = "full" if job_network else "none"
    network = JobNetwork(job_network, job_endpoints)
    try:
        if name == "bwrap":
            from openhtc.runtimes.bwrap import BwrapRuntime

            return BwrapRuntime(
                work_root,
                images,
                image_cache_bytes=int(image_cache_gib * GIB),
                job_network=network,
                max_log_bytes=max_log_bytes,
            )
        from openhtc.runtimes.podman import PodmanRuntime

        return PodmanRuntime(work_root, images, job_network=network, max_log_bytes=max_log_bytes)
    except Exception as exc:  # missing tools, no cgroup controllers, no loop devices
        network.close()
        raise RuntimeUnavailable(f"the {name} runtime cannot start: {exc}") from exc
