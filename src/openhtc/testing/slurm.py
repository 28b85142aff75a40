"""A private single-node Slurm on this host: munged, slurmctld and slurmd started in a directory of
their own, on free ports, touching no system Slurm or munge (docs/allocation.md, "A private Slurm").

Used by the allocation tests (tests/alloc/conftest.py), the benchmarks (bench/drivers/slurm_driver.py
loads this file by its path, in the peers' virtualenv: so it imports the standard library only) and
people trying allocation queues::

    python -m openhtc.testing.slurm up --dir .htc-slurm      # prints the SLURM_CONF to export
    python -m openhtc.testing.slurm status --dir .htc-slurm  # sinfo and squeue
    python -m openhtc.testing.slurm down --dir .htc-slurm

Needs root (the daemons run as root; munged as user munge), Debian's ``slurm-wlm`` and ``munge``, and
cgroup v1 at /sys/fs/cgroup (``CgroupPlugin=cgroup/v1``). The daemons run in the foreground in a
session of their own, so they outlive ``up``; their process ids are kept in ``DIR/slurm/pids``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pwd
import random
import shutil
import signal
import socket
import string
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path, PurePath

SBIN = "/usr/sbin:/usr/bin:/sbin:/bin"
BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "sinfo", "scancel")

SLURM_CONF = """\
ClusterName={cluster}
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={dir}/munge/munge.socket
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd.pid
SlurmctldLogFile={dir}/log/slurmctld.log
SlurmdLogFile={dir}/log/slurmd.log
ProctrackType=proctrack/cgroup
TaskPlugin=task/cgroup,task/affinity
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SwitchType=switch/none
MpiDefault=none
MailProg=/bin/true
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
KillWait=5
MaxArraySize={max_array}
MaxJobCount={max_jobs}
MinJobAge=300
NodeName={node} NodeHostname={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory} State=UNKNOWN
PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP OverSubscribe={oversubscribe}
PartitionName=exact Nodes={node} Default=NO MaxTime=INFINITE State=UP OverSubscribe=NO
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0,default_queue_depth=2000,\
sched_max_job_start=0,max_sched_time=2
SlurmdParameters=config_overrides
"""

CGROUP_CONF = """\
CgroupPlugin=cgroup/v1
ConstrainCores=yes
ConstrainRAMSpace={constrain_ram}
CgroupMountpoint=/sys/fs/cgroup
"""


class SlurmUnavailable(RuntimeError):
    """Slurm cannot run here: a binary is missing, or this is not root."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def memory_mb() -> int:
    """80 % of this host's memory (the node's RealMemory)."""
    with contextlib.suppress(OSError), open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemTotal:"):
                return int(int(line.split()[1]) / 1024 * 0.8)
    return 4000


def missing_binaries() -> list[str]:
    path = SBIN + ":" + os.environ.get("PATH", "")
    return [b for b in BINARIES if not shutil.which(b, path=path)]


