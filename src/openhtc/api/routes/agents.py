"""The executor protocol over HTTP, for ``htc agent``: /openhtc/v1/agents/... (never a Rescale route).

These routes only decode and encode (wire models: executor/protocol.py); the work is the
agent service's (services/agents.py), over the same ExecutorService the embedded executor
calls in-process. Only agent tokens reach them (403 for any other credential), and agent tokens
reach nothing else. An exchange that finds no job for its agent may wait for one (long poll) in
its region's FIFO of waiters (services/agents.py): new work wakes the first, and each woken one
that claimed something wakes the next, so an admission wakes one claim's worth of waiters, not
every idle agent.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, TypeVar

from fastapi import APIRouter, Request
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool

from openhtc.api.deps import app_services
from openhtc.api.responses import JSONResponse
from openhtc.domain.errors import OpenHTCError, PermissionDenied, Unauthenticated, ValidationFailed
from openhtc.executor import protocol as wire
from openhtc.services.agents import AgentService, MustRegister
from openhtc.services.service_set import ServiceSet
from openhtc.store.queue import AgentInfo

router = APIRouter()
M = TypeVar("M", bound=BaseModel)


def _agent_claims(request: Request, svc: ServiceSet) -> dict[str, Any]:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if not token.strip():
        raise Unauthenticated("expected 'Authorization: Bearer <agent token>'")
    if scheme.lower() != "bearer":  # a user's API key, say
        raise PermissionDenied("only an agent token (htc admin create-agent-token) reaches the agent routes")
    return svc.tokens.verify_agent(token.strip())


async def _body(request: Request, model: type[M]) -> M:
    try:
        return model.model_validate_json(await request.body())
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise ValidationFailed(first.get("msg", "invalid"), where or None) from None


def _service(svc: ServiceSet) -> AgentService:
    agents: AgentService | None = svc.agents
    if agents is None:
        raise PermissionDenied("this server serves no agents")
    return agents


def _must_register(reason: str) -> JSONResponse:
    return JSONResponse(wire.ErrorBody(error=reason).model_dump(), status_code=409)


@router.post(wire.PREFIX + "/register")
async def register(request: Request) -> JSONResponse:
    svc = app_services(request)
    claims = _agent_claims(request, svc)
    req = await _body(request, wire.RegisterRequest)
    if claims.get("region", "*") not in ("*", req.region):
        raise PermissionDenied(f"this agent token is for region {claims.get('region')}, not {req.region}")
    agents = _service(svc)
    info = AgentInfo(
        req.agent_id,
        req.incarnation,
        req.region,
        req.architectures,
        req.capacity.capacity(),
        req.labels,
        req.version,
        req.host,
        req.runtime,
    )
    done = await run_in_threadpool(agents.register, info, req.running, req.may_have_started)
    settings = svc.settings
    registry = svc.registry
    answer = wire.RegisterResponse(
        agent_id=req.agent_id,
        liveness_seconds=settings.agent_liveness_seconds,
        lease_seconds=settings.lease_seconds,
        poll_seconds=settings.agent_poll_seconds,
        server_time=svc.clock.now(),
        registry=wire.RegistryInfo(host=registry.host)
        if registry is not None and registry.available
        else None,
        storage=wire.StorageInfo(kind="local" if settings.storage == "local" else "s3"),
        recovered=done.recovered,
        kill=done.kill,
    )
    return JSONResponse(wire.dump(answer))


@router.post(wire.PREFIX + "/{agent_id}/exchange")
async def exchange(agent_id: str, request: Request) -> JSONResponse:
    svc = app_services(request)
    claims = _agent_claims(request, svc)
    req = await _body(request, wire.ExchangeRequest)
    agents = _service(svc)
    reports = [(r.seq, wire.report_from_wire(r)) for r in req.reports]
    free = req.free.capacity()
    wait = min(req.wait_seconds, svc.settings.agent_poll_seconds)
    if req.draining:  # a stopping agent: the long poll it may have open answers now
        agents.drain(agent_id)
    seen = agents.work_seen()  # taken before the claim: work signalled during it is not missed
    try:
        done = await run_in_threadpool(
            agents.exchange,
            agent_id,
            req.incarnation,
            req.held,
            reports,
            free,
            req.max_jobs,
            req.draining,
            str(claims.get("region", "*")),
        )
    except MustRegister as exc:
        return _must_register(exc.reason)
    leases = done.leases
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    while not leases and not req.draining and req.max_jobs > 0 and not svc.notify.closing:
        left = deadline - loop.time()
        if left <= 0:
            break
        waiter = agents.wait(agent_id, done.region, seen)
        try:  # in slices: a stopping server answers its long polls within a second
            while not waiter.event.is_set() and not svc.notify.closing and loop.time() < deadline:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(waiter.event.wait(), min(1.0, deadline - loop.time()))
        finally:
            agents.done_waiting(waiter)
        if not waiter.event.is_set():
            break
        if svc.notify.closing or agents.draining(agent_id) or await request.is_disconnected():
            agents.pass_on(done.region)  # it was woken for work it will not take
            break
        seen = agents.work_seen()
        leases = await run_in_threadpool(
            agents.claim, agent_id, done.region, done.architectures, free, req.max_jobs
        )
        if leases:  # there may be more: the next waiter claims too
            agents.pass_on(done.region)
    answer = wire.ExchangeResponse(
        acked=done.acked,
        refused=done.refused,
        leases=[
            wire.launch_to_wire(launch, _pull_token(svc, launch.project_id, launch.image))
            for launch in leases
        ],
        kill=done.kill,
        lease_seconds=svc.settings.lease_seconds,
        next_call_seconds=agents.next_call_seconds(),
    )
    return JSONResponse(wire.dump(answer))


@router.post(wire.PREFIX + "/{agent_id}/logs")
async def logs(agent_id: str, request: Request) -> JSONResponse:
    svc = app_services(request)
    _agent_claims(request, svc)
    req = await _body(request, wire.LogsRequest)
    agents = _service(svc)
    chunks = [(c.job_id, c.attempt, c.offset, c.data) for c in req.chunks]
    acked = await run_in_threadpool(agents.append_logs, agent_id, chunks)
    return JSONResponse(wire.dump(wire.LogsResponse(acked=acked)))


def _pull_token(svc: ServiceSet, project_id: str, image: str) -> str | None:
    """A registry token that pulls the job's image (its project's repository), if it has one."""
    registry = svc.registry
    if not image or registry is None or not registry.available:
        return None
    try:
        return registry.pull_access(project_id, image).password
    except OpenHTCError:  # an image the registry does not hold: the agent's pull reports it
        return None
