"""The bwrap runtime: each job runs under bubblewrap over its image's cached root filesystem.

Per job: a cgroup with the job's memory and CPU limits, a writable overlay root capped at
``maxDiskGiB`` (see scratch.py), and ``bwrap --unshare-all`` (network too, unless the job
network is ``full``; see jobnet.py) with a fresh /proc and /dev, the job's mounts, its user and
working directory.

The job is born in its cgroup: bwrap waits for its ``--args`` while it is moved there, then
sets the sandbox up, reports its pid on ``--info-fd`` and waits on ``--block-fd`` until it is
released (no wrapper shell, no ``preexec_fn``; see sandbox.py). The environment reaches the job through
bwrap's own environment, not its command line, so tokens do not show in ``ps``.

The runtime is pipelined (see ``base.Pipelined``): ``start(..., after=)`` sets up the slot's
next sandbox (image, cgroup, disk, bwrap held at ``--block-fd``, cgroup and network joined)
while the current job runs, and it is released the moment that job's bwrap exits. Job cgroups
are pooled (``Cgroups.acquire``/``recycle``), and a job's clean-up after it ends (its cgroup,
its disk) overlaps the next job's run.

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
from openhtc.runtimes.sandbox import Sandbox, SandboxGone
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
            started = self._prepare(launch, image, handle, open_log)
        except BaseException:
            self.cache.release(image)
            raise
        if isinstance(started, Outcome):
            self.cache.release(image)
            return started

        def running() -> None:  # the job's own process starts now
            if launch.timeout_s:
                stop = lambda: handle.stop(timed_out=True)  # noqa: E731
                started.cancel_timeout = self._deadlines.add(launch.timeout_s, stop)
            on_running()

        sandbox = started.sandbox
        sandbox.on_release = running
        ahead = after.sandbox if after is not None else None
        if ahead is None or ahead.over:
            sandbox.release()
        else:
            ahead.successor = sandbox
        return started

    def wait(self, started: Started, timeout: float) -> bool:
        """Whether the job ended within ``timeout`` seconds (its output is copied meanwhile)."""
        return started.sandbox.pump(started.sink, timeout)

    def withdraw(self, started: Started) -> bool:
        """Take back a job held ``after`` another one if it has not started: True if so."""
        if started.sandbox.released:
            return False
        started.sandbox.kill()
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
        self, launch: JobLaunch, image: PreparedImage, handle: RunHandle, open_log: LogOpener
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
            sandbox = self._spawn(job, handle)
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

    def _spawn(self, job: _Job, handle: RunHandle) -> Sandbox | str:
        """Start bwrap and put the sandbox in the job's cgroup (and network), held before the
        job runs; or why the sandbox could not be set up."""
        try:
            env = job_env(job.launch, job.image, job.user)
            sandbox = Sandbox(self._args(job), job.argv, env, job.cgroup.kill)
        except OSError as exc:
            return f"cannot run {self.bwrap}: {exc.strerror or exc}"
        handle.attach_kill(sandbox.kill)
        try:
            # bwrap waits for its --args: moved now, while it loads, the sandbox it starts is
            # born in the job's cgroup (what the job forks inherits it).
            job.cgroup.add(sandbox.pid)
            sandbox.proceed()
            child = sandbox.wait_ready()
            if self.job_network is not None:  # openhtc: the API and storage in its netns
                self.job_network.attach(child)
        except SandboxGone as exc:
            return str(exc)
        except OSError as exc:  # the sandbox died meanwhile (a cancel, bwrap failing)
            sandbox.kill()
            sandbox.reap()
            return f"the sandbox ended before it started the job ({exc.strerror})"
        return sandbox

    def _end(self, started: Started) -> Outcome:
        """Copy the job's output until it ends, tidy up after it, and tell how it went."""
        launch, handle, sandbox, cgroup = started.launch, started.handle, started.sandbox, started.cgroup
        try:
            try:
                sandbox.pump(started.sink, None)
            finally:
                started.sink.close()
                if started.cancel_timeout is not None:
                    started.cancel_timeout()
                if not sandbox.ended:  # an error while copying: nothing of the job may stay
                    sandbox.kill()
            sandbox.wait_init()
            code = sandbox.reap()
            oom = code != 0 and not handle.timed_out and cgroup.oom_kills() > 0
        finally:
            sandbox.retire()  # before its cgroup is recycled: a late cancel kills nothing else
            self._teardown(launch, cgroup, started.layer)
            self.cache.release(started.image)
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
    cancel_timeout: Callable[[], None] | None = None
