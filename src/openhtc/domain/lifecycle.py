"""The job lifecycle, pure: every status change a job makes, as functions of plain values.

Each step takes a job's :class:`JobRecord` (the part of its row the lifecycle owns) and one input
(a submission, an admission, a claim, an executor's reports, a cancel, the loss of its executor)
and returns a :class:`Step`: the new record and the events to write. The store loads rows under
lock, calls these functions and writes what they return (``store/transitions.py``); nothing else
sets a status field. The counter deltas follow from the statuses (:func:`counter_deltas`).

Every move goes through :data:`EFFECTS`, a ``(from, to) -> effect`` table: a move that is not in
it raises :class:`InvalidTransition`, and the effect says which fields the move sets. Inputs that
do not apply (a report for an old attempt, a repeated one, one from an executor that no longer
holds the job, anything for a job already terminal) return the record unchanged and no events:
that is the fencing of stale attempts.

Failures come in two kinds. The job's own (non-zero exit, timeout, OOM, start failure) spend a
user retry (``maxRetries``). Infrastructure faults (the executor lost, restarted or silent past
its lease after the attempt may have started, or the executor's own infrastructure failing it)
spend none: the job is re-run on a separate budget, ``max_infrastructure_retries``, and fails
with ``ErrorInfrastructureFault`` once that is spent. An attempt that cannot have started goes
back to the queue free (the crash rule, ``domain/recovery.py``).

The hot steps (claim, reports) build their tuples with ``tuple.__new__`` from unpacked fields:
they run for every job several times a second at thousands of jobs a second, and attribute
reads and ``_replace`` cost several times more.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

from openhtc.domain import recovery
from openhtc.domain.enums import ACTIVE_STATUSES, FailureCode, JobStatus
from openhtc.domain.errors import InvalidTransition
from openhtc.domain.models import AttemptReport

S = JobStatus
INFRASTRUCTURE_FAULT = FailureCode.ErrorInfrastructureFault.value


class JobRecord(NamedTuple):
    """What the lifecycle knows of a job: its status fields and its retry budgets.

    Immutable; a NamedTuple rather than a frozen dataclass because every job builds several per
    run on the hottest path (claim, reports), and a tuple builds several times faster.
    """

    id: int  # the job's id, for events and error messages
    status: int
    attempt: int = 1
    failed_attempts: int = 0  # attempts of the job's own failing: they count against max_retries
    infra_retries: int = 0  # attempts re-run after an infrastructure fault (no user retry spent)
    max_retries: int = 0
    executor_id: str | None = None
    lease_expires_at: float | None = None
    started_at: float | None = None
    completed_at: float | None = None
    exit_code: int | None = None
    failure_code: str | None = None
    status_reason: str | None = None
    cancelled: bool = False

    @property
    def terminal(self) -> bool:
        return self.status >= _FIRST_TERMINAL


class Event(NamedTuple):
    """One status a job passed through: a row of its event history (``job_events``).

    The hot steps (claim, reports) give their events as plain tuples in this field order
    (:data:`EventRow`; ``Event._make`` names one): the store holds thousands of them until it
    writes them, and the GC stops tracking a plain tuple of plain values, never a NamedTuple.
    """

    job_id: int
    attempt: int
    status: int
    at: float
    reason: str | None = None
    exit_code: int | None = None
    executor_id: str | None = None
    cancelled: bool = False


EventRow = tuple[int, int, int, float, str | None, int | None, str | None, bool]


class Step(NamedTuple):
    """The outcome of one input: the new record, the events to append, and whether the job went
    back to SUBMITTED_TO_RESCALE (the scheduler must then run an admission round)."""

    record: JobRecord
    events: tuple[EventRow, ...] = ()  # Events, or their plain rows (the hot steps)
    requeued: bool = False

    @property
    def changed(self) -> bool:
        return bool(self.events)


class Effect(enum.Enum):
    """What entering a status does to the record's other fields."""

    ADMIT = "admit"  # nothing more: the job is queued for its region
    CLAIM = "claim"  # executor and lease set
    SET_UP = "set-up"  # nothing more: image pull, sandbox
    START = "start"  # started_at
    SUCCEED = "succeed"  # exit code, reason, completed_at; lease dropped
    FAIL = "fail"  # the attempt failed: a retry or re-run (REQUEUE follows), or final
    REQUEUE = "requeue"  # a new attempt: executor, lease and started_at dropped


