"""Projects: CRUD, regions, dimensions, vCPU limits and task retention policy."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import APIRouter, Body, Depends, Path, Request

from openhtc.api import serializers as ser
from openhtc.api.deps import principal, project_for, services
from openhtc.api.pagination import ID_MAX, decode_cursor, first, page, page_size
from openhtc.api.responses import JSONResponse
from openhtc.api.validation import int_field, require_object, retention_body, str_field
from openhtc.auth.permissions import require_role, require_user
from openhtc.auth.tokens import Principal
from openhtc.domain.enums import RESCALE_REGIONS, Priority, Role
from openhtc.domain.errors import NotFound, ValidationFailed
from openhtc.domain.limits import check_description, check_name
from openhtc.services.service_set import ServiceSet
from openhtc.services.wakeups import Wakeups

router = APIRouter()
# The spec's AutoscalingProfile.
MAX_DIMENSIONS = 1000  # compute environments of one project: far more than regions x priorities
SCALING_POLICIES = ("PROFILE_UNSPECIFIED", "OPTIMIZE_UTILIZATION", "BALANCED", "UNRECOGNIZED")


def _regions(svc: ServiceSet, who: Principal, value: Any, field: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(r, str) for r in value):
        raise ValidationFailed("must be an array of region names", field=field)
    enabled = {r.name for r in svc.accounts.regions(who.workspace_id) if r.enabled}
    for region in value:
        if region not in RESCALE_REGIONS:
            raise ValidationFailed(f"unknown region '{region}'", field=field)
        if region not in enabled:
            raise ValidationFailed(
                f"region {region} is not enabled in this workspace (enabled: {', '.join(sorted(enabled))})",
                field=field,
            )
    return list(dict.fromkeys(value))


def _region_settings(value: Any) -> list[dict[str, Any]] | None:
    """HTCRegionSettings, as the spec has them: only their known fields, with Rescale regions."""
    if value is None:
        return None
    if not isinstance(value, list) or len(value) > len(RESCALE_REGIONS):
        raise ValidationFailed(
            f"must be an array of at most {len(RESCALE_REGIONS)} HTCRegionSettings", field="regionSettings"
        )
    out = []
    for i, entry in enumerate(value):
        where = f"regionSettings[{i}]"
        if not isinstance(entry, dict):
            raise ValidationFailed("must be an HTCRegionSettings object", field=where)
        clean: dict[str, Any] = {}
        for part, key in (("computeSettings", "computeRegion"), ("storageSettings", "storageRegion")):
            settings = entry.get(part)
            if not isinstance(settings, dict):
                raise ValidationFailed("is required, as an object", field=f"{where}.{part}")
            region = settings.get(key)
            if region is not None and (not isinstance(region, str) or region not in RESCALE_REGIONS):
                raise ValidationFailed("must be a Rescale region name", field=f"{where}.{part}.{key}")
            clean[part] = {key: region} if region is not None else {}
        out.append(clean)
    return out


def bodies(svc: ServiceSet, rows: Sequence[Any]) -> list[dict[str, Any]]:
    """The projects' wire bodies; the repositories of all of them in one query."""
    registry = svc.registry
    if registry is None:
        return [ser.project(r) for r in rows]
    names = registry.repository_names([r.id for r in rows])
    return [ser.project(r, registry.container_registry(r.id), names[r.id]) for r in rows]


@router.get("/htc/projects")
def list_projects(
    request: Request, who: Principal = Depends(principal), svc: ServiceSet = Depends(services)
) -> JSONResponse:
    size = page_size(request)
    cursor = decode_cursor(request, "pair")
    only_mine = (first(request, "onlyMyProjects") or "").lower() == "true"
    rows = svc.projects.list_projects(
        who.workspace_id, tuple(cursor) if cursor else None, size + 1, who.user_id if only_mine else None
    )
    if who.is_job:
        rows = [r for r in rows if r.id == who.project_id]
    body = page(request, rows, size, lambda r: [r.created_at, r.id])
    body["items"] = bodies(svc, body["items"])
    return JSONResponse(body)


@router.post("/htc/projects")
def create_project(
    body: Any = Body(None), who: Principal = Depends(principal), svc: ServiceSet = Depends(services)
) -> JSONResponse:
    require_role(who, Role.PROJECT_ADMIN, "creating a project")
    obj = require_object(body)
    name = str_field(obj, "projectName")
    description = str_field(obj, "projectDescription", required=False) or ""
    regions = _regions(svc, who, obj["regions"], "regions") if obj.get("regions") else []
    if not regions and isinstance(obj.get("region"), str):
        regions = _regions(svc, who, [obj["region"]], "region")
    if not regions:
        regions = [svc.settings.region]
    assert name is not None
    if not name.strip():
        raise ValidationFailed("must not be empty", field="projectName")
    check_name(name, "projectName", svc.limits)
    check_description(description, "projectDescription", svc.limits)
    row = svc.projects.create(
        who.workspace_id,
        name,
        description,
        regions,
        _region_settings(obj.get("regionSettings")),
        who.user_id,
        svc.clock.now(),
    )
    return JSONResponse(bodies(svc, [row])[0])


