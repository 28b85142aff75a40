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
from typing import Any, NamedTuple, TypeVar

import orjson
from fastapi import APIRouter, Request
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool

from openhtc.api.deps import app_services
from openhtc.api.responses import JSONResponse
from openhtc.domain.errors import OpenHTCError, PermissionDenied, Unauthenticated, ValidationFailed
from openhtc.domain.models import JobLaunch
from openhtc.domain.recovery import EveryAttempt
from openhtc.executor import protocol as wire
from openhtc.services.agents import AgentService, LogsRefused, MustRegister
from openhtc.services.functions import FUNCTION_COMMAND
from openhtc.services.service_set import ServiceSet
from openhtc.store.agent_rows import TokenBinding, token_hash
from openhtc.store.functions import ReportedResult
from openhtc.store.queue import AgentInfo

router = APIRouter()
NOT_YOURS = "not this agent's attempt"  # a 409 of the logs route: the chunks of ``refused`` are not its
M = TypeVar("M", bound=BaseModel)
OFF_LOOP_BYTES = 1 << 20  # a request body larger is validated in the thread pool


class Caller(NamedTuple):
    """The agent token of a call: its claims and its hash (what an agent is bound to)."""

    claims: dict[str, Any]
    token_hash: str

    @property
    def region(self) -> str:
        return str(self.claims.get("region", "*"))

    def binding(self) -> TokenBinding:
        # a token minted before tokens were bound (no ``agents`` claim) keeps serving its fleet
        if "agents" not in self.claims:
            return TokenBinding(self.token_hash, None)
        agents = self.claims["agents"]
        return TokenBinding(self.token_hash, agents if isinstance(agents, int) and agents > 0 else 1)


def _agent_claims(request: Request, svc: ServiceSet) -> Caller:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if not token.strip():
        raise Unauthenticated("expected 'Authorization: Bearer <agent token>'")
    if scheme.lower() != "bearer":  # a user's API key, say
        raise PermissionDenied("only an agent token (htc admin create-agent-token) reaches the agent routes")
    return Caller(svc.tokens.verify_agent(token.strip()), token_hash(token.strip()))


async def _body(request: Request, model: type[M], context: dict[str, Any] | None = None) -> M:
    body = await request.body()
    try:
        if len(body) <= OFF_LOOP_BYTES:
            return model.model_validate_json(body, context=context)
        # a large one (an exchange's function results are parsed too) would hold the loop
        return await run_in_threadpool(model.model_validate_json, body, context=context)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise ValidationFailed(first.get("msg", "invalid"), where or None) from None


def _service(svc: ServiceSet) -> AgentService:
    agents: AgentService | None = svc.agents
    if agents is None:
        raise PermissionDenied("this server serves no agents")
    return agents


def _must_register(reason: str, refused: list[tuple[int, int]] | None = None) -> JSONResponse:
    body = wire.ErrorBody(error=reason, refused=refused).model_dump(mode="json", exclude_none=True)
    return JSONResponse(body, status_code=409)


@router.post(wire.PREFIX + "/register")
async def register(request: Request) -> JSONResponse:
    svc = app_services(request)
    caller = _agent_claims(request, svc)
    req = await _body(request, wire.RegisterRequest)
    if caller.region not in ("*", req.region):
        raise PermissionDenied(f"this agent token is for region {caller.region}, not {req.region}")
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
    # an untrusted journal (the agent's machine crashed) cannot say: every attempt may have started
    started = EveryAttempt() if req.journal_untrusted else req.may_have_started
    done = await run_in_threadpool(agents.register, info, req.running, started, caller.binding())
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
        function_result_max_bytes=_result_limit(svc),
        lazy_journal=True,
    )
    return JSONResponse(wire.dump(answer))


