"""An agent's work directory: one agent at a time, and the agent id it keeps.

Two agents on one work directory would share its journal, report buffer and logs, and (with an
id derived from host and path) one agent id: the server would take them for one agent. The
first agent holds an exclusive ``flock`` on ``agent/lock`` (which names its pid) for as long as
it runs; a second one is refused (``WorkDirTaken``; ``htc agent`` exits 2 naming the first's pid).
The agent id is random, made at the first start and kept in ``agent/id``: two machines with the
same host name and path are two agents. A work directory from before the id file keeps the id it
had (host and path), so a restart takes back what it left running.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import secrets
import socket
from pathlib import Path
from typing import IO


class WorkDirTaken(Exception):
    def __init__(self, work_dir: Path, pid: str) -> None:
        self.pid = pid
        super().__init__(
            f"another htc agent (pid {pid or 'unknown'}) uses the work directory {work_dir}; "
            "give each agent a work directory of its own (--work-dir)"
        )


def legacy_agent_id(work_dir: str) -> str:
    """The id agents had before the id file: stable per machine and work directory."""
    digest = hashlib.sha256(f"{socket.gethostname()}:{work_dir}".encode()).hexdigest()[:10]
    return f"agent-{socket.gethostname()}-{digest}"


def claim_work_dir(work: Path) -> tuple[str, IO[str]]:
    """Lock ``work`` for this process and return its agent id and the lock (keep it open: the
    lock is held until the process exits). Raises WorkDirTaken if another agent holds it."""
    state = work / "agent"
    state.mkdir(parents=True, exist_ok=True)
    lock = open(state / "lock", "a+", encoding="utf-8")  # noqa: SIM115 (held for the process' life)
    try:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        pid = lock.read().strip()
        lock.close()
        raise WorkDirTaken(work, pid) from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    return _agent_id(work, state), lock


def _agent_id(work: Path, state: Path) -> str:
    path = state / "id"
    if path.exists():
        kept = path.read_text(encoding="utf-8").strip()
        if kept:
            return kept
    if (state / "reports.jsonl").exists():  # an agent ran here before ids were kept
        agent_id = legacy_agent_id(str(work))
    else:
        host = socket.gethostname()[:60] or "host"
        agent_id = f"agent-{host}-{secrets.token_hex(6)}"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(agent_id + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return agent_id
