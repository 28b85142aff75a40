"""Slurm driver: a private single-node Slurm (munged, slurmctld, slurmd in the foreground, all
our children) configured as infrastructure-notes §3 tunes it, in a fresh state directory.

- ``throughput``: one job array of N tasks (``sbatch --array --wrap``); the clock stops when
  ``squeue`` shows none of them pending, running or completing (polled every 0.5 % of the
  elapsed time, 10-100 ms, like the openhtc client). Jobs go to partition ``debug``
  (``OverSubscribe=FORCE:32``, the tuned setting: up to 32 jobs share a CPU) unless
  ``exclusive_cpus`` asks for partition ``exact`` (no oversubscription: one CPU per job, as the
  sleep workload's 1-vCPU request means).
- ``latency``: one ``sbatch --wrap`` at a time; ``squeue -t all`` polled until COMPLETED.
- ``accept``: one held array of N tasks: the time ``sbatch`` takes, slurmctld's RSS, and the
  time of a ``squeue`` that summarises the array and of one listing 100 of its tasks.

Needs root, the Debian packages slurm-wlm and munge, and cgroup v1 (``CgroupPlugin=cgroup/v1``).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import time
from typing import Any

from _common import Unavailable, latency_figures, log, main, rss_mb, throughput_figures

SBIN = "/usr/sbin:/usr/bin:/sbin:/bin"
STATES_ACTIVE = "PENDING,RUNNING,COMPLETING,CONFIGURING,SUSPENDED,REQUEUED,RESIZING"

SLURM_CONF = """\
ClusterName=openhtcbench
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
MaxArraySize={max_array}
MaxJobCount={max_jobs}
MinJobAge=600
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:32
PartitionName=exact Nodes={host} Default=NO MaxTime=INFINITE State=UP OverSubscribe=NO
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0,default_queue_depth=2000,\
sched_max_job_start=0,max_sched_time=2
SlurmdParameters=config_overrides
"""

CGROUP_CONF = """\
CgroupPlugin=cgroup/v1
ConstrainCores=yes
ConstrainRAMSpace=yes
CgroupMountpoint=/sys/fs/cgroup
"""


def _memory_mb() -> int:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemTotal:"):
                return int(int(line.split()[1]) / 1024 * 0.8)
    return 4000


class Slurm:
    def __init__(self, workdir: str, cpus: int, max_array: int) -> None:
        self.dir = os.path.join(workdir, "slurm")
        self.env = {**os.environ, "PATH": SBIN + ":" + os.environ.get("PATH", "")}
        self.env["SLURM_CONF"] = os.path.join(self.dir, "slurm.conf")
        self.procs: list[subprocess.Popen[bytes]] = []
        self.cpus = cpus
        self.max_array = max_array

    def cmd(self, *argv: str, timeout: float = 120) -> str:
        run = subprocess.run(argv, capture_output=True, text=True, env=self.env, timeout=timeout)
        if run.returncode != 0:
            raise RuntimeError(f"{shlex.join(argv)}: {run.stderr.strip()[-500:]}")
        return run.stdout

    def start(self) -> None:
        for binary in ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "sinfo"):
            if not shutil.which(binary, path=self.env["PATH"]):
                raise Unavailable(f"{binary} not found (apt-get install slurm-wlm munge)")
        if os.geteuid() != 0:
            raise Unavailable("the private Slurm runs its daemons as root")
        for sub in ("state", "spool", "log", "munge"):
            os.makedirs(os.path.join(self.dir, sub), exist_ok=True)
        for path in (os.path.dirname(self.dir), self.dir):  # munged (user munge) must reach its socket
            os.chmod(path, 0o755)
        host = socket.gethostname().split(".")[0]
        values = {
            "host": host,
            "dir": self.dir,
            "cpus": self.cpus,
            "memory": _memory_mb(),
            "max_array": min(4_000_001, max(10_001, self.max_array + 1)),
            "max_jobs": max(20_000, 2 * self.max_array + 1000),
            "ctld_port": 6817,
            "slurmd_port": 6818,
        }
        with open(self.env["SLURM_CONF"], "w") as fh:
            fh.write(SLURM_CONF.format(**values))
        with open(os.path.join(self.dir, "cgroup.conf"), "w") as fh:
            fh.write(CGROUP_CONF)
        # munged refuses to run as root; it gets a private socket so no system munged is touched.
        munge_dir = os.path.join(self.dir, "munge")
        user = pwd.getpwnam("munge")
        os.chown(munge_dir, user.pw_uid, user.pw_gid)
        os.chmod(munge_dir, 0o755)
        self.spawn(
            "runuser", "-u", "munge", "--", "munged", "--foreground", "--force",
            f"--socket={munge_dir}/munge.socket", f"--pid-file={munge_dir}/munged.pid",
            f"--log-file={munge_dir}/munged.log", f"--seed-file={munge_dir}/munged.seed",
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while not os.path.exists(f"{munge_dir}/munge.socket"):
            if time.monotonic() > deadline:
                raise RuntimeError(f"munged did not start: {self.log('munge/munged.log')}")
            time.sleep(0.05)
        self.spawn("slurmctld", "-D", "-i", "-f", self.env["SLURM_CONF"])
        self.spawn("slurmd", "-D", "-f", self.env["SLURM_CONF"])
        deadline = time.monotonic() + 60
        state = ""
        while time.monotonic() < deadline:
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                state = self.cmd("sinfo", "-h", "-o", "%t", "-p", "debug", timeout=10).strip()
                if state == "idle":
                    return
            for proc in self.procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"{proc.args!r} exited: {self.log('log/slurmctld.log')}")
            time.sleep(0.1)
        raise RuntimeError(f"the Slurm node is {state!r}, not idle: {self.log('log/slurmd.log')}")

    def spawn(self, *argv: str) -> None:
        with open(os.path.join(self.dir, "log", f"{os.path.basename(argv[0])}.out"), "ab") as out:
            proc = subprocess.Popen(argv, env=self.env, stdout=out, stderr=out, stdin=subprocess.DEVNULL)
        self.procs.append(proc)

    def log(self, name: str) -> str:
        try:
            with open(os.path.join(self.dir, name), errors="replace") as fh:
                return " ".join(fh.read()[-1200:].split())
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.cmd("scancel", "--full", "-u", "root", timeout=20)
        for proc in reversed(self.procs):  # slurmd, slurmctld, then munged
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)

    def sbatch(self, *args: str) -> str:
        return (
            self.cmd("sbatch", "--parsable", "-o", "/dev/null", "-e", "/dev/null", *args)
            .strip()
            .split(";")[0]
        )

    def active(self, job: str) -> int:
        return len(self.cmd("squeue", "-h", "-r", "-j", job, "-t", STATES_ACTIVE, "-o", "%i").split())

    def states(self, job: str) -> list[str]:
        return self.cmd("squeue", "-h", "-r", "-j", job, "-t", "all", "-o", "%T").split()


def run(p: dict[str, Any]) -> dict[str, Any]:
    argv, n, slots = list(p["argv"]), int(p["n"]), int(p["slots"])
    wrap = shlex.join(argv)
    partition = ["-p", "exact", "--cpus-per-task", str(p.get("cpus", 1))] if p.get("exclusive_cpus") else []
    slurm = Slurm(p["workdir"], slots, n if p["mode"] in ("throughput", "accept") else 10)
    t0 = time.perf_counter()
    try:
        slurm.start()
        out: dict[str, Any] = {"startup_s": time.perf_counter() - t0}
        out["version"] = slurm.cmd("sinfo", "-V").split()[-1]
        if p["mode"] != "accept" and p.get("warmup"):
            job = slurm.sbatch(f"--array=0-{int(p['warmup']) - 1}", *partition, "--wrap", wrap)
            while slurm.active(job):
                time.sleep(0.05)
        if p["mode"] == "throughput":
            start = time.perf_counter()
            job = slurm.sbatch(f"--array=0-{n - 1}", *partition, "--wrap", wrap)
            submitted = time.perf_counter()
            while slurm.active(job):
                time.sleep(min(0.1, max(0.01, 0.005 * (time.perf_counter() - start))))
            done = time.perf_counter()
            states = slurm.states(job)
            failed = sum(1 for s in states if s != "COMPLETED")
            out.update(throughput_figures(n, start, submitted, done, failed))
            out["records_seen"] = len(states)
        elif p["mode"] == "latency":
            samples, failed = [], 0
            for _ in range(n):
                start = time.perf_counter()
                job = slurm.sbatch(*partition, "--wrap", wrap)
                while True:
                    state = slurm.cmd("squeue", "-h", "-j", job, "-t", "all", "-o", "%T").strip()
                    if state and state not in STATES_ACTIVE.split(","):
                        break
                    time.sleep(0.002)
                samples.append(time.perf_counter() - start)
                failed += state != "COMPLETED"
                time.sleep(float(p.get("interval", 0.02)))
            out.update(latency_figures(samples), failed=failed)
        elif p["mode"] == "accept":
            start = time.perf_counter()
            job = slurm.sbatch("--hold", f"--array=0-{n - 1}", "--wrap", wrap)
            out["seconds"] = time.perf_counter() - start
            t = time.perf_counter()
            slurm.cmd("squeue", "-h", "-j", job, "-o", "%T %i")
            out["summary_ms"] = (time.perf_counter() - t) * 1000
            t = time.perf_counter()
            page = subprocess.run(
                f"squeue -h -r -j {job} -o %i | head -n 100", shell=True, env=slurm.env, capture_output=True
            )
            out["page_ms"] = (time.perf_counter() - t) * 1000
            out["page_rows"] = len(page.stdout.split())
            out["rss_mb"] = rss_mb(slurm.procs[1].pid)
            log(f"accepted {n} array tasks in {out['seconds']:.2f} s")
        else:
            raise ValueError(f"unknown mode {p['mode']!r}")
    finally:
        slurm.stop()
    return out


if __name__ == "__main__":
    raise SystemExit(main(run))
