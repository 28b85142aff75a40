"""Why is my job pending? A pure explainer: plain values in, reasons out (no I/O).

The facts (the job's requirements, the vCPU limits and what its project and workspace hold, the
live executors' offers, its place in the queue) are gathered by services/explain.py; the rules
here mirror the scheduler's own (scheduler/policy.py's ``admit`` and ``dispatch``,
domain/capacity.py's fit).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from openhtc.domain.capacity import ExecutorOffer, offers_for, why_not_fit
from openhtc.domain.enums import JobStatus

S = JobStatus


@dataclass(frozen=True)
class Facts:
    status: JobStatus
    region: str
    architecture: str
    vcpus: int
    memory_mb: int
    priority: int
    materialized: bool  # False: its row is not written yet (store/materialize.py)
    project_vcpus: int  # vCPUs the project's admitted jobs hold
    project_limit: int | None
    workspace_vcpus: int
    workspace_limit: int | None
    offers: Sequence[ExecutorOffer]  # the live executors
    ahead: int = 0  # jobs of its project before it in its queue (counted up to ``cap``)
    ahead_higher_priority: int = 0  # of those, the ones with a higher priority
    cap: int = 10_000


@dataclass(frozen=True)
class Reason:
    code: str  # stable, for scripts: see docs/extensions.md
    message: str


def explain(facts: Facts) -> list[Reason]:
    """What holds a queued job, most fundamental first; one NOT_PENDING reason otherwise."""
    f = facts
    if f.status not in (S.SUBMITTED_TO_RESCALE, S.SUBMITTED_TO_PROVIDER):
        return [_not_pending(f.status)]
    reasons: list[Reason] = []
    reasons.extend(_executors(f))
    if f.status == S.SUBMITTED_TO_RESCALE:
        reasons.extend(_limits(f))
    if not f.materialized:
        reasons.append(
            Reason(
                "MATERIALIZATION",
                "its job row is not written yet: a large submission is written as the queue runs "
                "short, so it waits behind its project's queued jobs that are",
            )
        )
    if f.ahead:
        count = _count(f.ahead, f.cap)
        higher = _count(f.ahead_higher_priority, f.cap)
        queue = "the queue for its vCPU limit" if f.status == S.SUBMITTED_TO_RESCALE else "the queue"
        reasons.append(
            Reason(
                "QUEUE_POSITION",
                f"{count} job{'s' if f.ahead != 1 else ''} of its project {'are' if f.ahead != 1 else 'is'} "
                f"ahead of it in {queue}, {higher} of them with a higher priority",
            )
        )
    if not reasons:
        if f.status == S.SUBMITTED_TO_RESCALE:
            message = "it is first in its project's queue: the scheduler admits it at its next pass"
        else:
            message = (
                f"it is next in its project's queue: it starts when an executor in {f.region} has "
                f"{f.vcpus} vCPUs and {f.memory_mb} MiB free (jobs of other projects share the "
                "executors fairly)"
            )
        reasons.append(Reason("WAITING_FOR_CAPACITY", message))
    return reasons


def _not_pending(status: JobStatus) -> Reason:
    if status.terminal:
        return Reason("NOT_PENDING", f"the job has ended ({status.name})")
    return Reason("NOT_PENDING", f"the job is not queued: an executor holds it ({status.name})")


def _executors(f: Facts) -> list[Reason]:
    in_region = [o for o in f.offers if o.region == f.region]
    if not in_region:
        return [Reason("NO_EXECUTOR_IN_REGION", f"no executor is online in its region {f.region}")]
    candidates = offers_for(f.offers, f.region, f.architecture)
    if not candidates:
        served = sorted({a for o in in_region for a in o.architectures})
        return [
            Reason(
                "NO_EXECUTOR_FOR_ARCHITECTURE",
                f"no executor online in {f.region} runs {f.architecture} jobs (they run {', '.join(served)})",
            )
        ]
    misfit = why_not_fit(candidates, f.region, f.vcpus, f.memory_mb)
    if misfit is not None:
        return [Reason("NO_EXECUTOR_LARGE_ENOUGH", f"{misfit[0]} {misfit[1]}")]
    return []


def _limits(f: Facts) -> list[Reason]:
    out = []
    if f.project_limit is not None and f.project_vcpus + f.vcpus > f.project_limit:
        out.append(
            Reason(
                "PROJECT_VCPU_LIMIT",
                f"its project's vCPU limit: admitted jobs hold {f.project_vcpus} of {f.project_limit} "
                f"vCPUs and it needs {f.vcpus}",
            )
        )
    if f.workspace_limit is not None and f.workspace_vcpus + f.vcpus > f.workspace_limit:
        out.append(
            Reason(
                "WORKSPACE_VCPU_LIMIT",
                f"the workspace's vCPU limit: admitted jobs hold {f.workspace_vcpus} of "
                f"{f.workspace_limit} vCPUs and it needs {f.vcpus}",
            )
        )
    return out


def _count(n: int, cap: int) -> str:
    return f"more than {cap}" if n > cap else str(n)
