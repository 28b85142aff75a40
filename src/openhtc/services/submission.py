"""Submitting job batches: the checks that need the project, then one bulk write."""

from __future__ import annotations

from typing import Any

from openhtc.auth.permissions import check_found, check_project_scope
from openhtc.auth.tokens import Principal
from openhtc.domain.capacity import ExecutorOffer, offers_for, region_architectures, why_not_fit
from openhtc.domain.enums import LifecycleStatus, Priority
from openhtc.domain.errors import Conflict, ImageUnavailable, ValidationFailed
from openhtc.domain.limits import check_name
from openhtc.domain.submission import SubmitRequest, parse_submit_requests
from openhtc.services.notify import task_key
from openhtc.services.service_set import ServiceSet
from openhtc.store.jobs import NewBatch, Submitted
from openhtc.store.queue import executor_offers_in


def submit_to(
    services: ServiceSet, principal: Principal, project_id: str, task_id: str, body: Any, group: str | None
) -> list[dict[str, Any]]:
    """The submit call: the project, the task, the executors' offers and the regions in one
    read transaction (as ``api.deps.task_for`` would check them), then ``submit``."""
    project, task, capacity = target(services, principal, project_id, task_id)
    return submit(services, principal, project, task, body, group, capacity)


def submit_one_to(
    services: ServiceSet, principal: Principal, project_id: str, task_id: str, body: Any, group: str | None
) -> tuple[dict[str, Any], int]:
    """``submit_to`` for a body of exactly one job (one request, ``batchSize`` 1, checked
    before anything is read or stored): its echo and its job row's id (what waiters key on)."""
    if not isinstance(body, list) or len(body) != 1:
        raise ValidationFailed("must be a JSON array of exactly one job request", field="body")
    if not isinstance(body[0], dict) or body[0].get("batchSize", 1) != 1:
        raise ValidationFailed("must be 1 (one job per request)", field="[0].batchSize")
    project, task, capacity = target(services, principal, project_id, task_id)
    stored = _store(services, principal, project, task, body, group, capacity)
    return stored.echoes[0], stored.first_ids[0]


def target(
    services: ServiceSet, principal: Principal, project_id: str, task_id: str
) -> tuple[Any, Any, tuple[list[ExecutorOffer], list[Any]]]:
    """What a submit checks before it writes: the project and the task (scoped and found, as
    ``api.deps.task_for`` checks them), the executors' offers and the workspace's regions. One
    connection, no transaction (no snapshot is needed across them; on PostgreSQL BEGIN and
    COMMIT are a round trip each); the write transaction relies on none of it staying true."""
    check_project_scope(principal, project_id)
    since = services.clock.now() - services.settings.lease_seconds
    project, task, offers, region_rows = services.projects.submit_target(
        principal.workspace_id, project_id, task_id, since
    )
    check_found(principal, project_id, task_id, project, task)
    return project, task, (offers, region_rows)


def _capacity(services: ServiceSet, conn: Any, workspace_id: str) -> tuple[list[ExecutorOffer], list[Any]]:
    """What the executors heard from within a lease offer, and the workspace's regions."""
    offers = executor_offers_in(conn, services.clock.now() - services.settings.lease_seconds)
    return offers, services.accounts.regions_in(conn, workspace_id)


def submit(
    services: ServiceSet,
    principal: Principal,
    project: Any,
    task: Any,
    body: Any,
    group: str | None,
    capacity: tuple[list[ExecutorOffer], list[Any]] | None = None,
) -> list[dict[str, Any]]:
    """Validate every request first, so a bad one stores nothing, then store all batches and wake
    the scheduler and the executors. ``capacity``: ``_capacity``'s answer, if the caller read it."""
    return _store(services, principal, project, task, body, group, capacity).echoes