@router.get("/htc/projects/{project_id}")
def get_project(
    project_id: str, who: Principal = Depends(principal), svc: ServiceSet = Depends(services)
) -> JSONResponse:
    return JSONResponse(bodies(svc, [project_for(svc, who, project_id)])[0])


@router.patch("/htc/projects/{project_id}")
def patch_project(
    project_id: str,
    body: Any = Body(None),
    who: Principal = Depends(principal),
    svc: ServiceSet = Depends(services),
) -> JSONResponse:
    project = project_for(svc, who, project_id)
    require_role(who, Role.PROJECT_ADMIN, "changing a project")
    obj = require_object(body)
    if "regions" in obj:
        added = _regions(svc, who, obj["regions"], "regions")
        svc.projects.update(project_id, regions=list(dict.fromkeys([*project.regions, *added])))
    return JSONResponse(bodies(svc, [project_for(svc, who, project_id)])[0])


# -- dimensions ---------------------------------------------------------------------------------


@router.get("/htc/projects/{project_id}/dimensions")
def get_dimensions(
    project_id: str, who: Principal = Depends(principal), svc: ServiceSet = Depends(services)
) -> JSONResponse:
    return JSONResponse(project_for(svc, who, project_id).dimensions or [])


@router.put("/htc/projects/{project_id}/dimensions")
def put_dimensions(
    project_id: str,
    body: Any = Body(None),
    who: Principal = Depends(principal),
    svc: ServiceSet = Depends(services),
) -> JSONResponse:
    project = project_for(svc, who, project_id)
    require_role(who, Role.PROJECT_ADMIN, "changing project dimensions")
    if not isinstance(body, list):
        raise ValidationFailed("the body must be a JSON array of HTCComputeEnvironment", field="body")
    if len(body) > MAX_DIMENSIONS:
        raise ValidationFailed(f"holds {len(body)} entries; at most {MAX_DIMENSIONS} are kept", field="body")
    dims = []
    for i, item in enumerate(body):
        entry = require_object(item)
        clean: dict[str, Any] = {}
        region = str_field(entry, "region", required=False, choices=RESCALE_REGIONS)
        if region is not None:
            if region not in project.regions:
                raise ValidationFailed(
                    f"region {region} is not one of the project's regions", field=f"[{i}].region"
                )
            clean["region"] = region
        priority = str_field(entry, "priority", required=False, choices=tuple(Priority.__members__))
        if priority is not None:
            clean["priority"] = priority
        policy = str_field(entry, "computeScalingPolicy", required=False, choices=SCALING_POLICIES)
        if policy is not None:
            clean["computeScalingPolicy"] = policy
        for key, kind in (("machineType", str), ("hyperthreading", bool)):
            if entry.get(key) is not None:
                if not isinstance(entry[key], kind):
                    raise ValidationFailed(f"must be a {kind.__name__}", field=f"[{i}].{key}")
                clean[key] = entry[key]
        if "machineType" in clean:
            check_name(clean["machineType"], f"[{i}].machineType", svc.limits)
        dims.append(clean)
    svc.projects.update(project_id, dimensions=dims)
    return JSONResponse(dims, status_code=201)


# -- limits -------------------------------------------------------------------------------------


def _limit_role_check(who: Principal, role: str) -> None:
    minimum = Role.WORKSPACE_ADMIN if role == "WORKSPACE_ADMIN" else Role.PROJECT_ADMIN
    require_role(who, minimum, f"changing a {role} limit")


def _released(wakeups: Wakeups) -> None:
    wakeups.schedule_round.set()  # a looser limit may admit held jobs


@router.get("/htc/projects/{project_id}/limits")
def get_limits(
    project_id: str, who: Principal = Depends(principal), svc: ServiceSet = Depends(services)
) -> JSONResponse:
    project_for(svc, who, project_id)
    return JSONResponse([ser.limit(r) for r in svc.projects.limits(project_id)])


