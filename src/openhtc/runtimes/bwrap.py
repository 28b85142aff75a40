"""The bwrap runtime: each job runs under bubblewrap over its image's cached root filesystem.

Per job: a cgroup with the job's memory and CPU limits, a writable overlay root capped at
``maxDiskGiB`` (see scratch.py), and ``bwrap --unshare-all`` (network too, unless the job
network is ``full``; see jobnet.py) with a fresh /proc and /dev, the job's mounts, its user and
working directory.

bwrap is started by a spawner process (spawner.py, spawner_loop.py; a few, by default one per
CPU), not by the server: born in the job's cgroup, it sets the sandbox up, reports its pid on
``--info-fd`` and waits on ``--block-fd`` until the spawner releases it (no wrapper shell; see
sandbox.py). So none of a sandbox's start (the spawn, the cgroup migration, bwrap's set-up, the
release, the reaping) waits for the server's GIL. The environment reaches the job through
bwrap's own environment, not its command line, so tokens do not show in ``ps``.

The runtime is pipelined (see ``base.Pipelined``): ``start(..., after=)`` prepares the slot's
next job (image, cgroup, disk) and hands its sandbox to the spawner of the job ahead, which
holds it at ``--block-fd`` while the current job runs and releases it the moment that job's
bwrap exits. Job cgroups are pooled (``Cgroups.acquire``/``recycle``).

A timeout or cancel kills bwrap's process group and every process in the job's cgroup. After a
crash, ``adopt`` kills what a dead incarnation's cgroups still hold, removes them, and unmounts
its scratch disks.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
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
from openhtc.runtimes.output import LogSink
from openhtc.runtimes.process import Deadlines, exit_outcome
from openhtc.runtimes.sandbox import Sandbox
from openhtc.runtimes.scratch import GIB, ScratchError, ScratchPool
from openhtc.runtimes.spawner import SpawnerGone, Spawners

log = logging.getLogger("openhtc.runtimes.bwrap")
DEFAULT_DISK_GIB = 1  # scratch for jobs that ask for maxDiskGiB 0
LOST_REASON = "The sandbox spawner stopped while the job ran"
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
    pipelined = True  # start(..., after=) holds a job behind another one (see LocalExecutor)

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
        self.spawners = Spawners()
        self._deadlines = Deadlines()
        self._users: dict[str, User] = {}
        self._lock = threading.Lock()

    def adopt(self, owner: str, incarnation: str) -> int:
        killed = self.cgroups.adopt(owner_tag(owner), incarnation)
        self.scratch.adopt(incarnation)
        return killed

    def close(self) -> None:
        self.spawners.close()
        if self.job_network is not None:
            self.job_network.close()
        self.scratch.close()
        self.cgroups.close()

    # -- one job ------------------------------------------------------------------------------

    def run(
        self, launch: JobLaunch, handle: RunHandle, open_log: LogOpener, on_running: Callable[[], None]
    ) -> Outcome:
        started = self.start(launch, handle, open_log, on_running)
        return started if isinstance(started, Outcome) else self.finish(started)

    def start(
        self,
        launch: JobLaunch,
        handle: RunHandle,
        open_log: LogOpener,
        on_running: Callable[[], None],
        after: Started | None = None,
    ) -> Started | Outcome:
        """Set the job's sandbox up and let it run: at once, or (``after``) the moment that
        job (started from this same worker thread) ends. ``finish`` waits for it."""
        if self.images is None:
            return starting_failure("No container registry is configured, so no image can be pulled")
        try:
            image = self.cache.acquire(launch.project_id, launch.image, self.images)
        except ImageError as exc:
            return starting_failure(f"Cannot pull image {launch.image!r}: {exc}")
        try:
            started = self._prepare(launch, image, handle, open_log, on_running, after)
        except BaseException:
            self.cache.release(image)
            raise
        if isinstance(started, Outcome):
            self.cache.release(image)
        return started

    def wait(self, started: Started, timeout: float) -> bool:
        """Whether the job ended within ``timeout`` seconds (its output is copied meanwhile)."""
        return started.sandbox.pump(started.sink, timeout)

    def withdraw(self, started: Started) -> bool:
        """Take back a job held ``after`` another one if it has not started: True if so."""
        if not started.sandbox.take_back():
            return False
        self._end(started)
        return True

    def finish(self, started: Started) -> Outcome:
        """Wait for a started job to end; its outcome."""
        return self._end(started)

    def _user(self, image: PreparedImage) -> User:
        with self._lock:
            user = self._users.get(image.key)
        if user is None:
            user = resolve_user(image.rootfs, image.config.user)
            with self._lock:
                self._users[image.key] = user
        return user

    def _prepare(
        self,
        launch: JobLaunch,
        image: PreparedImage,
        handle: RunHandle,
        open_log: LogOpener,
        on_running: Callable[[], None],
        after: Started | None,
    ) -> Started | Outcome:
        """The job's cgroup, disk and held sandbox (in its cgroup and network), or why not."""
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
        cgroup = self.cgroups.acquire(launch.memory_mb, launch.vcpus)
        layer = contextlib.ExitStack()
        try:
            mount_points = [m.container_path for m in launch.mounts] + [cwd]
            try:
                root = layer.enter_context(self.scratch.layer(image.rootfs, disk, mount_points))
            except ScratchError as exc:
                self._teardown(launch, cgroup, layer)
                return starting_failure(f"Cannot set up the job's disk: {exc}")
            job = _Job(launch, image, user, argv, cwd, root, cgroup)
            sandbox = self._spawn(job, handle, on_running, after)
        except BaseException:
            self._teardown(launch, cgroup, layer)
            raise
        if isinstance(sandbox, str):
            self._teardown(launch, cgroup, layer)
            if handle.stopped:
                return exit_outcome(-9, handle, launch.timeout_s)
            return starting_failure(f"Cannot start the sandbox: {sandbox}")
        return Started(launch, handle, image, cgroup, layer, sandbox, LogSink(open_log, self.max_log_bytes))

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

    def _spawn(
        self, job: _Job, handle: RunHandle, on_running: Callable[[], None], after: Started | None
    ) -> Sandbox | str:
        """Hand the sandbox to a spawner: born in the job's cgroup, held until the job ahead
        (``after``) has ended (and, with the openhtc job network, until it is joined to it);
        or why it could not be handed over."""
        launch = job.launch
        sandbox = Sandbox(job.cgroup.kill)

        def running() -> None:  # the job's own process starts now (the spawner's reader thread)
            if launch.timeout_s:
                stop = lambda: handle.stop(timed_out=True)  # noqa: E731
                sandbox.cancel_timeout = self._deadlines.add(launch.timeout_s, stop)
            on_running()

        sandbox.on_release = running
        network, armed = self.job_network, True
        if network is not None and network.listens:  # openhtc: the API and storage in its
            sandbox.on_ready, armed = network.attach, False  # netns, before the job runs
        handle.attach_kill(sandbox.kill)
        if sandbox.killed:
            return "cancelled before it started"
        procs = [os.path.join(path, "cgroup.procs") for path in job.cgroup.paths]
        env = job_env(launch, job.image, job.user)
        try:
            argv = [*self._args(job), "--", *job.argv]
            self.spawners.spawn(sandbox, argv, env, procs, after.sandbox if after else None, armed)
        except SpawnerGone as exc:
            return str(exc)
        except OSError as exc:
            return f"cannot start a sandbox spawner: {exc.strerror or exc}"
        if sandbox.killed:  # cancelled meanwhile (before the spawner had it)
            sandbox.kill()
        return sandbox

    def _end(self, started: Started) -> Outcome:
        """Copy the job's output until it ends, tidy up after it, and tell how it went."""
        launch, handle, sandbox, cgroup = started.launch, started.handle, started.sandbox, started.cgroup
        try:
            try:
                sandbox.pump(started.sink, None)
            finally:
                started.sink.close()
                if not sandbox.ended:  # an error while copying: nothing of the job may stay
                    sandbox.kill()
            code = sandbox.reap()  # bwrap has exited and the sandbox's init is gone
            if sandbox.cancel_timeout is not None:  # set when it was released: before the end
                sandbox.cancel_timeout()
            oom = code is not None and code != 0 and not handle.timed_out and cgroup.oom_kills() > 0
        finally:
            self._teardown(launch, cgroup, started.layer)
            self.cache.release(started.image)
        if code is None:  # its spawner died: so did the sandbox (bwrap dies with its parent)
            return Outcome(None, FailureCode.ErrorInfrastructureFault.value, LOST_REASON)
        if sandbox.failure is not None and not sandbox.released:
            if handle.stopped:
                return exit_outcome(-9, handle, launch.timeout_s)
            return starting_failure(f"Cannot start the sandbox: {sandbox.failure}")
        if oom:
            return Outcome(
                137 if code < 0 else code,
                FailureCode.ErrorNotEnoughMemory.value,
                f"Job exceeded maxMemory={launch.memory_mb} MiB and was killed",
            )
        last = sandbox.last_output.strip()
        if code == 1 and last.startswith("bwrap: ") and not handle.stopped:
            return Outcome(1, FailureCode.ErrorStartingContainer.value, f"Cannot start the job: {last[7:]}")
        return exit_outcome(code, handle, launch.timeout_s)

    def _teardown(self, launch: JobLaunch, cgroup: JobCgroup, layer: contextlib.ExitStack) -> None:
        """Kill what is left of the job (nothing of it may outlive it, nor keep its disk busy),
        give its disk back, and its cgroup to the pool."""
        try:
            cgroup.kill()
            layer.close()
        except ScratchError as exc:  # the disk is dropped from the pool; the job's outcome stands
            log.warning("job %s: cannot tidy up its disk: %s", launch.job_uuid, exc)
        finally:
            self.cgroups.recycle(cgroup, launch.memory_mb, launch.vcpus)


@dataclass(frozen=True, slots=True)
class _Job:
    launch: JobLaunch
    image: PreparedImage
    user: User
    argv: list[str]
    cwd: str
    root: str  # the job's writable root on the host
    cgroup: JobCgroup


@dataclass(slots=True, eq=False)
class Started:
    """A job whose sandbox is set up (running, or held behind another job)."""

    launch: JobLaunch
    handle: RunHandle
    image: PreparedImage
    cgroup: JobCgroup
    layer: contextlib.ExitStack  # the job's scratch disk, given back when closed
    sandbox: Sandbox
    sink: LogSink
