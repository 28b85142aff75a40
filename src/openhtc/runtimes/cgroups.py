"""Per-job cgroups: memory and CPU limits, OOM detection, and killing a job's whole tree.

Works on cgroup v1 (separate ``memory`` and ``cpu`` hierarchies, as on hosts without systemd)
and on cgroup v2 (one unified tree). Jobs live in ``openhtc/<owner>/<incarnation>/<job>`` in
every hierarchy, so a restarted executor finds and kills whatever a dead incarnation of the same
owner left (``adopt``), and a job's processes are listed by its ``cgroup.procs``.

OOM kills: v2's ``memory.events`` counts them for a cgroup and everything below it. v1 counts
an OOM kill only in the victim's own cgroup; when the job's processes sit in a child cgroup
(podman puts its container below ``--cgroup-parent``), an eventfd registered on the job
cgroup's ``memory.oom_control`` is told instead, since the limit that was hit is the job's.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import threading
import time
from dataclasses import dataclass, replace

CPU_PERIOD_US = 100_000
BASE = "openhtc"


class CgroupError(Exception):
    pass


def _write(path: str, value: str) -> None:
    with open(path, "w") as fh:
        fh.write(value)


def _read(path: str) -> str:
    with open(path) as fh:
        return fh.read()


def _procs(path: str) -> list[int]:
    try:
        return [int(p) for p in _read(os.path.join(path, "cgroup.procs")).split()]
    except OSError:
        return []


def _counter(path: str, name: str) -> int:
    """A ``name value`` line of a flat-keyed cgroup file (memory.events, memory.oom_control)."""
    try:
        for line in _read(path).splitlines():
            key, _, value = line.partition(" ")
            if key == name:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def _tree(path: str) -> list[str]:
    """``path`` and every cgroup below it, deepest first (the order rmdir needs)."""
    if not os.path.isdir(path):
        return []
    return [top for top, _, _ in os.walk(path, topdown=False)]


def _kill_all(paths: list[str]) -> int:
    """SIGKILL every process of the cgroups until none is left (late forks included)."""
    killed: set[int] = set()
    for _ in range(2000):
        pids = {pid for path in paths for pid in _procs(path)}
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        killed |= pids
        time.sleep(0.001)  # a killed process leaves cgroup.procs once it has exited
    return len(killed)


def _rmdir(path: str, attempts: int = 200) -> bool:
    for _ in range(attempts):
        try:
            os.rmdir(path)
            return True
        except FileNotFoundError:
            return True
        except OSError as exc:  # EBUSY while exiting processes are still being reaped
            if exc.errno != errno.EBUSY:
                raise
            time.sleep(0.005)
    return False


@dataclass(frozen=True, slots=True)
class JobCgroup:
    paths: tuple[str, ...]  # the limited ones: v1 (memory, cpu); v2 (unified,)
    relative: str  # below every hierarchy's root, e.g. /openhtc/<owner>/<incarnation>/<job>
    all_roots: tuple[str, ...]  # every hierarchy a container manager may have created it in
    v2: bool
    delegated: bool = False  # a container manager makes child cgroups below it
    oom_base: int = 0  # OOM kills counted before this job (a pooled cgroup's earlier jobs)

    def add(self, pid: int) -> None:
        for path in self.paths:
            _write(os.path.join(path, "cgroup.procs"), str(pid))

    def oom_kills(self) -> int:
        """OOM kills of processes in this cgroup itself (v1) or anywhere below it (v2)."""
        return self._oom_count() - self.oom_base

    def _oom_count(self) -> int:
        name = "memory.events" if self.v2 else "memory.oom_control"
        return _counter(os.path.join(self.paths[0], name), "oom_kill")

    def empty(self) -> bool:
        return not any(_procs(path) for path in self.paths)

    def watch_oom(self) -> OomWatch:
        return OomWatch(self)

    def _own(self) -> list[str]:
        """The job's cgroups holding processes: with their children when delegated."""
        return _tree(self.paths[0]) if self.delegated else [self.paths[0]]

    def kill(self) -> int:
        if self.v2 and os.path.exists(os.path.join(self.paths[0], "cgroup.kill")):
            with contextlib.suppress(OSError):
                _write(os.path.join(self.paths[0], "cgroup.kill"), "1")
        return _kill_all(self._own())

    def remove(self, grace: float = 0.0) -> None:
        """Remove the cgroup (and what a container manager made below it, in any hierarchy).

        Processes still inside get ``grace`` seconds to leave (podman's conmon tidies up after
        its container), then are killed.
        """
        deadline = time.monotonic() + grace
        while any(_procs(p) for p in self._own()):
            if time.monotonic() >= deadline:
                self.kill()
                break
            time.sleep(0.01)
        if self.delegated:
            paths = [path for root in self.all_roots for path in _tree(root + self.relative)]
        else:
            paths = list(self.paths)
        for path in paths:
            _rmdir(path)


