"""The job state machine: one transition table, checked by every write."""

from __future__ import annotations

from openhtc.domain.enums import JobStatus
from openhtc.domain.errors import InvalidTransition

S = JobStatus

# Legal moves. FAILED is reachable from every non-terminal status (cancel, lease expiry,
# set-up failure); a failed attempt that will be retried goes back to SUBMITTED_TO_RESCALE.
TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    S.SUBMITTED_TO_RESCALE: frozenset({S.SUBMITTED_TO_PROVIDER, S.FAILED}),
    S.SUBMITTED_TO_PROVIDER: frozenset({S.RUNNABLE, S.FAILED}),
    S.RUNNABLE: frozenset({S.STARTING, S.FAILED, S.SUBMITTED_TO_RESCALE}),
    S.STARTING: frozenset({S.RUNNING, S.FAILED, S.SUBMITTED_TO_RESCALE}),
    S.RUNNING: frozenset({S.SUCCEEDED, S.FAILED, S.SUBMITTED_TO_RESCALE}),
    S.SUCCEEDED: frozenset(),
    S.FAILED: frozenset(),
}


def can_transition(src: JobStatus, dst: JobStatus) -> bool:
    return dst in TRANSITIONS[src]


def check_transition(job_key: object, src: JobStatus, dst: JobStatus) -> None:
    if not can_transition(src, dst):
        raise InvalidTransition(f"job {job_key}: {src.name} -> {dst.name} is not allowed")
