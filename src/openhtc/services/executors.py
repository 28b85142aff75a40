"""The executor protocol, served in-process: register, claim, report, heartbeat.

``htc agent`` speaks the same protocol over HTTP; the embedded local executor calls these
methods directly. Claims turn store rows into JobLaunch values carrying the job's environment,
including a job-scoped bearer token and refresh token, minted once per task (and user-defined
claims): a job token's scope is its task, so every job of its batches can share one.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

from openhtc.auth.tokens import Principal
from openhtc.domain.capacity import ExecutorOffer
from openhtc.domain.enums import JobStatus
from openhtc.domain.models import AttemptReport, Capacity, JobLaunch
from openhtc.services.notify import EVERYTHING, Key, job_key, nothing_ended, task_key
from openhtc.services.service_set import ServiceSet
from openhtc.store.functions import CallResult
from openhtc.store.transitions import Applied

# a change to these ends an attempt: its job's waiters look again (a retry's too)
_ENDS = frozenset(int(s) for s in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.SUBMITTED_TO_RESCALE))
_SUCCEEDED = int(JobStatus.SUCCEEDED)


def live_offers(services: ServiceSet) -> list[ExecutorOffer]:
    """What the executors offer that have been heard from within a lease: one silent longer has
    lost its jobs, and its capacity no longer counts either."""
    return services.queue.executor_offers(services.clock.now() - services.settings.lease_seconds)


class ExecutorService:
    def __init__(self, services: ServiceSet) -> None:
        self.services = services
        self._contexts: dict[int, _BatchContext] = {}  # batch id -> what its jobs share
        self._tokens: dict[tuple[Any, ...], tuple[str, str, float]] = {}  # see _job_tokens
        self._lock = threading.Lock()

    @property
    def concurrent_writes(self) -> bool:
        """Whether a report and a claim gain from running at once (see Database)."""
        return self.services.db.concurrent_writes

    def register(
        self,
        executor_id: str,
        incarnation: str,
        region: str,
        architectures: list[str],
        capacity: Capacity,
        may_have_started: Collection[tuple[int, int]] = (),
        version: str | None = None,
        host: str | None = None,
        adopted: Collection[tuple[int, int]] = (),
    ) -> int:
        """Record an executor (re)start; recover what its previous start held. ``may_have_started``:
        the (job, attempt) pairs that start handed to a runtime and never saw end; ``adopted``:
        those its runtime still has (running, or ended with an exit code), kept, not recovered."""
        applied = self.services.queue.register(
            executor_id,
            incarnation,
            region,
            architectures,
            capacity,
            self.services.clock.now(),
            may_have_started,
            version,
            host,
            adopted,
            self.services.settings.lease_seconds,
        )
        if applied.changes:
            self.services.metrics.jobs.applied(applied)
            self.services.wakeups.schedule_round.set()
            self.services.notify.publish((EVERYTHING,))
        return len(applied.changes)

    def claim(
        self,
        executor_id: str,
        region: str,
        architectures: Sequence[str],
        free: Capacity,
        max_jobs: int,
        max_timeout_s: int | None = None,
        agent: bool = False,
    ) -> list[JobLaunch]:
        """``max_timeout_s``: only jobs whose execTimeoutSeconds is at most this (a pilot's
        walltime left); jobs without one always qualify. ``agent``: an ``htc agent``'s claim,
        which takes nothing once the agent is lost or drains (checked in the claim's transaction)."""
        s = self.services
        events: dict[int, str] = {}  # a small claim's function calls' events (QueueStore.claim)
        claimed = s.queue.claim(
            executor_id,
            region,
            architectures,
            free,
            max_jobs,
            s.settings.lease_seconds,
            s.clock.now(),
            max_timeout_s,
            agent,
            None if agent else events,  # an agent's leases carry theirs (services/agents.py)
        )
        contexts = self._contexts_for({job.batch_id for job in claimed})
        if claimed:  # with nobody waiting, no keys to build: the publish still counts (published())
            keys = {task_key(job.task_id) for job in claimed} if not s.notify.idle else ()
            s.notify.publish(keys, nothing_ended)
        s.metrics.jobs.claimed(claimed, s.clock.now())
        return [self._launch(job, contexts[job.batch_id], events.get(job.id)) for job in claimed]

    def launches(self, claimed: Sequence[Any]) -> list[JobLaunch]:
        """The launches of jobs claimed elsewhere (the agents' group commit), in their order."""
        contexts = self._contexts_for({job.batch_id for job in claimed})
        return [self._launch(job, contexts[job.batch_id]) for job in claimed]

    def report(
        self, executor_id: str, reports: Sequence[AttemptReport], results: Sequence[CallResult] = ()
    ) -> Applied:
        """Apply an executor's reports, and the function results they come with (in the same
        transaction); returns what they changed."""
        applied = self.services.queue.report(executor_id, reports, self.services.clock.now(), results)
        self.services.metrics.jobs.reported(len(reports), applied)
        if applied.requeued:  # retried attempts wait in SUBMITTED_TO_RESCALE for the scheduler
            self.services.wakeups.schedule_round.set()
        if applied.changes and not self.services.notify.idle:
            self.notify_applied(applied)
        elif applied.changes:  # nobody waits: no keys to build, but a waiter about to subscribe
            self.services.notify.publish(())  # must see that something changed (published())
        return applied

    def notify_applied(self, applied: Applied) -> None:
        """After the commit: wake who waits for the tasks of the jobs the reports changed, and
        for the jobs whose attempt ended (stale reports changed nothing: they wake nobody)."""
        keys: set[Key] = set()
        for change in applied.changes:
            keys.add(task_key(change[1]))
            if change[5] in _ENDS:
                keys.add(job_key(change[0]))
        self.services.notify.publish(keys, _Succeeded(applied))

    def heartbeat(self, executor_id: str, held: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
        s = self.services
        return s.queue.heartbeat(executor_id, held, s.settings.lease_seconds, s.clock.now())

    # -- launches -------------------------------------------------------------------------------

    def _contexts_for(self, batch_ids: set[int]) -> dict[int, _BatchContext]:
        """The shared launch context of each batch; batch rows are read only on a cache miss."""
        now = self.services.clock.now()
        with self._lock:
            found = {i: c for i in batch_ids if (c := self._contexts.get(i)) and c.renew_at > now}
        missing = batch_ids - found.keys()
        if missing:
            for batch_id, row in self.services.jobs.batch_heads(missing).items():
                found[batch_id] = self._batch_context(row, now)
        return found

    def _batch_context(self, batch: Any, now: float) -> _BatchContext:
        """What every job of a batch shares, built once: definition, tokens, environment."""
        definition = batch.request.get("htcJobDefinition", {})
        claims = {c["name"]: c["value"] for c in definition.get("claims", [])}
        principal = Principal(
            user_id=batch.created_by,
            workspace_id=batch.workspace_id,
            role="MEMBER",
            scope="job",
            project_id=batch.project_id,
            task_id=batch.task_id,
            claims=claims,
        )
        bearer, refresh, expires_at = self._job_tokens(principal, now)
        settings = self.services.settings
        shared = {
            "AWS_BATCH_CE_NAME": f"openhtc-{batch.region}",
            "AWS_BATCH_JQ_NAME": f"openhtc-{batch.region}",
            "RESCALE_PROJECT_ID": batch.project_id,
            "RESCALE_TASK_ID": batch.task_id,
            "RESCALE_HTC_PROJECT_ID": batch.project_id,
            "RESCALE_HTC_TASK_ID": batch.task_id,
            "RESCALE_HTC_REGION": batch.region,
            "RESCALE_HTC_BEARER_TOKEN": bearer,
            "RESCALE_HTC_REFRESH_TOKEN": refresh,
            "OPENHTC_API_URL": f"http://{_connect_host(settings.host)}:{settings.port}/api/v1",
        }
        renew_at = expires_at - 3600  # a job starts with at least an hour left on its tokens
        storage = self.services.storage
        creds = None
        if storage is not None:
            creds = storage.job_credentials(batch.project_id, batch.task_id, batch.created_by)
        if creds is not None:  # S3: AWS_* reaching the task (rw) and shared (ro); STS caps their life
            shared.update(creds.values)
            renew_at = min(renew_at, now + (creds.expires_at - now) / 2)
        context = _BatchContext(
            expires_at=expires_at,
            renew_at=renew_at,
            parent_job_id=batch.parent_job_id,
            image=definition.get("imageName", ""),
            commands=tuple(definition.get("commands", [])),
            # the user's envs last: they win over openhtc's (as they always have)
            batch_env=(*shared.items(), *((e["name"], e["value"]) for e in definition.get("envs", []))),
            disk_gib=int(definition.get("maxDiskGiB", 10)),
            timeout_s=definition.get("execTimeoutSeconds"),
            working_dir=definition.get("workingDir"),
        )
        with self._lock:
            if len(self._contexts) > 10000:
                self._contexts.clear()
            self._contexts[batch.id] = context
        return context

    def _job_tokens(self, principal: Principal, now: float) -> tuple[str, str, float]:
        """The bearer and refresh tokens of a job (and their expiry). Their claims are the
        task, its user and the batch's user-defined claims, so the batches of a task that
        carry the same claims share them: minting is two RS256 signatures, ~1 ms each, and a
        client that submits one job at a time would pay them before each job starts."""
        key = (
            principal.user_id,
            principal.workspace_id,
            principal.project_id,
            principal.task_id,
            json.dumps(principal.claims, sort_keys=True, default=str),
        )
        with self._lock:
            minted = self._tokens.get(key)
        if minted is not None and minted[2] - 3600 > now:
            return minted
        bearer, ttl = self.services.tokens.bearer(principal)
        minted = (bearer, self.services.tokens.refresh(principal), now + ttl)
        with self._lock:
            if len(self._tokens) > 10000:
                self._tokens.clear()
            self._tokens[key] = minted
        return minted

    def _launch(self, job: Any, ctx: _BatchContext, event: str | None = None) -> JobLaunch:
        job_uuid = f"{ctx.parent_job_id}:{job.idx}"
        per_job = (
            ("AWS_BATCH_JOB_ARRAY_INDEX", str(job.idx)),
            ("AWS_BATCH_JOB_ID", job_uuid),
            ("AWS_BATCH_JOB_ATTEMPT", str(job.attempt)),
            ("RESCALE_JOB_ID", job_uuid),
        )
        return JobLaunch(
            job_id=job.id,
            attempt=job.attempt,
            job_uuid=job_uuid,
            batch_id=job.batch_id,
            array_index=job.idx,
            project_id=job.project_id,
            task_id=job.task_id,
            region=job.region,
            image=ctx.image,
            commands=ctx.commands,
            envs=per_job,
            batch_envs=ctx.batch_env,
            vcpus=job.vcpus,
            memory_mb=job.memory_mb,
            disk_gib=ctx.disk_gib,
            timeout_s=ctx.timeout_s,
            working_dir=ctx.working_dir,
            event=event,
        )


@dataclass(frozen=True, slots=True)
class _BatchContext:
    expires_at: float
    renew_at: float  # claims after this build a new context (fresh tokens)
    parent_job_id: str
    image: str
    commands: tuple[str, ...]
    batch_env: tuple[tuple[str, str], ...]
    disk_gib: int
    timeout_s: int | None
    working_dir: str | None


def _connect_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host


class _Succeeded:
    """What a report made of each job it ended SUCCEEDED: the columns of its row that changed,
    as a read would give them (the rest are fixed at submit), for its waiters (``live.py``).
    Built on the event loop, and only when someone there waits on one of these jobs."""

    __slots__ = ("_applied", "_rows")

    def __init__(self, applied: Applied) -> None:
        self._applied = applied
        self._rows: dict[object, dict[str, Any]] | None = None

    def __call__(self, key: Key) -> dict[str, Any] | None:
        if key[0] != "job":  # a task's waiter (a results page) reads for itself: nothing to build
            return None
        if self._rows is None:
            self._rows = self._build()
        return self._rows.get(key[1])

    def _build(self) -> dict[object, dict[str, Any]]:
        applied = self._applied
        last = {event[0]: event for event in applied.events}  # a job's events are in order
        rows: dict[object, dict[str, Any]] = {}
        for job_id, _, _, _, _, status, attempt, code, cancelled, _, started, completed in applied.changes:
            event = last.get(job_id)
            if status != _SUCCEEDED or event is None or event[2] != _SUCCEEDED:
                continue  # anything else is read back (its reason may not be its last event's)
            rows[job_id] = {
                "status": status,
                "attempt": attempt,
                "failure_code": code,
                "cancelled": cancelled,
                "started_at": started,
                "completed_at": completed,
                "updated_at": applied.at,
                "status_reason": event[4],
                "exit_code": event[5],
                "executor_id": event[6],
            }
        return rows
