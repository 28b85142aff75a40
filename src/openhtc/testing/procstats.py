"""What a process and its descendants hold on the host, read from /proc: open descriptors,
threads and resident memory. The soak benchmark and its CI test sample a server with it."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ProcStats:
    fds: int  # open descriptors of the process itself
    threads: int
    rss_mb: float
    child_fds: int  # summed over every descendant (launchers, registry, running jobs)
    child_threads: int
    child_rss_mb: float
    children: int


def _status(pid: int) -> dict[str, str]:
    out: dict[str, str] = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            out[key] = value.strip()
    return out


def _one(pid: int) -> tuple[int, int, float]:
    """(descriptors, threads, RSS MiB) of one process; zeros once it is gone."""
    try:
        status = _status(pid)
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0, 0, 0.0
    rss = int(status.get("VmRSS", "0 kB").split()[0]) / 1024.0
    return fds, int(status.get("Threads", "0")), rss


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (by parent pid, whatever session they are in)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                ppid = int(fh.read().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        parents.setdefault(ppid, []).append(int(entry))
    found: list[int] = []
    todo = [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def sample(pid: int) -> ProcStats:
    fds, threads, rss = _one(pid)
    kids = descendants(pid)
    per_kid = [_one(k) for k in kids]
    return ProcStats(
        fds,
        threads,
        round(rss, 1),
        sum(k[0] for k in per_kid),
        sum(k[1] for k in per_kid),
        round(sum(k[2] for k in per_kid), 1),
        len(kids),
    )


def fd_kinds(pid: int) -> dict[str, int]:
    """How many of a process's descriptors are pipes, sockets, files... (for a failure message)."""
    kinds: dict[str, int] = {}
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return kinds
    for name in names:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        kind = target.split(":", 1)[0] if ":" in target and not target.startswith("/") else "file"
        kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


def alive(pid: int) -> bool:
    """Whether ``pid`` runs: not gone and not a zombie (a process may vanish between the checks)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            # the state follows the command in parentheses, which may itself contain spaces
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:  # FileNotFoundError, or ProcessLookupError from a process that just died
        return False
