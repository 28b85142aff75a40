"""The bwrap runtime: each job runs under bubblewrap over its image's cached root filesystem.

Per job: a cgroup with the job's memory and CPU limits, a writable overlay root capped at
``maxDiskGiB`` (see scratch.py), and ``bwrap --unshare-all`` (network too, unless the job
network is ``full``; see jobnet.py) with a fresh /proc and /dev, the job's mounts, its user and
working directory.

The job joins its cgroup before any of its code runs: bwrap reports the sandbox's pid on
``--info-fd`` and waits on ``--block-fd``; the pids go into ``cgroup.procs`` and only then is
bwrap released (no wrapper shell, no ``preexec_fn``). The environment reaches the job through
bwrap's own environment, not its command line, so tokens do not show in ``ps``.

A timeout or cancel kills bwrap's process group and every process in the job's cgroup. After a
crash, ``adopt`` kills what a dead incarnation's cgroups still hold, removes them, and unmounts
its scratch disks.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import select
import shutil
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass

from openhtc.domain.enums import FailureCode
from openhtc.domain.models import JobLaunch
from openhtc.runtimes.base import ImageSource, LogOpener, Outcome, RunHandle
from openhtc.runtimes.cgroups import Cgroups, JobCgroup
from openhtc.runtimes.images import ImageCache, ImageError, PreparedImage, User, resolve_user
from openhtc.runtimes.images.oci import DEFAULT_PATH
from openhtc.runtimes.jobnet import JobNetwork
from openhtc.runtimes.output import pump_output
from openhtc.runtimes.process import Deadlines, exit_outcome
from openhtc.runtimes.scratch import GIB, ScratchError, ScratchPool

log = logging.getLogger("openhtc.runtimes.bwrap")
DEFAULT_DISK_GIB = 1  # scratch for jobs that ask for maxDiskGiB 0
# What podman grants a root container by default; a job whose image user is not root gets none.
ROOT_CAPS = (
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL", "CAP_NET_BIND_SERVICE",
    "CAP_SETFCAP", "CAP_SETGID", "CAP_SETPCAP", "CAP_SETUID", "CAP_SYS_CHROOT",
)  # fmt: skip


def owner_tag(owner: str) -> str:
    """A short, path-safe name for an executor (owner strings hold host names and paths)."""
    return hashlib.sha256(owner.encode()).hexdigest()[:16]


def starting_failure(reason: str) -> Outcome:
    return Outcome(None, FailureCode.ErrorStartingContainer.value, reason)


def job_argv(launch: JobLaunch, image: PreparedImage) -> list[str]:
    """``commands`` if the job gives any, else the image's Entrypoint + Cmd."""
    if launch.commands:
        return list(launch.commands)
    return [*image.config.entrypoint, *image.config.cmd]


def job_env(launch: JobLaunch, image: PreparedImage, user: User) -> dict[str, str]:
    """Defaults, then the image's Env, then the job's envs and mount variables (the job wins)."""
    env = {"PATH": DEFAULT_PATH, "HOME": user.home}
    env.update(image.config.env)
    env.update(launch.envs)
    env.update(launch.batch_envs)
    env.update((m.env_name, m.container_path) for m in launch.mounts)
    return env


