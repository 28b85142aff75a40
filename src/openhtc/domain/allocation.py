"""Allocation queues: the pure decisions behind Slurm pilots (services/allocation.py applies them).

A queue submits pilot jobs (each runs one ``htc agent``) to a batch system for one region. The
rules follow HyperQueue's automatic allocation (docs/allocation.md):

- how many pilots to submit: enough to cover the region's queued vCPUs that the live agents and
  the pilots already waiting cannot, but never more than ``backlog`` waiting in the batch
  system's queue at once nor ``max_pilots`` alive in all. Capacity therefore ramps up by at most
  ``backlog`` pilots per start-up time of a pilot, never in one burst;
- failure hygiene: after ``SUBMIT_FAILURES`` failed submissions in a row, or ``START_FAILURES``
  pilots in a row that ended without their agent ever calling, the queue pauses itself with a
  reason (a broken sbatch argument, a pilot that cannot reach the server) until resumed;
- walltime: a pilot's agent takes no job whose timeout does not fit in the time it has left,
  and a pilot with nothing to run for its idle timeout is stopped (scale to zero).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

SUBMIT_FAILURES = 10  # failed submissions in a row that pause a queue
START_FAILURES = 3  # pilots in a row that die before their agent calls
DEFAULT_BACKLOG = 1
DEFAULT_IDLE_TIMEOUT = 300.0
DEFAULT_MAX_PILOTS = 4
# The pilot is asked to drain this long before its walltime ends (Slurm's --signal=B:TERM@S).
DRAIN_BEFORE_END = 60
# The agent label carrying when an agent's allocation ends (epoch seconds): set by
# `htc agent --time-limit`, for agents that no allocation queue started (docs/allocation.md).
ENDS_AT_LABEL = "openhtc.ends-at"


class QueueState(enum.StrEnum):
    ACTIVE = "active"
    PAUSED = "paused"


class PilotState(enum.StrEnum):
    """A pilot as the batch system last showed it; ``ENDED`` once it left its queue."""

    SUBMITTED = "submitted"  # sbatch answered; not seen in squeue yet
    PENDING = "pending"
    RUNNING = "running"
    ENDED = "ended"

    @property
    def waiting(self) -> bool:
        return self in (PilotState.SUBMITTED, PilotState.PENDING)

    @property
    def alive(self) -> bool:
        return self is not PilotState.ENDED


@dataclass(frozen=True, slots=True)
class QueueLimits:
    max_pilots: int
    backlog: int
    pilot_vcpus: int


@dataclass(frozen=True, slots=True)
class Demand:
    """A region's work and capacity now: queued vCPUs, and the vCPUs its live agents have free."""

    queued_vcpus: int
    free_vcpus: int


def pilots_to_submit(limits: QueueLimits, demand: Demand, waiting: int, alive: int) -> int:
    """How many pilots to submit now. ``waiting``: pilots submitted that have not started yet;
    ``alive``: every pilot not ended (waiting included)."""
    uncovered = demand.queued_vcpus - demand.free_vcpus - waiting * limits.pilot_vcpus
    if uncovered <= 0:
        return 0
    wanted = math.ceil(uncovered / max(1, limits.pilot_vcpus))
    return max(0, min(wanted, limits.backlog - waiting, limits.max_pilots - alive))


@dataclass(frozen=True, slots=True)
class Health:
    """A queue's failure counters (both reset by a success)."""

    failed_submissions: int = 0
    failed_starts: int = 0


def after_submission(health: Health, error: str | None) -> tuple[Health, str | None]:
    """The counters after one submission; the second value is a pause reason when it pauses."""
    if error is None:
        return Health(0, health.failed_starts), None
    failed = health.failed_submissions + 1
    reason = None
    if failed >= SUBMIT_FAILURES:
        reason = f"{failed} submissions failed in a row; the last: {error}"
    return Health(failed, health.failed_starts), reason


def after_pilot_end(health: Health, agent_called: bool, detail: str) -> tuple[Health, str | None]:
    """The counters after a pilot left the batch system; ``agent_called``: its agent registered."""
    if agent_called:
        return Health(health.failed_submissions, 0), None
    failed = health.failed_starts + 1
    reason = None
    if failed >= START_FAILURES:
        reason = f"{failed} pilots in a row ended before their agent called the server; the last: {detail}"
    return Health(health.failed_submissions, failed), reason


def fits(timeout_s: int | None, seconds_left: float | None, margin: float = DRAIN_BEFORE_END) -> bool:
    """Whether a job with ``timeout_s`` (None: no timeout) may start on a pilot with
    ``seconds_left`` of walltime (None: no end). The pilot drains ``margin`` before its end."""
    if seconds_left is None or timeout_s is None:
        return True  # as HyperQueue: a job that states no time limit fits any pilot
    return timeout_s <= seconds_left - margin