def _store(
    services: ServiceSet,
    principal: Principal,
    project: Any,
    task: Any,
    body: Any,
    group: str | None,
    capacity: tuple[list[ExecutorOffer], list[Any]] | None,
) -> Submitted:
    if task.lifecycle_status == LifecycleStatus.DELETED.value:
        raise Conflict(f"task {task.id} is DELETED; jobs cannot be submitted to it")
    if group is not None:
        if not group.strip():
            raise ValidationFailed("must not be empty", field="group")
        check_name(group, "group", services.limits)
    requests = parse_submit_requests(body, services.limits)
    if capacity is None:
        with services.db.read() as conn:  # one transaction for both: they cost less than its begin
            capacity = _capacity(services, conn, project.workspace_id)
    offers, region_rows = capacity
    # what no registered executor (heard from within a lease) can run is refused
    region_archs = {
        r.name: region_architectures(r.architectures, offers, r.name) for r in region_rows if r.enabled
    }
    new = [_plan(req, i, project, region_archs, offers, group) for i, req in enumerate(requests)]
    if services.images_required:
        _check_images(services, project.id, {req.htcJobDefinition.imageName for req in requests})
    stored = services.jobs.submit_batches(task, new, principal.user_id, services.clock.now())
    # Held jobs (under a limit) and rows left to write are the scheduler's work; a round for
    # nothing would race the executor's claim for the write lock and the GIL.
    if not stored.settled:
        services.wakeups.schedule_round.set()
    services.wakeups.queued()  # admitted jobs: executors can claim them now
    services.notify.publish((task_key(task.id),))  # its status counts changed
    return stored


def _check_images(services: ServiceSet, project_id: str, images: set[str]) -> None:
    """Container runtimes pull each job's image from the project's namespace: refuse a missing
    one now (404 naming it) rather than fail every job of the batch at start."""
    if services.registry is None:
        raise ImageUnavailable("this server has no container registry, so no image can be run")
    for image in sorted(images):
        services.registry.require_image(project_id, image)


def _plan(
    req: SubmitRequest,
    i: int,
    project: Any,
    region_archs: dict[str, list[str]],
    offers: list[ExecutorOffer],
    group: str | None,
) -> NewBatch:
    definition = req.htcJobDefinition
    regions = req.requested_regions()
    project_regions = list(project.regions or [])
    for region in regions:
        if region not in project_regions:
            raise ValidationFailed(
                f"region {region} is not enabled for project {project.id}", field=f"[{i}].regions"
            )
    candidates = [r for r in (regions or project_regions) if r in region_archs]
    if not candidates:
        raise ValidationFailed("no enabled region of the project can run this job", field=f"[{i}].regions")
    offered = {arch for region in candidates for arch in region_archs[region]}
    architecture = definition.architecture.value if definition.architecture else None
    if architecture is None:
        architecture = region_archs[candidates[0]][0]
    elif architecture not in offered:
        raise ValidationFailed(
            f"{architecture} is not offered by the project's regions ({', '.join(sorted(offered))})",
            field=f"[{i}].htcJobDefinition.architecture",
        )
    region = next(r for r in candidates if architecture in region_archs[r])
    misfit = why_not_fit(
        offers_for(offers, region, architecture), region, definition.maxVCpus, definition.maxMemory
    )
    if misfit is not None:
        field, message = misfit
        raise ValidationFailed(message, field=f"[{i}].htcJobDefinition.{field}")
    priority = definition.priority if definition.priority is not None else Priority.ON_DEMAND_PRIORITY
    _check_dimensions(project.dimensions or [], region, priority.name, i)
    echo = req.model_dump(mode="json", exclude_none=True, exclude={"region", "regions"})
    echo["htcJobDefinition"]["architecture"] = architecture
    echo["htcJobDefinition"]["priority"] = priority.name
    echo["cloudProvider"] = region.split("_", 1)[0]
    if req.retryStrategy is None:
        echo["retryStrategy"] = {"maxRetries": 0}
    return NewBatch(
        request=echo,
        group=group,
        batch_size=req.batchSize,
        region=region,
        architecture=architecture,
        priority=int(priority),
        vcpus=definition.maxVCpus,
        memory_mb=definition.maxMemory,
        max_retries=req.retryStrategy.maxRetries if req.retryStrategy else 0,
    )


def _check_dimensions(dimensions: list[dict[str, Any]], region: str, priority: str, i: int) -> None:
    """A project with dimensions only runs jobs that match one of them (absent fields match all)."""
    if not dimensions:
        return
    for dim in dimensions:
        if dim.get("region", region) == region and dim.get("priority", priority) == priority:
            return
    allowed = ", ".join(
        f"{d.get('region', 'any region')}/{d.get('priority', 'any priority')}" for d in dimensions
    )
    raise ValidationFailed(
        f"the project's dimensions do not allow {region}/{priority} (allowed: {allowed})",
        field=f"[{i}].htcJobDefinition.priority",
    )