class BwrapRuntime:
    name = "bwrap"
    blocking = True

    def __init__(
        self,
        work_root: str,
        images: ImageSource | None,
        *,
        image_cache_bytes: int = 10 * GIB,
        job_network: JobNetwork | None = None,
        bwrap: str | None = None,
        max_log_bytes: int | None = None,
    ) -> None:
        found = bwrap or shutil.which("bwrap")
        if found is None:
            raise RuntimeError("bubblewrap is not installed (Debian: apt-get install bubblewrap)")
        self.bwrap = found
        self.images = images
        self.job_network = job_network
        self.max_log_bytes = max_log_bytes
        self.scratch = ScratchPool(os.path.join(work_root, "scratch"))
        self.cache = ImageCache(
            os.path.join(work_root, "images"), image_cache_bytes, on_evict=self.scratch.forget
        )
        self.cgroups = Cgroups.detect()
        self._deadlines = Deadlines()
        self._users: dict[str, User] = {}
        self._lock = threading.Lock()

    def adopt(self, owner: str, incarnation: str) -> int:
        killed = self.cgroups.adopt(owner_tag(owner), incarnation)
        self.scratch.adopt(incarnation)
        return killed

    def close(self) -> None:
        if self.job_network is not None:
            self.job_network.close()
        self.scratch.close()
        self.cgroups.close()

    # -- one job ------------------------------------------------------------------------------

    def run(
        self, launch: JobLaunch, handle: RunHandle, open_log: LogOpener, on_running: Callable[[], None]
    ) -> Outcome:
        if self.images is None:
            return starting_failure("No container registry is configured, so no image can be pulled")
        try:
            image = self.cache.acquire(launch.project_id, launch.image, self.images)
        except ImageError as exc:
            return starting_failure(f"Cannot pull image {launch.image!r}: {exc}")
        try:
            return self._run_image(launch, image, handle, open_log, on_running)
        finally:
            self.cache.release(image)

    def _user(self, image: PreparedImage) -> User:
        with self._lock:
            user = self._users.get(image.key)
        if user is None:
            user = resolve_user(image.rootfs, image.config.user)
            with self._lock:
                self._users[image.key] = user
        return user

    def _run_image(
        self,
        launch: JobLaunch,
        image: PreparedImage,
        handle: RunHandle,
        open_log: LogOpener,
        on_running: Callable[[], None],
    ) -> Outcome:
        argv = job_argv(launch, image)
        if not argv:
            return starting_failure(
                f"Image {launch.image!r} has no entrypoint or command, and the job gives no 'commands'"
            )
        try:
            user = self._user(image)
        except ImageError as exc:
            return starting_failure(f"Image {launch.image!r}: {exc}")
        if handle.stopped:  # cancelled while the image was pulled
            return exit_outcome(-9, handle, launch.timeout_s)
        cwd = launch.working_dir or image.config.working_dir or "/"
        disk = (launch.disk_gib or DEFAULT_DISK_GIB) * GIB
        cgroup = self.cgroups.create(f"{launch.job_id}-{launch.attempt}", launch.memory_mb, launch.vcpus)
        try:
            mount_points = [m.container_path for m in launch.mounts] + [cwd]
            with self.scratch.layer(image.rootfs, disk, mount_points) as root:
                job = _Job(launch, image, user, argv, cwd, root, cgroup)
                try:
                    return self._sandbox(job, handle, open_log, on_running)
                finally:
                    cgroup.kill()  # nothing of the job may outlive it, nor keep its disk busy
        except ScratchError as exc:
            return starting_failure(f"Cannot set up the job's disk: {exc}")
        finally:
            cgroup.remove()

    def _args(self, job: _Job) -> list[str]:
        args = [self.bwrap, "--unshare-all"]
        if self.job_network is not None and self.job_network.full:
            args.append("--share-net")
        args += ["--die-with-parent", "--new-session", "--bind", job.root, "/"]
        args += ["--proc", "/proc", "--dev", "/dev"]
        for mount in job.launch.mounts:
            args += ["--ro-bind" if mount.read_only else "--bind", mount.host_path, mount.container_path]
        if job.cwd != "/":
            args += ["--dir", job.cwd]
        args += ["--chdir", job.cwd, "--uid", str(job.user.uid), "--gid", str(job.user.gid)]
        args += ["--cap-drop", "ALL"]
        if job.user.uid == 0:
            for cap in ROOT_CAPS:
                args += ["--cap-add", cap]
        return args

    def _start(self, job: _Job, handle: RunHandle) -> tuple[subprocess.Popen[bytes], int | None] | str:
        """Start bwrap, put the sandbox in the job's cgroup, then let it run the job.

        Returns the process and a pidfd of the sandbox's init, or why the sandbox could not be
        set up.
        """
        info_r, info_w = os.pipe()
        block_r, block_w = os.pipe()
        args = [*self._args(job), "--info-fd", str(info_w), "--block-fd", str(block_r), "--", *job.argv]
        try:
            try:
                proc = subprocess.Popen(
                    args,
                    env=job_env(job.launch, job.image, job.user),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    pass_fds=(info_w, block_r),
                    start_new_session=True,
                )
            finally:
                os.close(info_w)
                os.close(block_r)
            handle.attach(proc, job.cgroup.kill)
            try:
                child = int(json.loads(_read_all(info_r))["child-pid"])
            except (ValueError, KeyError, TypeError):
                message = proc.stdout.read().decode("utf-8", "replace").strip() if proc.stdout else ""
                _reap(proc)
                return message or "bwrap failed"
            # The sandbox's init; what it forks inherits the cgroup. bwrap's outer process stays
            # outside (one migration less, ~0.3 ms): it only waits, and dies with the job.
            pidfd = None
            try:
                job.cgroup.add(child)
                pidfd = os.pidfd_open(child)
                if self.job_network is not None:  # openhtc: the API and storage in its netns
                    self.job_network.attach(child)
                os.write(block_w, b"go")
            except OSError as exc:  # the sandbox died meanwhile (a cancel, bwrap failing)
                if pidfd is not None:
                    os.close(pidfd)
                proc.kill()
                _reap(proc)
                return f"the sandbox ended before it started the job ({exc.strerror})"
            return proc, pidfd
        finally:
            os.close(info_r)
            os.close(block_w)

    def _sandbox(
        self, job: _Job, handle: RunHandle, open_log: LogOpener, on_running: Callable[[], None]
    ) -> Outcome:
        launch = job.launch
        started = self._start(job, handle)
        if isinstance(started, str):
            if handle.stopped:
                return exit_outcome(-9, handle, launch.timeout_s)
            return starting_failure(f"Cannot start the sandbox: {started}")
        proc, pidfd = started
        assert proc.stdout is not None
        exited = None
        cancel_timeout = None
        try:
            exited = os.pidfd_open(proc.pid)  # bwrap exits with the job's main process
            on_running()
            if launch.timeout_s:
                cancel_timeout = self._deadlines.add(launch.timeout_s, lambda: handle.stop(timed_out=True))
            # The job ends when its main process does: what it left running is killed then
            # (its cgroup), even a setsid child that holds the output pipe open.
            last = pump_output(proc.stdout.fileno(), open_log, self.max_log_bytes, exited, job.cgroup.kill)
            code = proc.wait()
        finally:
            if cancel_timeout is not None:
                cancel_timeout()
            _reap(proc)
            if exited is not None:
                os.close(exited)
            if pidfd is not None:
                # bwrap exits as soon as it has the job's status; its init in the sandbox dies
                # right after (parent-death signal). Waiting for that beats polling the cgroup.
                _wait_fd(pidfd, 2.0)
                os.close(pidfd)
        if code != 0 and not handle.timed_out and job.cgroup.oom_kills():
            return Outcome(
                137 if code < 0 else code,
                FailureCode.ErrorNotEnoughMemory.value,
                f"Job exceeded maxMemory={launch.memory_mb} MiB and was killed",
            )
        if code == 1 and last.startswith("bwrap: ") and not handle.stopped:
            return Outcome(1, FailureCode.ErrorStartingContainer.value, f"Cannot start the job: {last[7:]}")
        return exit_outcome(code, handle, launch.timeout_s)


@dataclass(frozen=True, slots=True)
class _Job:
    launch: JobLaunch
    image: PreparedImage
    user: User
    argv: list[str]
    cwd: str
    root: str  # the job's writable root on the host
    cgroup: JobCgroup


def _read_all(fd: int) -> bytes:
    chunks: list[bytes] = []
    while True:
        chunk = os.read(fd, 4096)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def _reap(proc: subprocess.Popen[bytes]) -> None:
    """Wait for bwrap and close its output pipe (every path: a Popen kept alive by a RunHandle
    would otherwise hold the pipe open, one descriptor per job)."""
    if proc.returncode is None:
        proc.kill()
        proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


def _wait_fd(fd: int, timeout: float) -> None:
    """Wait for ``fd`` (a pidfd) to be readable; poll, not select, takes descriptors >= 1024."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    poller.poll(timeout * 1000)
