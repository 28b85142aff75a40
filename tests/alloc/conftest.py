"""A private single-node Slurm for the allocation tests: munged, slurmctld and slurmd as our
children, on free ports, in a fresh state directory (configured like bench/drivers/slurm_driver.py).

Needs root and Debian's slurm-wlm and munge (skipped locally without them; CI installs them).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from openhtc.testing.ci import skip_or_fail
from openhtc.testing.postgres import free_port

SBIN = "/usr/sbin:/usr/bin:/sbin:/bin"
CPUS = 4

SLURM_CONF = """\
ClusterName=openhtctest
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
MinJobAge=300
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0
SlurmdParameters=config_overrides
"""

CGROUP_CONF = """\
CgroupPlugin=cgroup/v1
ConstrainCores=yes
CgroupMountpoint=/sys/fs/cgroup
"""


class PrivateSlurm:
    def __init__(self, root: Path) -> None:
        self.dir = root / "slurm"
        self.env = {
            "PATH": SBIN + ":" + os.environ.get("PATH", ""),
            "SLURM_CONF": str(self.dir / "slurm.conf"),
        }
        self.procs: list[subprocess.Popen[bytes]] = []

    def cmd(self, *argv: str, check: bool = True) -> str:
        done = subprocess.run(
            argv, capture_output=True, text=True, env={**os.environ, **self.env}, timeout=60, check=False
        )
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip()[-500:]}")
        return done.stdout

    def start(self) -> None:
        for sub in ("state", "spool", "log", "munge"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        for path in (self.dir.parent, self.dir):  # munged (user munge) must reach its socket
            path.chmod(0o755)
        host = socket.gethostname().split(".")[0]
        (self.dir / "slurm.conf").write_text(
            SLURM_CONF.format(
                host=host,
                dir=self.dir,
                cpus=CPUS,
                memory=4000,
                ctld_port=free_port(),
                slurmd_port=free_port(),
            )
        )
        (self.dir / "cgroup.conf").write_text(CGROUP_CONF)
        munge = self.dir / "munge"
        user = pwd.getpwnam("munge")
        os.chown(munge, user.pw_uid, user.pw_gid)
        self.spawn(
            "runuser", "-u", "munge", "--", "munged", "--foreground", "--force",
            f"--socket={munge}/munge.socket", f"--pid-file={munge}/munged.pid",
            f"--log-file={munge}/munged.log", f"--seed-file={munge}/munged.seed",
        )  # fmt: skip
        self._wait(lambda: (munge / "munge.socket").exists(), "munged to start")
        self.spawn("slurmctld", "-D", "-i", "-f", self.env["SLURM_CONF"])
        self.spawn("slurmd", "-D", "-f", self.env["SLURM_CONF"])

        def idle() -> bool:
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                return self.cmd("sinfo", "-h", "-o", "%t").strip() == "idle"
            return False

        self._wait(idle, "the Slurm node to be idle")

    def _wait(self, ready: object, what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not ready():  # type: ignore[operator]
            for proc in self.procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"{proc.args!r} exited: {self.log('slurmctld.log')}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out waiting for {what}: {self.log('slurmd.log')}")
            time.sleep(0.1)

    def spawn(self, *argv: str) -> None:
        with open(self.dir / "log" / f"{os.path.basename(argv[0])}.out", "ab") as out:
            proc = subprocess.Popen(
                argv, env={**os.environ, **self.env}, stdout=out, stderr=out, stdin=subprocess.DEVNULL
            )
        self.procs.append(proc)

    def log(self, name: str) -> str:
        try:
            return (self.dir / "log" / name).read_text(errors="replace")[-1500:]
        except OSError:
            return "(no log)"

    def squeue(self) -> list[tuple[str, str, str]]:
        """(job id, name, state) of every job still queued or running."""
        out = self.cmd("squeue", "-h", "-o", "%i|%j|%T")
        return [tuple(line.split("|")) for line in out.splitlines() if line.strip()]  # type: ignore[misc]

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.cmd("scancel", "--full", "-u", "root")
        for proc in reversed(self.procs):  # slurmd, slurmctld, then munged
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)


@pytest.fixture(scope="module")
def slurm() -> Iterator[PrivateSlurm]:
    path = SBIN + ":" + os.environ.get("PATH", "")
    missing = [b for b in ("munged", "slurmctld", "slurmd", "sbatch") if not shutil.which(b, path=path)]
    if missing:
        skip_or_fail(f"not installed: {', '.join(missing)} (apt-get install slurm-wlm munge)")
    if os.geteuid() != 0:
        skip_or_fail("the private Slurm runs its daemons as root")
    # not under pytest's tmp dir: that is 0700, and munged (user munge) must reach its socket
    root = Path(tempfile.mkdtemp(prefix="openhtc-slurm-"))
    cluster = PrivateSlurm(root)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
