"""Read models for the dashboard's overview and ``/htc/metrics``: job counts per project and the
executors.

Read from the job counters the task summaries use too (O(projects x statuses), never a scan of
the jobs).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, select

from openhtc.domain.enums import LIMITED_STATUSES, JobStatus
from openhtc.domain.scheduling import effective_limit
from openhtc.services.service_set import ServiceSet
from openhtc.store.tables import executors, job_counters, projects

_LIMITED = {int(s) for s in LIMITED_STATUSES}


@dataclass
class ProjectUsage:
    """One project's jobs by status name, and the vCPUs its admitted jobs hold against its limit."""

    counts: dict[str, int] = field(default_factory=dict)
    vcpus_in_use: int = 0
    vcpu_limit: int | None = None


@dataclass(frozen=True)
class JobCount:
    """The jobs of one project in one status, and the vCPUs they request."""

    project_id: str
    project_name: str
    status: JobStatus
    count: int
    vcpus: int


def job_counts(svc: ServiceSet, workspace_id: str) -> list[JobCount]:
    """Every (project, status) of the workspace that has jobs."""
    stmt = (
        select(
            job_counters.c.project_id,
            projects.c.name,
            job_counters.c.status,
            func.sum(job_counters.c.count),
            func.sum(job_counters.c.vcpus),
        )
        .select_from(job_counters.join(projects, projects.c.id == job_counters.c.project_id))
        .where(projects.c.workspace_id == workspace_id)
        .group_by(job_counters.c.project_id, projects.c.name, job_counters.c.status)
    )
    with svc.db.read() as conn:
        rows = list(conn.execute(stmt))
    return [JobCount(p, name, JobStatus(s), int(n or 0), int(v or 0)) for p, name, s, n, v in rows]


def workspace_usage(svc: ServiceSet, workspace_id: str) -> dict[str, ProjectUsage]:
    """Every project of the workspace that has jobs, by project id."""
    out: dict[str, ProjectUsage] = {}
    for row in job_counts(svc, workspace_id):
        usage = out.setdefault(row.project_id, ProjectUsage())
        usage.counts[row.status.name] = row.count
        if row.status in _LIMITED:
            usage.vcpus_in_use += row.vcpus
    return out


def project_limit(svc: ServiceSet, project_id: str) -> int | None:
    """The tightest vCPU limit set on the project (None: unlimited)."""
    return effective_limit(row.vcpus for row in svc.projects.limits(project_id))


@dataclass(frozen=True)
class ExecutorView:
    id: str
    region: str
    architectures: list[str]
    vcpus: int
    memory_mb: int
    last_heartbeat: float
    online: bool


def executor_views(svc: ServiceSet) -> list[ExecutorView]:
    """The executors that registered, online while their heartbeat is within the lease."""
    now = svc.clock.now()
    with svc.db.read() as conn:
        rows: list[Any] = list(conn.execute(select(executors).order_by(executors.c.id)))
    return [
        ExecutorView(
            r.id,
            r.region,
            list(r.architectures or []),
            int(r.vcpus),
            int(r.memory_mb),
            float(r.last_heartbeat),
            now - r.last_heartbeat <= svc.settings.lease_seconds,
        )
        for r in rows
    ]
