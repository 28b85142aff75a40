"""The podman runtime: full OCI semantics through ``podman run`` and runc.

The image is pulled with the job's pull token at most once per ``tag_ttl`` per (project,
image) and run by its image id, so a tag re-pushed meanwhile cannot change an image between
pull and run. The root filesystem is read-only; ``/tmp`` and the working directory are tmpfs
mounts capped at ``maxDiskGiB`` (podman cannot cap its writable layer on overlay without XFS
project quotas); like every tmpfs they live in memory and count against the job's memory limit.
The job's environment goes through an ``--env-file`` (mode 0600), not the command line.

Limits are set on a cgroup of ours that podman uses as ``--cgroup-parent``: memory and CPU are
enforced there for the container and everything below it, and an OOM kill is read from it
(podman 4.3's ``State.OOMKilled`` stays false on cgroup v1 even when the OOM killer struck).

Containers are named ``openhtc-<owner>-<job>-<attempt>`` and labelled with the executor's
owner tag and incarnation, so ``adopt`` removes what a dead incarnation left.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable

from openhtc.domain.enums import FailureCode
from openhtc.domain.models import JobLaunch
from openhtc.runtimes.base import ImageSource, LogOpener, Outcome, RunHandle
from openhtc.runtimes.bwrap import DEFAULT_DISK_GIB, owner_tag, starting_failure
from openhtc.runtimes.cgroups import Cgroups, JobCgroup
from openhtc.runtimes.images.oci import ImageConfig
from openhtc.runtimes.jobnet import JobNetwork
from openhtc.runtimes.output import pump_output
from openhtc.runtimes.process import Deadlines, exit_outcome
from openhtc.runtimes.scratch import GIB

PODMAN_ERRORS = (125, 126, 127)  # podman's own failure, command not executable, not found


class PodmanError(Exception):
    pass


class PodmanRuntime:
    name = "podman"
    blocking = True

    def __init__(
        self,
        work_root: str,
        images: ImageSource | None,
        *,
        job_network: JobNetwork | None = None,
        podman: str | None = None,
        tag_ttl: float = 30.0,
        max_log_bytes: int | None = None,
    ) -> None:
        found = podman or shutil.which("podman")
        if found is None:
            raise RuntimeError("podman is not installed (Debian: apt-get install podman)")
        self.podman = found
        self.images = images
        self.job_network = job_network or JobNetwork("none")
        self.tag_ttl = tag_ttl
        self.max_log_bytes = max_log_bytes
        self.env_dir = os.path.join(work_root, "podman-env")
        os.makedirs(self.env_dir, mode=0o700, exist_ok=True)
        self.cgroups = Cgroups.detect()
        self._owner = "unadopted"
        self._incarnation = ""
        self._deadlines = Deadlines()
        self._lock = threading.Lock()
        self._pulled: dict[tuple[str, str], tuple[str, ImageConfig, float]] = {}
        self._pull_locks: dict[tuple[str, str], threading.Lock] = {}

    def _podman(self, *args: str, timeout: float = 600) -> str:
        done = subprocess.run(
            [self.podman, "--runtime", "runc", *args], capture_output=True, text=True, timeout=timeout
        )
        if done.returncode != 0:
            message = (done.stderr or done.stdout).strip().splitlines()
            raise PodmanError(message[-1] if message else f"podman {args[0]} exited {done.returncode}")
        return done.stdout

    def adopt(self, owner: str, incarnation: str) -> int:
        """Remove the containers of dead incarnations through podman first (so its state stays
        consistent), then sweep their cgroups for anything left."""
        self._owner, self._incarnation = owner_tag(owner), incarnation
        removed = 0
        for _ in range(5):  # a container that is exiting meanwhile makes `rm -f` fail: again
            out = self._podman(
                "ps", "-a", "--filter", f"label=openhtc.owner={self._owner}",
                "--format", '{{.ID}} {{index .Labels "openhtc.incarnation"}}',
            )  # fmt: skip
            stale = [line.split()[0] for line in out.splitlines() if line.split()[1:] != [incarnation]]
            if not stale:
                break
            removed = max(removed, len(stale))
            with contextlib.suppress(PodmanError):
                self._podman("rm", "-f", "--ignore", "-t", "0", *stale)
        killed = self.cgroups.adopt(self._owner, incarnation)
        for name in os.listdir(self.env_dir):
            os.unlink(os.path.join(self.env_dir, name))
        return max(killed, removed)

    def close(self) -> None:
        self.job_network.close()
        self.cgroups.close()

    # -- images -------------------------------------------------------------------------------

    def _image(self, project_id: str, image_name: str) -> tuple[str, ImageConfig]:
        """(image id, config) of a job's image, pulled at most once per tag_ttl."""
        key = (project_id, image_name)
        with self._lock:
            hit = self._pulled.get(key)
            if hit is not None and hit[2] > time.monotonic():
                return hit[0], hit[1]
            lock = self._pull_locks.setdefault(key, threading.Lock())
        with lock:
            with self._lock:
                hit = self._pulled.get(key)
                if hit is not None and hit[2] > time.monotonic():
                    return hit[0], hit[1]
            assert self.images is not None
            pull = self.images.pull_access(project_id, image_name)
            args = ["pull", "--quiet", f"--tls-verify={'false' if pull.insecure else 'true'}"]
            if pull.password:
                args += ["--creds", f"{pull.username}:{pull.password}"]
            image_id = self._podman(*args, pull.reference).strip().splitlines()[-1]
            conf = json.loads(self._podman("image", "inspect", "--format", "{{json .Config}}", image_id))
            config = ImageConfig.from_json({"config": conf or {}})
            with self._lock:
                self._pulled[key] = (image_id, config, time.monotonic() + self.tag_ttl)
            return image_id, config

    # -- one job ------------------------------------------------------------------------------

    def run(
        self, launch: JobLaunch, handle: RunHandle, open_log: LogOpener, on_running: Callable[[], None]
    ) -> Outcome:
        if self.images is None:
            return starting_failure("No container registry is configured, so no image can be pulled")
        try:
            image_id, config = self._image(launch.project_id, launch.image)
        except (PodmanError, subprocess.TimeoutExpired) as exc:
            return starting_failure(f"Cannot pull image {launch.image!r}: {exc}")
        except Exception as exc:  # the ImageSource: not found, unavailable
            return starting_failure(f"Cannot pull image {launch.image!r}: {exc}")
        if not launch.commands and not (config.entrypoint or config.cmd):
            return starting_failure(
                f"Image {launch.image!r} has no entrypoint or command, and the job gives no 'commands'"
            )
        if handle.stopped:
            return exit_outcome(-9, handle, launch.timeout_s)
        name = f"openhtc-{self._owner}-{launch.job_id}-{launch.attempt}"
        fd, env_file = tempfile.mkstemp(prefix=f"{name}-", dir=self.env_dir)
        try:
            with os.fdopen(fd, "w") as fh:
                mounts = ((m.env_name, m.container_path) for m in launch.mounts)
                for key, value in (*launch.envs, *launch.batch_envs, *mounts):
                    fh.write(f"{key}={value.replace(chr(10), ' ')}\n")
            cgroup = self.cgroups.create(name, launch.memory_mb, launch.vcpus, delegate=True)
            try:
                with self.job_network.podman_network() as network:  # none, host or the job's netns
                    args = self._args(launch, name, image_id, config, env_file, cgroup, network)
                    return self._run(launch, name, args, cgroup, handle, open_log, on_running)
            finally:
                cgroup.remove(grace=5.0)  # conmon tidies up after the container, then leaves
        finally:
            os.unlink(env_file)

    def _args(
        self,
        launch: JobLaunch,
        name: str,
        image_id: str,
        config: ImageConfig,
        env_file: str,
        cgroup: JobCgroup,
        network: str = "none",
    ) -> list[str]:
        disk = (launch.disk_gib or DEFAULT_DISK_GIB) * GIB
        args = [
            self.podman, "--runtime", "runc", "--cgroup-manager", "cgroupfs", "run", "--rm", "--name", name,
            "--label", f"openhtc.owner={self._owner}", "--label", f"openhtc.incarnation={self._incarnation}",
            "--cgroup-parent", cgroup.relative,  # which holds the job's memory and CPU limits
            "--network", network,
            "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024",
            "--log-driver", "none", "--read-only", "--read-only-tmpfs=false",
            "--mount", f"type=tmpfs,destination=/tmp,tmpfs-size={disk}",
            "--env-file", env_file,
        ]  # fmt: skip
        cwd = launch.working_dir or config.working_dir or "/"
        if cwd not in ("/", "/tmp"):  # tmpfs copies up what the image has there
            args += ["--mount", f"type=tmpfs,destination={cwd},tmpfs-size={disk}"]
        args += ["--workdir", cwd]
        for mount in launch.mounts:
            args += ["-v", f"{mount.host_path}:{mount.container_path}{':ro' if mount.read_only else ''}"]
        if launch.commands:
            args += ["--entrypoint", json.dumps(list(launch.commands[:1])), image_id, *launch.commands[1:]]
        else:
            args.append(image_id)
        return args

    def _run(
        self,
        launch: JobLaunch,
        name: str,
        args: list[str],
        cgroup: JobCgroup,
        handle: RunHandle,
        open_log: LogOpener,
        on_running: Callable[[], None],
    ) -> Outcome:
        oom = cgroup.watch_oom()
        proc: subprocess.Popen[bytes] | None = None
        exited = None
        try:
            proc = subprocess.Popen(
                args,
                # conmon leaves an empty file named "oom" in its working directory when the
                # container is OOM-killed: keep that out of whatever directory the server runs in.
                cwd=self.env_dir,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            assert proc.stdout is not None
            exited = os.pidfd_open(proc.pid)
            handle.attach(proc, lambda: self._kill(name))
            on_running()
            cancel_timeout = None
            if launch.timeout_s:
                cancel_timeout = self._deadlines.add(launch.timeout_s, lambda: handle.stop(timed_out=True))
            try:
                # Until `podman run` exits: the container's init is the job's main process, and
                # its end kills the rest of the container (a pid namespace of its own).
                last = pump_output(proc.stdout.fileno(), open_log, self.max_log_bytes, exited)
                code = proc.wait()
            finally:
                if cancel_timeout is not None:
                    cancel_timeout()
            if handle.stopped or code in PODMAN_ERRORS:  # podman run did not get to remove it
                subprocess.run([self.podman, "rm", "-f", "-t", "0", name], capture_output=True, timeout=60)
            if oom.fired() and code != 0 and not handle.stopped:
                return Outcome(
                    137 if code < 0 else code,
                    FailureCode.ErrorNotEnoughMemory.value,
                    f"Job exceeded maxMemory={launch.memory_mb} MiB and was killed",
                )
        finally:
            oom.close()
            if exited is not None:
                os.close(exited)
            if proc is not None:
                if proc.returncode is None:
                    proc.kill()
                    proc.wait()
                if proc.stdout is not None:
                    proc.stdout.close()
        if code in PODMAN_ERRORS and last.startswith("Error: ") and not handle.stopped:
            return Outcome(
                code, FailureCode.ErrorStartingContainer.value, f"Cannot start the job: {last[7:]}"
            )
        return exit_outcome(code, handle, launch.timeout_s)

    def _kill(self, name: str) -> None:
        subprocess.run([self.podman, "kill", "--signal", "KILL", name], capture_output=True, timeout=60)
