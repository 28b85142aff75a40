"""What happens to a job whose executor is gone: the recovery rule, as a pure function.

An executor writes a durable marker for an attempt before it hands the attempt to a runtime
(``executor/journal.py``). When it registers again after a crash it passes the attempts it had
marked and not yet seen end; when it stops answering (lease expiry) nobody knows. The rule:

* an attempt whose process cannot have started (never marked, job not RUNNING) goes back to
  the queue as a new attempt that does not count against ``maxRetries``;
* an attempt whose process may have started (marked, RUNNING, or unknown) fails with
  ``ErrorInfrastructureFault``. Losing the infrastructure is not the job's fault, so this spends
  no user retry (``maxRetries``): the job is re-run as a new attempt on a separate budget,
  ``max_infrastructure_retries`` (Dask calls a task bad after 3 worker deaths; HyperQueue after
  5 crashes), and fails with ``ErrorInfrastructureFault`` once that budget is spent. A budget of
  0 fails the job at its first infrastructure fault: at most once, for jobs that need it.

So an attempt runs at most once, and a job runs at most ``maxRetries + 1 + max_infrastructure_retries``
times in all (``maxRetries + 1`` if its infrastructure never failed under it).
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Iterator

from openhtc.domain.enums import ACTIVE_STATUSES, JobStatus


class EveryAttempt(Collection[tuple[int, int]]):
    """What an executor passes as the attempts it may have started when it cannot say: its
    journal may have lost records in a crash of the machine (``executor/journal.py``, lazy). Every
    attempt is in it; it cannot be listed, so it is never sent or stored by mistake as none."""

    def __contains__(self, key: object) -> bool:
        return True

    def __iter__(self) -> Iterator[tuple[int, int]]:
        raise TypeError("every attempt may have started: there is no list to iterate")

    def __len__(self) -> int:
        raise TypeError("every attempt may have started: there is no count")


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


def rerun_allowed(infra_retries: int, max_infra_retries: int) -> bool:
    """Whether a job whose attempt failed with an infrastructure fault runs again: it has been
    re-run ``infra_retries`` times for such faults already."""
    return infra_retries < max_infra_retries


def reason(cause: str, outcome: Recovery) -> str:
    """The status reason a recovered job shows (its attempt's FAILED event, for FAIL_ATTEMPT)."""
    if outcome is Recovery.REQUEUE:
        return f"Re-queued: {cause} before the job started"
    return f"Infrastructure fault: {cause} after the attempt may have started"


def rerun_reason(fault: str, infra_retries: int, max_infra_retries: int) -> str:
    """The reason of the new attempt after an infrastructure fault; ``infra_retries`` counts it."""
    spent = f"{infra_retries} of {max_infra_retries}"
    return f"Re-run {spent} after an infrastructure fault, no retry spent ({fault})"


def spent_reason(fault: str, max_infra_retries: int) -> str:
    """The reason a job shows when an infrastructure fault ends it."""
    if not max_infra_retries:
        return fault
    return f"{fault}; its {max_infra_retries} re-run(s) after infrastructure faults are spent"