# The statuses in which an executor holds a job under a lease: heartbeats renew it, and the job
# is recovered (lose_executor) when it expires or the executor registers again.
HELD_STATUSES = ACTIVE_STATUSES

# short names for the table below, and the stored codes the records carry
_A, _P, _RN, _ST, _RU, _OK, _F = (int(s) for s in S)
_FIRST_TERMINAL = _OK
_ACTIVE = frozenset(int(s) for s in ACTIVE_STATUSES)
# tuple.__new__ builds a NamedTuple without its Python-level __new__: the hot steps use it
_new = tuple.__new__

# The legal moves and what each does. FAILED is reachable from every non-terminal status
# (cancel, final failure); an active job whose attempt ends early goes back to SUBMITTED_TO_RESCALE.
EFFECTS: dict[tuple[JobStatus, JobStatus], Effect] = {
    (S.SUBMITTED_TO_RESCALE, S.SUBMITTED_TO_PROVIDER): Effect.ADMIT,
    (S.SUBMITTED_TO_RESCALE, S.FAILED): Effect.FAIL,
    (S.SUBMITTED_TO_PROVIDER, S.RUNNABLE): Effect.CLAIM,
    (S.SUBMITTED_TO_PROVIDER, S.FAILED): Effect.FAIL,
    (S.RUNNABLE, S.STARTING): Effect.SET_UP,
    (S.RUNNABLE, S.RUNNING): Effect.START,  # nothing to set up: a function call on a warm worker
    (S.RUNNABLE, S.FAILED): Effect.FAIL,
    (S.RUNNABLE, S.SUBMITTED_TO_RESCALE): Effect.REQUEUE,
    (S.STARTING, S.RUNNING): Effect.START,
    (S.STARTING, S.FAILED): Effect.FAIL,
    (S.STARTING, S.SUBMITTED_TO_RESCALE): Effect.REQUEUE,
    (S.RUNNING, S.SUCCEEDED): Effect.SUCCEED,
    (S.RUNNING, S.FAILED): Effect.FAIL,
    (S.RUNNING, S.SUBMITTED_TO_RESCALE): Effect.REQUEUE,
}
TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    src: frozenset(dst for (s, dst) in EFFECTS if s == src) for src in S
}
_LEGAL = frozenset((int(a), int(b)) for a, b in EFFECTS)
# the hot steps' forms of the table: the moves out of each status, and each status's plain code
_ALLOWED = tuple(frozenset(int(dst) for dst in TRANSITIONS[src]) for src in S)
_CODE = {s: int(s) for s in S}


def can_transition(src: JobStatus | int, dst: JobStatus | int) -> bool:
    return (int(src), int(dst)) in _LEGAL


def check_transition(job_key: object, src: JobStatus | int, dst: JobStatus | int) -> None:
    if (int(src), int(dst)) not in _LEGAL:
        raise InvalidTransition(f"job {job_key}: {S(src).name} -> {S(dst).name} is not allowed")


# -- submission and admission -------------------------------------------------------------------


def submitted(admit: bool) -> tuple[JobStatus, ...]:
    """The statuses a new job passes through at submission; the last is the one it is stored in.

    A job of a project with no vCPU limit is admitted at once (both events are recorded);
    any other job is held in SUBMITTED_TO_RESCALE until an admission round lets it through.
    """
    return (S.SUBMITTED_TO_RESCALE, S.SUBMITTED_TO_PROVIDER) if admit else (S.SUBMITTED_TO_RESCALE,)


def admit(rec: JobRecord, at: float) -> Step:
    """Admit a held job (vCPU limits allow it). A job no longer held is left alone."""
    if rec.status != S.SUBMITTED_TO_RESCALE:
        return Step(rec)
    check_transition(rec.id, rec.status, S.SUBMITTED_TO_PROVIDER)
    return Step(rec._replace(status=_P), (Event(rec.id, rec.attempt, _P, at),))