class PrivateSlurm:
    """One node (this host, under a name of its own) in partition ``debug`` (the default;
    ``oversubscribe`` is its OverSubscribe, e.g. ``FORCE:32`` for the throughput benchmarks) and
    ``exact`` (no oversubscription). ``env`` holds what a client needs: PATH and SLURM_CONF."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        cpus: int = 4,
        *,
        memory: int | None = None,
        max_array: int = 10_000,
        oversubscribe: str = "NO",
        constrain_ram: bool = False,
        cluster: str = "openhtc",
    ) -> None:
        self.dir = Path(root) / "slurm"
        self.cpus = cpus
        self.memory = memory
        self.max_array = max_array
        self.oversubscribe = oversubscribe
        self.constrain_ram = constrain_ram
        self.cluster = cluster
        self.env = {
            "PATH": SBIN + ":" + os.environ.get("PATH", ""),
            "SLURM_CONF": str(self.dir / "slurm.conf"),
        }
        self.procs: list[subprocess.Popen[bytes]] = []
        # The node's name, unique to this Slurm: slurmd keeps its jobs' cgroups under
        # /sys/fs/cgroup/<controller>/slurm_<node name>/uid_<uid>/job_<id>, host-wide. Named after
        # the host, two private Slurms (two test runs, a test and a benchmark), each numbering its
        # jobs from 1, would put their job 2s in one cgroup: the end of either kills the other's
        # processes, and a signal to one reaches both.
        self.node = "htc" + "".join(random.choice(string.ascii_lowercase) for _ in range(8))

    @property
    def full_env(self) -> dict[str, str]:
        return {**os.environ, **self.env}

    def cmd(self, *argv: str, check: bool = True, timeout: float = 60) -> str:
        done = subprocess.run(
            argv, capture_output=True, text=True, env=self.full_env, timeout=timeout, check=False
        )
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip()[-500:]}")
        return done.stdout

    # -- start and stop ---------------------------------------------------------------------------

    def write_config(self) -> None:
        for sub in ("state", "spool", "log", "munge"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        for path in (self.dir.parent, self.dir):  # munged (user munge) must reach its socket
            path.chmod(0o755)
        values = {
            "cluster": self.cluster,
            "host": socket.gethostname().split(".")[0],
            "node": self.node,
            "dir": self.dir,
            "cpus": self.cpus,
            "memory": self.memory or memory_mb(),
            "max_array": min(4_000_001, max(10_001, self.max_array + 1)),
            "max_jobs": max(20_000, 2 * self.max_array + 1000),
            "ctld_port": free_port(),
            "slurmd_port": free_port(),
            "oversubscribe": self.oversubscribe,
        }
        (self.dir / "slurm.conf").write_text(SLURM_CONF.format(**values))
        (self.dir / "cgroup.conf").write_text(
            CGROUP_CONF.format(constrain_ram="yes" if self.constrain_ram else "no")
        )

    def start(self) -> None:
        """Write the configuration, start the three daemons, wait until the node is idle."""
        missing = missing_binaries()
        if missing:
            raise SlurmUnavailable(f"not installed: {', '.join(missing)} (apt-get install slurm-wlm munge)")
        if os.geteuid() != 0:
            raise SlurmUnavailable("the private Slurm runs its daemons as root")
        if self.running_pids():
            raise RuntimeError(f"a private Slurm already runs in {self.dir} (stop it first)")
        with contextlib.suppress(OSError):
            (self.dir / "pids").unlink()  # a crashed run's
        self.write_config()
        for path in self.dir.parents:  # munged runs as user munge: it must reach its socket
            if not path.stat().st_mode & 0o001:
                raise RuntimeError(f"user munge cannot enter {path} (chmod o+x it, or choose another --dir)")
        munge = self.dir / "munge"
        user = pwd.getpwnam("munge")
        os.chown(munge, user.pw_uid, user.pw_gid)
        # munged refuses to run as root; its private socket leaves any system munged alone
        self.spawn(
            "runuser", "-u", "munge", "--", "munged", "--foreground", "--force",
            f"--socket={munge}/munge.socket", f"--pid-file={munge}/munged.pid",
            f"--log-file={munge}/munged.log", f"--seed-file={munge}/munged.seed",
        )  # fmt: skip
        try:
            self._wait(lambda: (munge / "munge.socket").exists(), "munged to start")
            self.spawn("slurmctld", "-D", "-i", "-f", self.env["SLURM_CONF"])
            self.spawn("slurmd", "-D", "-N", self.node, "-f", self.env["SLURM_CONF"])
            self._wait(lambda: self.node_state() == "idle", "the Slurm node to be idle")
        except BaseException:
            self.stop()
            raise

    def node_state(self) -> str:
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            return self.cmd("sinfo", "-h", "-o", "%t", "-p", "debug", timeout=10).strip()
        return ""

    def _wait(self, ready: Callable[[], bool], what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            for proc in self.procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"{proc.args!r} exited: {self.log('slurmctld.log')}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out waiting for {what}: {self.log('slurmd.log')}")
            time.sleep(0.1)

    def spawn(self, *argv: str) -> None:
        with open(self.dir / "log" / f"{os.path.basename(argv[0])}.out", "ab") as out:
            proc = subprocess.Popen(
                argv,
                env=self.full_env,
                stdout=out,
                stderr=out,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.procs.append(proc)
        with open(self.dir / "pids", "a") as fh:
            fh.write(f"{proc.pid} {os.path.basename(argv[0])}\n")

    def running_pids(self) -> list[tuple[int, str]]:
        """The daemons ``up`` started here that still run (read from DIR/slurm/pids)."""
        try:
            lines = (self.dir / "pids").read_text().split("\n")
        except OSError:
            return []
        found = []
        for line in lines:
            pid, _, name = line.partition(" ")
            if pid.isdigit() and _is(int(pid), name, self.dir):
                found.append((int(pid), name))
        return found

    def stop(self) -> None:
        """Cancel every job, then stop slurmd, slurmctld and munged (SIGTERM; SIGKILL after 15 s)."""
        if self.dir.joinpath("slurm.conf").exists():
            with contextlib.suppress(Exception):
                self.cmd("scancel", "--full", "-u", "root", timeout=20)
        for pid, name in reversed(self.running_pids()):  # slurmd, slurmctld, then munged
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 15
            while _is(pid, name, self.dir) and time.monotonic() < deadline:
                self._reap(pid)
                time.sleep(0.05)
            if _is(pid, name, self.dir):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        with contextlib.suppress(OSError):
            (self.dir / "pids").unlink()
        self._remove_cgroups()

    def _remove_cgroups(self) -> None:
        """Remove this node's cgroup directories slurmd left (empty ones: a cgroup that still
        holds a process stays)."""
        node = self.node_name()
        if not node:
            return
        for top in Path("/sys/fs/cgroup").glob(f"*/slurm_{node}"):
            for path in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
                with contextlib.suppress(OSError):
                    path.rmdir()
            with contextlib.suppress(OSError):
                top.rmdir()

    def node_name(self) -> str | None:
        """The node's name, from the configuration ``up`` wrote (another process may ask)."""
        try:
            conf = (self.dir / "slurm.conf").read_text()
        except OSError:
            return None
        for line in conf.splitlines():
            if line.startswith("NodeName="):
                return line.split()[0].partition("=")[2]
        return None

    def _reap(self, pid: int) -> None:
        for proc in self.procs:
            if proc.pid == pid:
                proc.poll()

    # -- looking at it ---------------------------------------------------------------------------

    def log(self, name: str) -> str:
        try:
            return (self.dir / "log" / name).read_text(errors="replace")[-1500:]
        except OSError:
            return "(no log)"

    def squeue(self) -> list[tuple[str, str, str]]:
        """(job id, name, state) of every job still queued or running."""
        out = self.cmd("squeue", "-h", "-o", "%i|%j|%T")
        return [tuple(line.split("|")) for line in out.splitlines() if line.strip()]  # type: ignore[misc]


