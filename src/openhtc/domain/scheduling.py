"""Pure scheduling decisions: no I/O, easy to test.

Two decisions are made here:

* admission: which held jobs (SUBMITTED_TO_RESCALE) may move to SUBMITTED_TO_PROVIDER without
  taking a project or the workspace over its vCPU limit;
* dispatch: which queued jobs (SUBMITTED_TO_PROVIDER) an executor should take for its free
  capacity: ON_DEMAND_PRIORITY before ON_DEMAND_ECONOMY, then the project with the fewest running
  vCPUs (fair share), first in first out inside a project, packed by vCPUs and memory.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from openhtc.domain.models import Capacity


@dataclass(frozen=True, slots=True)
class QueuedJob:
    job_id: int
    project_id: str
    priority: int
    vcpus: int
    memory_mb: int


def effective_limit(limits: Iterable[int | None]) -> int | None:
    """The tightest of several optional vCPU limits (None means unlimited)."""
    present = [limit for limit in limits if limit is not None]
    return min(present) if present else None


def admit(
    held: Sequence[QueuedJob],
    active_vcpus: Mapping[str, int],
    project_limits: Mapping[str, int | None],
    workspace_active_vcpus: int,
    workspace_limit: int | None,
) -> list[int]:
    """Held jobs, oldest first, that fit under their project and workspace limits."""
    used = dict(active_vcpus)
    workspace_used = workspace_active_vcpus
    admitted: list[int] = []
    blocked: set[str] = set()  # keep FIFO inside a project: once one waits, later ones wait too
    for job in held:
        if job.project_id in blocked:
            continue
        project_limit = project_limits.get(job.project_id)
        project_used = used.get(job.project_id, 0)
        over_project = project_limit is not None and project_used + job.vcpus > project_limit
        over_workspace = workspace_limit is not None and workspace_used + job.vcpus > workspace_limit
        if over_project or over_workspace:
            blocked.add(job.project_id)
            continue
        used[job.project_id] = project_used + job.vcpus
        workspace_used += job.vcpus
        admitted.append(job.job_id)
    return admitted


def dispatch(
    queues: Mapping[str, Sequence[QueuedJob]],
    running_vcpus: Mapping[str, int],
    free: Capacity,
    max_jobs: int,
) -> list[QueuedJob]:
    """Pick jobs for an executor's free capacity.

    ``queues`` maps each project to its queued jobs, already ordered by (priority, id): the
    lower priority code (ON_DEMAND_PRIORITY) first.
    A job that does not fit is skipped, which lets smaller jobs behind it fill the gap
    (packing); the project keeps its place in the fair-share order.
    """
    heads = {project: 0 for project, jobs in queues.items() if jobs}
    usage = {project: running_vcpus.get(project, 0) for project in heads}
    # Heap of (priority code of head job, vCPUs in use, head job id, project).
    heap: list[tuple[int, int, int, str]] = []

    def push(project: str) -> None:
        index = heads[project]
        jobs = queues[project]
        if index < len(jobs):
            job = jobs[index]
            heapq.heappush(heap, (job.priority, usage[project], job.job_id, project))

    for project in heads:
        push(project)
    chosen: list[QueuedJob] = []
    remaining = free
    while heap and len(chosen) < max_jobs and remaining.vcpus > 0:
        _, _, _, project = heapq.heappop(heap)
        job = queues[project][heads[project]]
        heads[project] += 1
        if remaining.fits(job.vcpus, job.memory_mb):
            chosen.append(job)
            remaining = remaining.minus(job.vcpus, job.memory_mb)
            usage[project] += job.vcpus
        push(project)
    return chosen