@router.post("/htc/projects/{project_id}/limits")
def post_limit(
    project_id: str,
    body: Any = Body(None),
    who: Principal = Depends(principal),
    svc: ServiceSet = Depends(services),
) -> JSONResponse:
    project = project_for(svc, who, project_id)
    obj = require_object(body)
    vcpus = int_field(obj, "vCPUs", 0, 999999)
    role = str_field(obj, "modifierRole", choices=("WORKSPACE_ADMIN", "PROJECT_ADMIN"))
    assert vcpus is not None and role is not None
    _limit_role_check(who, role)
    row = svc.projects.set_limit(project, vcpus, role, who.user_id, svc.clock.now())
    _released(svc.wakeups)
    return JSONResponse(ser.limit(row), status_code=201)


@router.delete("/htc/projects/{project_id}/limits", status_code=204)
def delete_limits(
    project_id: str, who: Principal = Depends(principal), svc: ServiceSet = Depends(services)
) -> None:
    project_for(svc, who, project_id)
    for row in svc.projects.limits(project_id):
        _limit_role_check(who, row.modifier_role)
    svc.projects.delete_limits(project_id)
    _released(svc.wakeups)


def _limit(svc: ServiceSet, who: Principal, project_id: str, limit_id: int) -> Any:
    project_for(svc, who, project_id)
    row = svc.projects.limit(project_id, limit_id)
    if row is None:
        raise NotFound(f"limit {limit_id} not found in project {project_id}")
    return row


@router.get("/htc/projects/{project_id}/limits/{limit_id}")
def get_limit(
    project_id: str,
    limit_id: int = Path(ge=0, le=ID_MAX),
    who: Principal = Depends(principal),
    svc: ServiceSet = Depends(services),
) -> JSONResponse:
    return JSONResponse(ser.limit(_limit(svc, who, project_id, limit_id)))


@router.delete("/htc/projects/{project_id}/limits/{limit_id}", status_code=204)
def delete_limit(
    project_id: str,
    limit_id: int = Path(ge=0, le=ID_MAX),
    who: Principal = Depends(principal),
    svc: ServiceSet = Depends(services),
) -> None:
    row = _limit(svc, who, project_id, limit_id)
    _limit_role_check(who, row.modifier_role)
    svc.projects.delete_limits(project_id, limit_id)
    _released(svc.wakeups)


@router.patch("/htc/projects/{project_id}/limits/{limit_id}")
def patch_limit(
    project_id: str,
    limit_id: int = Path(ge=0, le=ID_MAX),
    body: Any = Body(None),
    who: Principal = Depends(principal),
    svc: ServiceSet = Depends(services),
) -> JSONResponse:
    row = _limit(svc, who, project_id, limit_id)
    _limit_role_check(who, row.modifier_role)
    vcpus = int_field(require_object(body), "vCPUs", 0, 999999)
    assert vcpus is not None
    updated = svc.projects.update_limit(limit_id, vcpus, who.user_id, svc.clock.now())
    _released(svc.wakeups)
    return JSONResponse(ser.limit(updated))


# -- retention ----------------------------------------------------------------------------------


@router.get("/htc/projects/{project_id}/task-retention-policy")
def get_retention(
    project_id: str, who: Principal = Depends(principal), svc: ServiceSet = Depends(services)
) -> JSONResponse:
    project = project_for(svc, who, project_id)
    if project.retention_created_at is None:
        raise NotFound("no project retention policy: the workspace policy applies")
    return JSONResponse(
        ser.retention(
            "projectId",
            project.id,
            project.retention_archive_after,
            project.retention_delete_after,
            project.retention_created_at,
        )
    )


@router.put("/htc/projects/{project_id}/task-retention-policy")
def put_retention(
    project_id: str,
    body: Any = Body(None),
    who: Principal = Depends(principal),
    svc: ServiceSet = Depends(services),
) -> JSONResponse:
    project_for(svc, who, project_id)
    require_role(who, Role.PROJECT_ADMIN, "setting a retention policy")
    archive_after, delete_after = retention_body(body)
    now = svc.clock.now()
    svc.projects.update(
        project_id,
        retention_archive_after=archive_after,
        retention_delete_after=delete_after,
        retention_created_at=now,
    )
    return JSONResponse(
        ser.retention("projectId", project_id, archive_after, delete_after, now), status_code=201
    )


@router.delete("/htc/projects/{project_id}/task-retention-policy", status_code=204)
def delete_retention(
    project_id: str, who: Principal = Depends(principal), svc: ServiceSet = Depends(services)
) -> None:
    project_for(svc, who, project_id)
    require_user(who, "delete a retention policy")
    require_role(who, Role.PROJECT_ADMIN, "deleting a retention policy")
    svc.projects.update(
        project_id, retention_archive_after=None, retention_delete_after=None, retention_created_at=None
    )