def claim(
    records: Iterable[JobRecord], executor_id: str, lease_expires_at: float, at: float
) -> tuple[list[tuple[Any, ...]], list[EventRow]]:
    """Match queued jobs to an executor: it holds each until the lease expires. Returns the new
    records, in order, as plain rows in JobRecord's field order (``JobRecord._make`` names one;
    see :class:`Event` for why), and their events (one claim is many jobs: one call for all)."""
    new: list[tuple[Any, ...]] = []
    events: list[EventRow] = []
    for rec in records:
        (id_, status, attempt, failed, infra, max_retries, _, _, started, completed, exit_code, code,
         reason, cancelled) = rec  # fmt: skip
        if status != _P:
            check_transition(id_, status, S.RUNNABLE)
        new.append((
            id_, _RN, attempt, failed, infra, max_retries, executor_id, lease_expires_at, started, completed,
            exit_code, code, reason, cancelled,
        ))  # fmt: skip
        events.append((id_, attempt, _RN, at, None, None, executor_id, False))
    return new, events


# -- an executor's reports ----------------------------------------------------------------------


def report(
    rec: JobRecord,
    reports: Sequence[AttemptReport],
    executor_id: str | None = None,
    max_infra_retries: int = 0,
) -> Step:
    """Fold an executor's reports on one job, in the order it sent them, into one step.

    Fencing: a report from an executor that does not hold the job, for another attempt, for a
    job already terminal, or for a status the attempt has reached already (a duplicate, or one
    that arrives late), changes nothing. A FAILED report ends the attempt (:func:`fail_attempt`).
    """
    (id_, current, attempt, failed, infra, max_retries, executor, lease, started, completed, exit_code, code,
     reason, cancelled) = rec  # fmt: skip
    if (executor_id is not None and executor != executor_id) or current >= _FIRST_TERMINAL:
        return Step(rec)
    events: tuple[EventRow, ...] = ()
    for r in reports:
        _, r_attempt, r_status, at, r_exit_code, r_code, r_reason = r
        status = _CODE[r_status]
        if r_attempt != attempt or status <= current:
            continue
        if status == _F:  # the attempt ends here: what follows it is for a finished attempt
            so_far = _new(JobRecord, (
                id_, current, attempt, failed, infra, max_retries, executor, lease, started, completed,
                exit_code, code, reason, cancelled,
            ))  # fmt: skip
            failure = r_code or FailureCode.ErrorUnknownFailure.value
            step = fail_attempt(so_far, at, failure, r_reason or "", r_exit_code, max_infra_retries)
            return Step(step.record, (*events, *step.events), step.requeued)
        if status not in _ALLOWED[current]:
            check_transition(id_, current, status)
        events += ((id_, attempt, status, at, r_reason, r_exit_code, executor, False),)
        current = status
        if status == _RU:
            started = at
        elif status == _OK:
            exit_code, code, reason, completed, lease = r_exit_code, None, r_reason, at, None
            break  # terminal: nothing after it applies
    if not events:
        return Step(rec)
    new = _new(JobRecord, (
        id_, current, attempt, failed, infra, max_retries, executor, lease, started, completed, exit_code,
        code, reason, cancelled,
    ))  # fmt: skip
    return _new(Step, (new, events, False))


def fail_attempt(
    rec: JobRecord,
    at: float,
    failure_code: str,
    reason: str,
    exit_code: int | None = None,
    max_infra_retries: int = 0,
) -> Step:
    """End the current attempt as failed, and decide what follows.

    The job's own failure (non-zero exit, timeout, OOM, start failure) is retried while
    ``max_retries`` allows. An infrastructure fault (``ErrorInfrastructureFault``) spends no
    retry: the job is re-run while ``max_infra_retries`` allows (see :func:`lose_executor`).
    A job that runs again records the attempt's FAILED event but moves straight on to
    SUBMITTED_TO_RESCALE, so its status never shows FAILED while it still has attempts left.
    """
    check_transition(rec.id, rec.status, S.FAILED)
    failed = Event(rec.id, rec.attempt, _F, at, reason, exit_code, rec.executor_id)
    rec = rec._replace(
        exit_code=exit_code, failure_code=failure_code, status_reason=reason, lease_expires_at=None
    )
    if failure_code == INFRASTRUCTURE_FAULT:
        if recovery.rerun_allowed(rec.infra_retries, max_infra_retries):
            why = recovery.rerun_reason(reason, rec.infra_retries + 1, max_infra_retries)
            step = _requeue(rec._replace(infra_retries=rec.infra_retries + 1), at, why)
            return Step(step.record, (failed, *step.events), True)
        spent = recovery.spent_reason(reason, max_infra_retries)
        return Step(rec._replace(status=_F, status_reason=spent, completed_at=at), (failed,))
    if rec.failed_attempts < rec.max_retries:
        why = f"Retrying after attempt {rec.attempt} failed ({failure_code})"
        step = _requeue(rec._replace(failed_attempts=rec.failed_attempts + 1), at, why)
        return Step(step.record, (failed, *step.events), True)
    new = rec._replace(status=_F, failed_attempts=rec.failed_attempts + 1, completed_at=at)
    return Step(new, (failed,))


