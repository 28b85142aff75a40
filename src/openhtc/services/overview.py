"""Read models for the dashboard's overview and ``htc top``: job counts per project, the last
hour's throughput and queue waits, and the executors.

Read from the same counters the task summaries and /htc/metrics use (O(projects x statuses),
never a scan of the jobs), and from the last hour's rows every status write adds to
(domain/throughput.py): the same on every server, and kept across restarts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from openhtc.auth.tokens import Principal
from openhtc.domain.enums import LIMITED_STATUSES, JobStatus, Role
from openhtc.domain.scheduling import effective_limit
from openhtc.domain.throughput import Hour
from openhtc.services.service_set import ServiceSet

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
    rows = svc.projects.status_counts(workspace_id)
    return [JobCount(p, name, JobStatus(s), n, v) for p, name, s, n, v in rows]


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


def hour(svc: ServiceSet, project_ids: list[str]) -> Hour:
    """Completions and failures per minute over the last hour, and queue wait p50/p95."""
    return svc.queue.hour(svc.clock.now(), project_ids)


@dataclass(frozen=True)
class ExecutorView:
    id: str
    region: str
    architectures: list[str]
    vcpus: int
    memory_mb: int
    last_heartbeat: float
    online: bool
    version: str | None  # the openhtc version it runs, and its host name (None: not reported)
    host: str | None
    # Only for workspace admins (None otherwise): jobs it holds, and its current incarnation
    # (a new one each time the executor process starts).
    leases: int | None = None
    incarnation: str | None = None


def executor_views(svc: ServiceSet, admin: bool = False) -> list[ExecutorView]:
    """The executors that registered, online while their heartbeat is within the lease.

    Everyone sees where executors run and what they offer (what the dimensions route tells any
    user); admins also see the leases each holds, which count other workspaces' jobs too.
    """
    now = svc.clock.now()
    rows, held = svc.queue.executor_rows(with_leases=admin)
    return [
        ExecutorView(
            r.id,
            r.region,
            list(r.architectures or []),
            int(r.vcpus),
            int(r.memory_mb),
            float(r.last_heartbeat),
            now - r.last_heartbeat <= svc.settings.lease_seconds,
            r.version,
            r.host,
            held.get(r.id, 0) if admin else None,
            r.incarnation if admin else None,
        )
        for r in rows
    ]


@dataclass(frozen=True)
class ProjectView:
    id: str
    name: str
    counts: dict[str, int]
    vcpus_in_use: int
    vcpu_limit: int | None


@dataclass(frozen=True)
class Snapshot:
    """Everything the overview page and ``htc top`` show, for one user."""

    workspace_name: str
    vcpus_in_use: int
    workspace_limit: int | None
    projects: list[ProjectView]
    hour: Hour
    executors: list[ExecutorView]


def is_admin(who: Principal) -> bool:
    return not who.is_job and who.role == Role.WORKSPACE_ADMIN.value


def snapshot(svc: ServiceSet, who: Principal, max_projects: int = 50) -> Snapshot:
    """The workspace's first ``max_projects`` projects (the throughput sums all of them)."""
    listed = svc.projects.list_projects(who.workspace_id, None, max_projects)
    usage = workspace_usage(svc, who.workspace_id)
    workspace = svc.accounts.workspace(who.workspace_id)
    projects_ = [
        ProjectView(
            p.id,
            p.name,
            usage.get(p.id, ProjectUsage()).counts,
            usage.get(p.id, ProjectUsage()).vcpus_in_use,
            project_limit(svc, p.id),
        )
        for p in listed
    ]
    return Snapshot(
        workspace_name=workspace.name if workspace is not None else who.workspace_name,
        vcpus_in_use=sum(u.vcpus_in_use for u in usage.values()),
        workspace_limit=workspace.vcpu_limit if workspace is not None else None,
        projects=projects_,
        # usage holds every project of the workspace that has jobs
        hour=hour(svc, list(usage)),
        executors=executor_views(svc, admin=is_admin(who)),
    )