@router.post(wire.PREFIX + "/{agent_id}/exchange")
async def exchange(agent_id: str, request: Request) -> JSONResponse:
    svc = app_services(request)
    caller = _agent_claims(request, svc)
    # a function call's result that is not valid (wire.FunctionResult) or not its call's: a 400
    # naming it, and nothing of the exchange applied (an agent's token is a credential a user
    # may hold; results are stored as they come and served verbatim). One over the limit fails
    # its call instead (wire.Report): the agent's limit may be stale.
    limit = _result_limit(svc)
    req = await _body(request, wire.ExchangeRequest, {wire.RESULT_LIMIT: limit})
    agents = _service(svc)
    keyed = [
        (i, r.job_id, r.attempt, r.result.result_key)
        for i, r in enumerate(req.reports)
        if r.result and r.result.result_key
    ]
    if keyed:
        try:
            await run_in_threadpool(
                agents.check_result_keys, agent_id, req.incarnation, keyed, caller.region, caller.token_hash
            )
        except MustRegister as exc:
            return _must_register(exc.reason)
    reports = [(r.seq, wire.report_from_wire(r)) for r in req.reports]
    results = {
        (r.job_id, r.attempt): ReportedResult(
            r.job_id, r.attempt, r.result.result, r.result.error, r.result.result_key
        )
        for r in req.reports
        if r.result is not None
    }
    free = req.free.capacity()
    wait = min(req.wait_seconds, svc.settings.agent_poll_seconds)
    seen = agents.work_seen()  # taken before the claim: work signalled during it is not missed
    idle = None  # an idle agent's exchange that needs no database: answered here, on the loop
    if not (req.reports or req.held or req.draining) and req.exchange_seq is None:
        idle = agents.exchange_idle(
            agent_id, req.incarnation, free, req.max_jobs, caller.region, caller.token_hash
        )
    try:
        done = (
            idle
            if idle is not None
            else await agents.exchange_async(
                agent_id,
                req.incarnation,
                req.held,
                reports,
                free,
                req.max_jobs,
                req.draining,
                caller.region,
                caller.token_hash,
                req.exchange_seq,
                results,
            )
        )
    except MustRegister as exc:
        return _must_register(exc.reason)
    leases = done.leases
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    while (
        not leases and not req.draining and req.max_jobs > 0 and not done.suspect and not svc.notify.closing
    ):
        left = deadline - loop.time()
        if left <= 0:
            break
        waiter = agents.wait(agent_id, done.region, seen)
        # one timer per poll, no slices (a stopping server wakes its polls: AgentService.close)
        timer = loop.call_at(deadline, waiter.event.set)
        try:
            await waiter.event.wait()
        finally:
            timer.cancel()
            agents.done_waiting(waiter)
        if not waiter.woken:  # the poll's time is up
            break
        if svc.notify.closing or agents.draining(agent_id) or await request.is_disconnected():
            agents.pass_on(done.region)  # it was woken for work it will not take
            break
        seen = agents.work_seen()
        try:
            leases = await agents.claim_async(agent_id, done.region, done.architectures, free, req.max_jobs)
        except BaseException:  # the work it was woken for is still queued: the next waiter takes it
            agents.pass_on(done.region)
            raise
        if leases:  # there may be more: the next waiter claims too (two, if this one came back full)
            agents.pass_on(done.region, 2 if len(leases) >= min(req.max_jobs, free.vcpus) else 1)
    answer = {  # wire.ExchangeResponse, built directly (see wire.launch_json)
        "acked": done.acked,
        "refused": done.refused,
        "leases": await _wire_leases(svc, agents, leases),
        "kill": done.kill,
        "lease_seconds": svc.settings.lease_seconds,
        "next_call_seconds": agents.next_call_seconds(),
        "function_result_max_bytes": limit,
    }
    return JSONResponse(answer)


def _result_limit(svc: ServiceSet) -> int:
    """The largest result an agent sends inline (wire.RegisterResponse): inline results are
    strings of a JSON body, so within its string limit too."""
    return min(svc.settings.function_result_max_bytes, svc.settings.max_string_chars)


@router.post(wire.PREFIX + "/{agent_id}/logs")
async def logs(agent_id: str, request: Request) -> JSONResponse:
    svc = app_services(request)
    caller = _agent_claims(request, svc)
    req = await _body(request, wire.LogsRequest)
    agents = _service(svc)
    chunks = [(c.job_id, c.attempt, c.offset, c.data) for c in req.chunks]
    try:
        acked = await run_in_threadpool(
            agents.append_logs, agent_id, chunks, req.incarnation, caller.region, caller.token_hash
        )
    except MustRegister as exc:
        return _must_register(exc.reason)
    except LogsRefused as exc:
        return _must_register(NOT_YOURS, exc.refused)
    return JSONResponse(wire.dump(wire.LogsResponse(acked=acked)))


async def _wire_leases(
    svc: ServiceSet, agents: AgentService, leases: list[JobLaunch]
) -> list[dict[str, Any]]:
    """The leases for the wire (``wire.Launch`` as JSON): each with its registry pull token, and
    a function call's event. A batch's envs (its tokens among them: most of a lease's bytes) are
    encoded once per answer, not once per lease."""
    calls = any(launch.commands[:1] == (FUNCTION_COMMAND,) for launch in leases)
    events = await run_in_threadpool(agents.events_for, leases) if calls else {}
    shared: dict[int, Any] = {}  # id of a batch's envs tuple (alive meanwhile) -> its JSON
    tokens: dict[tuple[str, str], str | None] = {}
    out = []
    for launch in leases:
        envs = shared.get(id(launch.batch_envs))
        if envs is None:
            try:
                envs = orjson.Fragment(orjson.dumps(launch.batch_envs))
            except TypeError:  # text no encoder takes: JSONResponse replaces it (api/responses.py)
                envs = launch.batch_envs
            shared[id(launch.batch_envs)] = envs
        where = (launch.project_id, launch.image)  # one token per project and image: a signature each
        if where not in tokens:
            tokens[where] = _pull_token(svc, launch.project_id, launch.image) if launch.image else None
        out.append(wire.launch_json(launch, tokens[where], events.get(launch.job_id), envs))
    return out


def _pull_token(svc: ServiceSet, project_id: str, image: str) -> str | None:
    """A registry token that pulls the job's image (its project's repository), if it has one."""
    registry = svc.registry
    if not image or registry is None or not registry.available:
        return None
    try:
        return registry.pull_access(project_id, image).password
    except OpenHTCError:  # an image the registry does not hold: the agent's pull reports it
        return None
