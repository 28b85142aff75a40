"""What happens to a job whose executor is gone: the recovery rule, as a pure function.

An executor writes a durable marker for an attempt before it hands the attempt to a runtime
(``executor/journal.py``). When it registers again after a crash it passes the attempts it had
marked and not yet seen end; when it stops answering (lease expiry) nobody knows. The rule:

* an attempt whose process cannot have started (never marked, job not RUNNING) goes back to
  the queue as a new attempt that does not count against ``maxRetries``;
* an attempt whose process may have started (marked, RUNNING, or unknown) fails with
  ``ErrorInfrastructureFault`` and is retried only as the job's retry strategy allows.

So an attempt runs at most once, and a job runs at most ``maxRetries + 1`` times in all.
"""

from __future__ import annotations

import enum

from openhtc.domain.enums import ACTIVE_STATUSES, JobStatus


class Recovery(enum.Enum):
    REQUEUE = "requeue"  # never started: a free new attempt
    FAIL_ATTEMPT = "fail"  # may have started: the attempt fails, retried as maxRetries allows


def recover(status: JobStatus | int, may_have_started: bool | None) -> Recovery:
    """The fate of an active job whose executor was lost.

    ``may_have_started`` is the executor's word on the current attempt: True if it marked the
    attempt (handed it to a runtime) and never saw it end, False if it did not, None if the
    executor could not be asked (its lease expired).
    """
    status = JobStatus(status)
    if status not in ACTIVE_STATUSES:
        raise ValueError(f"only an active job is recovered, not a {status.name} one")
    if status == JobStatus.RUNNING or may_have_started is not False:
        return Recovery.FAIL_ATTEMPT
    return Recovery.REQUEUE


def reason(cause: str, outcome: Recovery) -> str:
    """The status reason a recovered job shows."""
    if outcome is Recovery.REQUEUE:
        return f"Re-queued: {cause} before the job started"
    return f"Infrastructure fault: {cause} after the attempt may have started"
