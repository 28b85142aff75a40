"""Gathers the facts the pure explainer (domain/pending.py) needs for one job."""

from __future__ import annotations

from typing import Any

from openhtc.domain.enums import JobStatus
from openhtc.domain.pending import Facts, Reason, explain
from openhtc.services.executors import live_offers
from openhtc.services.service_set import ServiceSet
from openhtc.store.materialize import PendingJob

CAP = 10_000  # jobs ahead are counted up to this many


def explain_job(svc: ServiceSet, job: Any) -> list[Reason]:
    """``job``: a row of jobs, or a PendingJob (its row is not written yet)."""
    status = JobStatus(job.status)
    if status not in (JobStatus.SUBMITTED_TO_RESCALE, JobStatus.SUBMITTED_TO_PROVIDER):
        return explain(Facts(status, job.region, job.architecture, job.vcpus, job.memory_mb, job.priority,
                             True, 0, None, 0, None, ()))  # fmt: skip
    project_vcpus, project_limit, workspace_vcpus, workspace_limit = svc.queue.limits_of(job.project_id)
    # A job without a row waits behind every queued row of its project.
    materialized = not isinstance(job, PendingJob)
    ahead, higher = svc.queue.queue_ahead(
        job.project_id, status, job.priority if materialized else 1 << 15, job.id, CAP
    )
    if not materialized:
        higher = svc.queue.queue_ahead(job.project_id, status, job.priority, job.id, CAP)[1]
    facts = Facts(
        status=status,
        region=job.region,
        architecture=job.architecture,
        vcpus=job.vcpus,
        memory_mb=job.memory_mb,
        priority=job.priority,
        materialized=materialized,
        project_vcpus=project_vcpus,
        project_limit=project_limit,
        workspace_vcpus=workspace_vcpus,
        workspace_limit=workspace_limit,
        offers=live_offers(svc),
        ahead=ahead,
        ahead_higher_priority=higher,
        cap=CAP,
    )
    return explain(facts)