def _is(pid: int, name: str, where: Path) -> bool:
    """Whether process ``pid`` runs and is ``name`` started for ``where`` (a reused pid is not ours)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            stat = fh.read()
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            argv = fh.read().split(b"\0")
    except OSError:
        return False
    if stat.rpartition(")")[2].split()[:1] == ["Z"]:
        return False
    words = [a.decode(errors="replace") for a in argv]
    return any(os.path.basename(a) == name for a in words[:4]) and any(_under(a, where) for a in words)


def _under(arg: str, where: Path) -> bool:
    """Whether the path ``arg`` names (``PATH`` or ``--option=PATH``) is ``where`` or inside it,
    compared by path components: ``/x/slurm/slurm.conf`` is not inside ``/x/slurm/slurm``."""
    value = arg.partition("=")[2] if arg.startswith("-") else arg
    return os.path.isabs(value) and PurePath(value).is_relative_to(where)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m openhtc.testing.slurm", description=__doc__.splitlines()[0])
    p.add_argument("action", choices=("up", "status", "down"))
    p.add_argument("--dir", type=Path, default=Path(".htc-slurm"), help="its directory (default .htc-slurm)")
    p.add_argument("--cpus", type=int, default=4, help="the node's CPUs (default 4)")
    args = p.parse_args(argv)
    root = args.dir.resolve()
    slurm = PrivateSlurm(root, args.cpus)
    if args.action == "up":
        try:
            slurm.start()
        except SlurmUnavailable as exc:
            print(f"slurm: {exc}", file=sys.stderr)
            return 2
        except RuntimeError as exc:  # already running, or a daemon failed (its log's end is quoted)
            print(f"slurm: {exc}", file=sys.stderr)
            return 1
        print(f"a private Slurm runs in {slurm.dir} (node {slurm.node}, {args.cpus} CPUs)")
        print(f"export SLURM_CONF={slurm.env['SLURM_CONF']}")
        return 0
    if args.action == "status":
        if not slurm.running_pids():
            print(f"no private Slurm runs in {slurm.dir}")
            return 1
        print(" ".join(f"{name}={pid}" for pid, name in slurm.running_pids()))
        print(slurm.cmd("sinfo", check=False), end="")
        print(slurm.cmd("squeue", check=False), end="")
        return 0
    slurm.stop()
    shutil.rmtree(slurm.dir, ignore_errors=True)  # only what up made
    with contextlib.suppress(OSError):
        root.rmdir()  # when empty
    print(f"stopped; removed {slurm.dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
