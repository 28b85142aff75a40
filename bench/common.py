"""Shared pieces: the Result record, statistics, timing and process helpers."""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "bench" / "results"


@dataclass
class Result:
    """One figure of one system on one workload: the unit the tables and the JSON are made of.

    ``figure`` names the headline entry of ``metrics``. ``ratios`` maps every other system
    measured on the same workload and N in the same run (``system`` or ``system/db``) to this
    result's *advantage* over it: figure ÷ theirs when higher is better (jobs/s), theirs ÷
    figure when lower is (seconds, ms); above 1 means this system did better. ``targets`` are the
    issue's goals for this result, each with ``met`` (None: not judged).
    """

    workload: str
    system: str
    db: str  # "sqlite", "postgres" or "-" (no database involved)
    n: int
    figure: str
    unit: str
    metrics: dict[str, Any] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    status: str = "ok"  # ok | skipped | unavailable | error
    ratios: dict[str, float] = field(default_factory=dict)
    targets: list[dict[str, Any]] = field(default_factory=list)

    @property
    def value(self) -> Any:
        return self.metrics.get(self.figure)

    @property
    def label(self) -> str:
        return self.system if self.db == "-" else f"{self.system}/{self.db}"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100), linear between closest ranks; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    pos = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def peak_rss_mb(pid: int | str = "self", key: str = "VmHWM") -> float | None:
    """VmHWM (peak resident set; or ``key``, e.g. VmRSS) of a process in MiB, from /proc."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return round(int(line.split()[1]) / 1024.0, 1)
    except OSError:
        return None
    return None


def cpu_seconds(pid: int | str = "self") -> float | None:
    """CPU time of a process and its reaped children (user + system), from /proc/PID/stat."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rpartition(")")[2].split()
    except OSError:
        return None
    # fields[0] is field 3 (state); utime, stime, cutime, cstime are fields 14-17.
    ticks = sum(int(x) for x in fields[11:15])
    return ticks / os.sysconf("SC_CLK_TCK")


def job_batches(
    n: int,
    max_memory: int | None = 64,
    commands: Sequence[str] = ("true",),
    image: str = "bb",
    max_vcpus: int | None = None,
) -> list[dict[str, Any]]:
    """A submit body for n jobs in batches of at most 1000 (the API's limit)."""
    definition: dict[str, Any] = {"imageName": image, "commands": list(commands)}
    if max_memory is not None:
        definition["maxMemory"] = max_memory
    if max_vcpus is not None:
        definition["maxVCpus"] = max_vcpus
    body = []
    left = n
    while left > 0:
        size = min(1000, left)
        body.append({"batchSize": size, "htcJobDefinition": dict(definition)})
        left -= size
    return body


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def stop_process(proc: subprocess.Popen[Any], grace: float = 20.0) -> None:
    """Stop a child we started: SIGINT, then SIGTERM, then SIGKILL, to its own PID only."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGINT, grace), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            proc.send_signal(sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def py_spy_binary() -> str | None:
    """py-spy next to this interpreter (the venv), else on PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    if beside.is_file():
        return str(beside)
    return shutil.which("py-spy")


class Profiler:
    """``py-spy record`` on one process while a measured phase runs (collapsed stacks out)."""

    def __init__(self, pid: int, out: Path, rate: int = 250, idle: bool = False) -> None:
        """``idle``: also the samples of threads waiting (where a process waits, not only works)."""
        self.proc: subprocess.Popen[Any] | None = None
        self.out = out
        binary = py_spy_binary()
        if binary is None:
            log("py-spy not found; no profile")
            return
        out.parent.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [binary, "record", "-p", str(pid), "-o", str(out), "-f", "raw", "-r", str(rate), "--nonblocking"]
            + (["--idle"] if idle else [])
            + os.environ.get("BENCH_PY_SPY_ARGS", "").split(),  # say, --gil: only the GIL's holder
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(0.3)  # let it attach before the measured phase starts

    def stop(self) -> Path | None:
        if self.proc is None:
            return None
        stop_process(self.proc, grace=20.0)
        return self.out if self.out.exists() else None


def git_describe() -> str:
    def git(*args: str) -> str:
        run = subprocess.run(
            ["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=10, check=True
        )
        return run.stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def openhtc_source() -> tuple[str, str]:
    """Where the measured openhtc is imported from, and its git state if it is this checkout."""
    try:
        import openhtc
    except ImportError:
        return "not importable", "unknown"
    src = Path(openhtc.__file__).resolve().parent
    if src.is_relative_to(REPO):
        return str(src), git_describe()
    return str(src), "unknown (not this checkout)"


def machine() -> dict[str, Any]:
    import platform

    source, git = openhtc_source()
    return {
        "cpus": os.cpu_count(),
        "cpu_model": cpu_model(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "hostname": platform.node(),
        "openhtc": source,
        "git": git,
    }
