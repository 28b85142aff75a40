"""Image status for the runtimes without a registry (process, noop).

Under these runtimes an image name is validated and recorded but never pulled, so every
well-formed name is READY. The container registry replaces this with a manifest lookup.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends

from openhtc.api.deps import principal, project_for, services
from openhtc.api.responses import JSONResponse
from openhtc.auth.tokens import Principal
from openhtc.domain.errors import ImageUnavailable
from openhtc.domain.submission import IMAGE_NAME_RE
from openhtc.services.container import Services

router = APIRouter()


@router.get("/htc/projects/{project_id}/container-registry/images/{image_name:path}")
def image_status(
    project_id: str, image_name: str, who: Principal = Depends(principal), svc: Services = Depends(services)
) -> JSONResponse:
    project_for(svc, who, project_id)
    if not IMAGE_NAME_RE.fullmatch(image_name):
        raise ImageUnavailable(
            f"Image {image_name} is unavailable. Please check the image name. If the image was pushed "
            "recently, try again at a later time"
        )
    return JSONResponse({"status": "READY"})