# -- cancel and executor loss -------------------------------------------------------------------

CANCEL_REASON = "Job cancelled by user"


def cancel(rec: JobRecord, at: float, reason: str = CANCEL_REASON) -> Step:
    """The user cancelled the job: it fails with userCancelledEvent set. No retry follows."""
    if rec.status >= _FIRST_TERMINAL:
        return Step(rec)
    event = Event(rec.id, rec.attempt, _F, at, reason, None, rec.executor_id, True)
    new = rec._replace(
        status=_F, cancelled=True, status_reason=reason, completed_at=at, lease_expires_at=None
    )
    return Step(new, (event,))


def lose_executor(
    rec: JobRecord, at: float, cause: str, may_have_started: bool | None, max_infra_retries: int
) -> Step:
    """The executor holding this active job is gone (it restarted, or its lease expired): apply
    the crash rule of ``domain/recovery.py``. ``may_have_started`` is the executor's word on the
    current attempt, None when it could not be asked. An attempt that cannot have started is
    re-queued free; one that may have is an infrastructure fault (re-run on the budget)."""
    outcome = recovery.recover(rec.status, may_have_started)
    why = recovery.reason(cause, outcome)
    if outcome is recovery.Recovery.REQUEUE:
        return _requeue(rec, at, why)
    return fail_attempt(rec, at, INFRASTRUCTURE_FAULT, why, None, max_infra_retries)


def adopt(rec: JobRecord, executor_id: str, attempt: int, lease_expires_at: float) -> JobRecord | None:
    """An executor restarted and found this attempt still in its runtime's hands (a job
    launcher outlived the crash, running it or holding its exit code). It is not lost: it stays
    the executor's, in its status, with its lease renewed (no event; its end is reported as
    usual). None when the attempt is no longer the job's current one held by that executor: it
    is not adopted (the executor's next heartbeat tells it to stop the process)."""
    if not still_holds(executor_id, attempt, rec):
        return None
    return rec._replace(lease_expires_at=lease_expires_at)


def lease_until(now: float, lease_seconds: float) -> float:
    """When a lease taken or renewed at ``now`` expires."""
    return now + lease_seconds


def still_holds(executor_id: str, attempt: int, rec: JobRecord | None) -> bool:
    """Whether an executor's attempt is still the job's current one and may run on; when not
    (cancelled, recovered, re-queued, finished) the executor must stop it."""
    return (
        rec is not None
        and rec.attempt == attempt
        and rec.executor_id == executor_id
        and rec.status in _ACTIVE
    )


# -- counters -----------------------------------------------------------------------------------


def counter_deltas(before: int, after: int, jobs: int, vcpus: int) -> tuple[tuple[int, int, int], ...]:
    """(status, count, vCPUs) deltas of the per-status counters for ``jobs`` jobs of ``vcpus``
    vCPUs in all that moved from ``before`` to ``after``."""
    if before == after:
        return ()
    return ((before, -jobs, -vcpus), (after, jobs, vcpus))


# -- internals ----------------------------------------------------------------------------------


def _requeue(rec: JobRecord, at: float, reason: str) -> Step:
    """Send an active job back to SUBMITTED_TO_RESCALE as a new attempt (the budget it spends,
    if any, is already counted in ``rec``)."""
    check_transition(rec.id, rec.status, S.SUBMITTED_TO_RESCALE)
    new = rec._replace(
        status=_A,
        attempt=rec.attempt + 1,
        executor_id=None,
        lease_expires_at=None,
        started_at=None,
        status_reason=reason,
    )
    return Step(new, (Event(rec.id, new.attempt, _A, at, reason),), True)