def max_timeout(seconds_left: float | None, margin: float = DRAIN_BEFORE_END) -> int | None:
    """The longest ``execTimeoutSeconds`` a pilot with ``seconds_left`` may start (None: any);
    ``fits(t, seconds_left)`` exactly when ``t <= max_timeout(seconds_left)``. Below zero: none."""
    if seconds_left is None:
        return None
    return math.floor(seconds_left - margin)


def is_idle(last_busy: float, now: float, idle_timeout: float) -> bool:
    """Whether a pilot's agent, with nothing held since ``last_busy``, has idled long enough."""
    return now - last_busy >= idle_timeout


def parse_duration(text: str) -> int:
    """``"300"``, ``"300s"``, ``"5m"``, ``"1h"``, ``"1h30m"``, ``"2d"`` -> seconds (> 0)."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    value = text.strip().lower()
    if not value:
        raise ValueError("an empty duration")
    if value.isdigit():
        seconds = int(value)
    else:
        seconds, number = 0, ""
        for ch in value:
            if ch.isdigit():
                number += ch
            elif ch in units and number:
                seconds += int(number) * units[ch]
                number = ""
            else:
                raise ValueError(f"not a duration: {text!r} (use e.g. 300s, 5m, 1h30m)")
        if number:
            raise ValueError(f"not a duration: {text!r} (a number without a unit at the end)")
    if seconds <= 0:
        raise ValueError(f"a duration must be positive: {text!r}")
    return seconds


def slurm_time(seconds: int) -> str:
    """Seconds -> Slurm's ``--time`` format: ``D-HH:MM:SS`` (rounded up to a whole minute)."""
    minutes = math.ceil(seconds / 60)
    days, rest = divmod(minutes, 1440)
    return f"{days}-{rest // 60:02d}:{rest % 60:02d}:00"


# sbatch options an allocation queue may pass on (`htc alloc add ... -- ARGS`): where and as whom
# a pilot runs and what it holds, never what openhtc sets itself (--job-name, --time from
# --time-limit, --cpus-per-task, --signal, --output...) nor what would take Slurm elsewhere
# (--clusters: squeue would not see the pilot). The setting alloc_sbatch_options adds more.
SBATCH_OPTIONS: dict[str, str | None] = {  # long name -> its short form
    "partition": "p",
    "account": "A",
    "qos": "q",
    "constraint": "C",
    "reservation": None,
    "gres": None,
    "gpus": "G",
    "gpus-per-node": None,
    "cpus-per-gpu": None,
    "mem": None,
    "mem-per-cpu": None,
    "mem-per-gpu": None,
    "tmp": None,
    "nodelist": "w",
    "exclude": "x",
    "licenses": "L",
    "prefer": None,
    "comment": None,
    "wckey": None,
    "exclusive": None,
    "requeue": None,
    "no-requeue": None,
}
SBATCH_FLAGS = frozenset({"exclusive", "requeue", "no-requeue"})  # take no value


def sbatch_args_problem(args: list[str] | tuple[str, ...], more: tuple[str, ...] = ()) -> str | None:
    """Why ``args`` may not go to ``sbatch`` (naming the option), or None when they may.

    Each is ``--name=value``, ``--name value``, ``-X value`` or ``-Xvalue`` for an allowed
    option; a flag (``--exclusive``) takes no value. ``more``: extra long names (the setting),
    which take a value when the next argument is not an option."""
    allowed = set(SBATCH_OPTIONS) | {m.strip().lstrip("-") for m in more if m.strip()}
    by_letter = {short: long for long, short in SBATCH_OPTIONS.items() if short}
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--") and len(arg) > 2:
            name, eq, _ = arg[2:].partition("=")
            shown = "--" + name
        elif arg.startswith("-") and len(arg) > 1 and arg[1] in by_letter:
            name, eq, shown = by_letter[arg[1]], "=" if len(arg) > 2 else "", arg[:2]
        elif arg.startswith("-"):
            return f"sbatch option {arg.split('=')[0]} is not allowed in an allocation queue{_allowed()}"
        else:
            return f"{arg!r} is not an sbatch option (expected --name=value)"
        if name not in allowed:
            why = " (the queue's --time-limit sets it)" if name in ("time", "t") else ""
            return f"sbatch option {shown} is not allowed in an allocation queue{why}{_allowed()}"
        following = args[i + 1] if i + 1 < len(args) else None
        if name in SBATCH_FLAGS or eq:
            if name in SBATCH_FLAGS and eq and name != "exclusive":
                return f"sbatch option {shown} takes no value"
            i += 1
        elif following is not None and not following.startswith("-"):
            i += 2
        elif name in SBATCH_OPTIONS:
            return f"sbatch option {shown} needs a value"
        else:
            i += 1  # an option the setting added, used as a flag
    return None


def _allowed() -> str:
    names = ", ".join("--" + name for name in SBATCH_OPTIONS)
    return f"; allowed: {names} (alloc_sbatch_options adds more)"
