"""openhtc extension: why is my job pending? (docs/extensions.md)"""

from __future__ import annotations

from fastapi import APIRouter, Depends

from openhtc.api.deps import job_for, principal, services, task_for
from openhtc.api.responses import JSONResponse
from openhtc.auth.tokens import Principal
from openhtc.domain.enums import JobStatus
from openhtc.services.explain import explain_job
from openhtc.services.service_set import ServiceSet

router = APIRouter()


@router.get("/openhtc/v1/projects/{project_id}/tasks/{task_id}/jobs/{job_id}/explain")
def explain(
    project_id: str,
    task_id: str,
    job_id: str,
    who: Principal = Depends(principal),
    svc: ServiceSet = Depends(services),
) -> JSONResponse:
    task_for(svc, who, project_id, task_id)
    job, _ = job_for(svc, task_id, job_id)
    status = JobStatus(job.status)
    reasons = explain_job(svc, job)
    return JSONResponse(
        {
            "jobUUID": job_id,
            "status": status.name,
            "pending": status in (JobStatus.SUBMITTED_TO_RESCALE, JobStatus.SUBMITTED_TO_PROVIDER),
            "reasons": [{"code": r.code, "message": r.message} for r in reasons],
        }
    )