class OomWatch:
    """Tells whether the job's memory limit made the OOM killer act, wherever the victim was."""

    def __init__(self, cgroup: JobCgroup) -> None:
        self.cgroup = cgroup
        self._fd: int | None = None
        if not cgroup.v2:
            control = os.path.join(cgroup.paths[0], "cgroup.event_control")
            efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            ofd = os.open(os.path.join(cgroup.paths[0], "memory.oom_control"), os.O_RDONLY | os.O_CLOEXEC)
            try:
                _write(control, f"{efd} {ofd}")
            except OSError:
                os.close(efd)
                raise
            finally:
                os.close(ofd)
            self._fd = efd

    def fired(self) -> bool:
        if self._fd is None:
            return self.cgroup.oom_kills() > 0
        try:
            return os.eventfd_read(self._fd) > 0
        except BlockingIOError:
            return self.cgroup.oom_kills() > 0

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class Cgroups:
    """Where job cgroups go on this host; ``detect`` finds v2 or v1 memory and cpu controllers."""

    def __init__(self, roots: tuple[str, ...], v2: bool, all_roots: tuple[str, ...] = ()) -> None:
        self.roots = roots  # v1: (memory mount, cpu mount); v2: (unified mount,)
        self.v2 = v2
        self.all_roots = tuple(dict.fromkeys((*roots, *all_roots)))
        self.owner = ""
        self.incarnation = ""
        # Job cgroups kept for the next job with the same limits (``acquire``/``recycle``):
        # a mkdir, four limit writes and an rmdir less per job.
        self.keep_idle = 16
        self._idle: dict[tuple[int, int], list[JobCgroup]] = {}
        self._pool_lock = threading.Lock()
        self._pooled = 0

    @classmethod
    def detect(cls, mounts_file: str = "/proc/self/mounts") -> Cgroups:
        v1: dict[str, str] = {}
        mounts: list[str] = []
        unified = None
        with open(mounts_file) as fh:
            for line in fh:
                fields = line.split()
                if len(fields) < 4 or fields[2] not in ("cgroup", "cgroup2"):
                    continue
                mountpoint, options = fields[1], fields[3].split(",")
                mounts.append(mountpoint)
                if fields[2] == "cgroup2":
                    unified = mountpoint
                    continue
                for controller in ("memory", "cpu"):
                    if controller in options:
                        v1.setdefault(controller, mountpoint)
        if unified is not None:
            try:
                controllers = _read(os.path.join(unified, "cgroup.controllers")).split()
            except OSError:
                controllers = []
            if "memory" in controllers and "cpu" in controllers:
                return cls((unified,), True, tuple(mounts))
        if "memory" in v1 and "cpu" in v1:
            return cls((v1["memory"], v1["cpu"]), False, tuple(mounts))
        raise CgroupError(
            "no cgroup memory and cpu controllers are available (neither cgroup v2 with both "
            "enabled nor cgroup v1 hierarchies); job limits cannot be enforced"
        )

    def adopt(self, owner: str, incarnation: str) -> int:
        """Use ``owner/incarnation`` for new jobs; kill and remove what other incarnations of
        ``owner`` left. Returns how many processes were killed."""
        self.owner, self.incarnation = owner, incarnation
        stale: list[str] = []
        for root in self.all_roots:
            owner_dir = os.path.join(root, BASE, owner)
            if os.path.isdir(owner_dir):
                stale += [os.path.join(owner_dir, i) for i in os.listdir(owner_dir) if i != incarnation]
        stale = [s for s in stale if os.path.isdir(s)]
        killed = _kill_all([path for inc in stale for path in _tree(inc)])
        for inc in stale:
            for path in _tree(inc):
                _rmdir(path)
        if self.v2:
            self._enable_v2_controllers()
        for root in self.roots:
            os.makedirs(os.path.join(root, BASE, owner, incarnation), exist_ok=True)
        return killed

    def close(self) -> None:
        """Remove this incarnation's (empty) cgroups, and the owner's if no other is left."""
        with self._pool_lock:
            self._idle.clear()
        for root in self.all_roots:
            owner_dir = os.path.join(root, BASE, self.owner)
            for path in (*_tree(os.path.join(owner_dir, self.incarnation)), owner_dir):
                with contextlib.suppress(OSError):  # busy or not empty: adopt() sweeps it later
                    os.rmdir(path)

    def _enable_v2_controllers(self) -> None:
        """cgroup v2 hands a controller to children only if each parent's subtree_control has it."""
        path = self.roots[0]
        for part in ("", BASE, self.owner, self.incarnation):
            path = os.path.join(path, part) if part else path
            os.makedirs(path, exist_ok=True)
            with contextlib.suppress(OSError):
                _write(os.path.join(path, "cgroup.subtree_control"), "+memory +cpu")

    def create(self, name: str, memory_mb: int, vcpus: int, delegate: bool = False) -> JobCgroup:
        """The job's cgroup with its limits. ``delegate``: the job's processes will live in
        child cgroups a container manager makes (v2 must then hand the controllers down)."""
        if not self.incarnation:
            raise CgroupError("adopt() must run before jobs start")
        relative = f"/{BASE}/{self.owner}/{self.incarnation}/{name}"
        paths = tuple(root + relative for root in self.roots)
        for path in paths:
            try:
                os.mkdir(path)
            except FileExistsError:
                pass
            except FileNotFoundError:  # the incarnation's cgroup went away (removed by hand)
                os.makedirs(path, exist_ok=True)
        memory = str(memory_mb << 20)
        quota = str(max(1, vcpus) * CPU_PERIOD_US)
        if self.v2:
            _write(os.path.join(paths[0], "memory.max"), memory)
            with contextlib.suppress(OSError):
                _write(os.path.join(paths[0], "memory.swap.max"), "0")
            _write(os.path.join(paths[0], "cpu.max"), f"{quota} {CPU_PERIOD_US}")
            if delegate:
                with contextlib.suppress(OSError):
                    _write(os.path.join(paths[0], "cgroup.subtree_control"), "+memory +cpu +pids")
        else:
            mem, cpu = paths
            _write(os.path.join(mem, "memory.limit_in_bytes"), memory)
            with contextlib.suppress(OSError):  # only with swap accounting; keeps jobs off swap
                _write(os.path.join(mem, "memory.memsw.limit_in_bytes"), memory)
            _write(os.path.join(cpu, "cpu.cfs_quota_us"), quota)  # cfs_period_us is 100 ms
        return JobCgroup(paths, relative, self.all_roots, self.v2, delegate)

    def acquire(self, memory_mb: int, vcpus: int) -> JobCgroup:
        """An empty job cgroup with these limits: a pooled one if there is one, else a new one."""
        with self._pool_lock:
            idle = self._idle.get((memory_mb, vcpus))
            if idle:
                return idle.pop()
            self._pooled += 1
            name = f"pool-{self._pooled}"
        return self.create(name, memory_mb, vcpus)

    def recycle(self, cgroup: JobCgroup, memory_mb: int, vcpus: int) -> None:
        """Give back a cgroup from ``acquire`` once its job has ended: kept for the next job
        with the same limits if no process is left in it, else removed (its processes killed)."""
        if not cgroup.empty():
            cgroup.remove()
            return
        # OOM kills are counted for the cgroup's life: the next job counts from here.
        kept = replace(cgroup, oom_base=cgroup._oom_count())
        evict: list[JobCgroup] = []
        with self._pool_lock:
            if kept.relative.startswith(f"/{BASE}/{self.owner}/{self.incarnation}/"):
                self._idle.setdefault((memory_mb, vcpus), []).append(kept)
                total = sum(len(v) for v in self._idle.values())
                for idle in self._idle.values():
                    while total > self.keep_idle and idle:
                        evict.append(idle.pop(0))
                        total -= 1
            else:  # from an incarnation before adopt() or close(): not ours to keep
                evict.append(kept)
        for old in evict:
            old.remove()

    def leftovers(self, owner: str) -> list[str]:
        """Every cgroup below ``owner``'s incarnations, in any hierarchy (tests, diagnostics)."""
        found: list[str] = []
        for root in self.all_roots:
            owner_dir = os.path.join(root, BASE, owner)
            if os.path.isdir(owner_dir):
                for inc in os.listdir(owner_dir):
                    found += _tree(os.path.join(owner_dir, inc))[:-1]  # not the incarnation itself
        return found
