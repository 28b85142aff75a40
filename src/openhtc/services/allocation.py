"""Allocation queues: the leader submits Slurm pilot jobs that run ``htc agent`` (issue 17).

Each round (``tick``, every ``alloc_period_seconds`` on the leader only) looks at every queue:

1. it refreshes its pilots from ``squeue`` (found by the job name ``openhtc-<queue id>``) and
   links each to the agent that registered with its label; a pilot that left Slurm's queue has
   ended, and one whose agent never called counts as a failed start;
2. it asks the agent of each pilot that has held nothing for the queue's idle timeout to stop
   (SIGTERM to the batch script, which ``exec``\\s the agent: it drains and exits), so with no
   work no pilot remains (scale to zero);
3. unless paused, it submits the pilots the pure rule (domain/allocation.py) asks for, each
   with an agent token of its own scoped to the queue's region. A queue whose extra sbatch
   arguments today's allow-list refuses (stored before it, or the setting narrowed since)
   pauses itself instead, naming the option.

Failures pause the queue with a reason (domain/allocation.py), shown by ``htc alloc ls`` and
logged. Slurm itself tells a pilot's agent to drain a minute before its walltime ends
(``--signal=B:TERM@60``).
"""

from __future__ import annotations

import logging
import shlex
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from openhtc.allocation.slurm import Slurm, SlurmError, SlurmInterrupted, SlurmJob
from openhtc.domain import allocation as rules
from openhtc.domain.allocation import PilotState, QueueState
from openhtc.domain.errors import NotFound, ValidationFailed
from openhtc.services.periodic import LeaderLoop
from openhtc.services.service_set import ServiceSet
from openhtc.store.allocation import (
    PILOT_LABEL,
    SLURM_JOB_LABEL,
    AgentHolding,
    AllocStore,
    PilotRow,
    QueueRow,
)

log = logging.getLogger("openhtc.allocation")
KINDS = ("slurm",)


@dataclass(frozen=True, slots=True)
class QueueSpec:
    kind: str
    region: str
    time_limit_s: int
    max_pilots: int = rules.DEFAULT_MAX_PILOTS
    backlog: int = rules.DEFAULT_BACKLOG
    pilot_vcpus: int = 1
    idle_timeout_s: int = int(rules.DEFAULT_IDLE_TIMEOUT)
    extra_args: tuple[str, ...] = ()


class AllocationService:
    def __init__(
        self,
        services: ServiceSet,
        store: AllocStore,
        slurm: Slurm,
        server_url: str,
        agent_command: str,
        log_dir: Path,
    ) -> None:
        self.services = services
        self.store = store
        self.slurm = slurm
        self.server_url = server_url
        self.agent_command = agent_command
        self.log_dir = log_dir
        self._lock = threading.Lock()  # one round (or queue change) at a time in this process
        self._ends_lock = threading.Lock()
        self._ends: dict[str, tuple[float, bool, float | None]] = {}  # agent -> (read at, pilot?, end)
        # queue id -> False after an sbatch of the queue was killed at its timeout or failed: Slurm
        # may have queued that pilot with no row here (the queue's next round looks)
        self._rows_match_slurm: dict[str, bool] = {}

    # -- queues (CLI and admin API) -------------------------------------------------------------

    def add(self, spec: QueueSpec, dry_run: bool = True) -> QueueRow:
        if spec.kind not in KINDS:
            raise ValidationFailed(
                f"unknown allocation kind {spec.kind!r} (known: {', '.join(KINDS)})", "kind"
            )
        for name in ("time_limit_s", "max_pilots", "backlog", "pilot_vcpus", "idle_timeout_s"):
            if getattr(spec, name) < 1:
                raise ValidationFailed(f"{name} must be at least 1", name)
        if spec.time_limit_s <= rules.DRAIN_BEFORE_END:
            raise ValidationFailed(
                f"the time limit must exceed {rules.DRAIN_BEFORE_END} s (pilots drain then)", "time_limit_s"
            )
        if not spec.region.strip():
            raise ValidationFailed("a region is required", "region")
        problem = self._args_problem(spec.extra_args)
        if problem is not None:
            raise ValidationFailed(problem, "sbatchArgs")
        row = QueueRow(
            id=uuid.uuid4().hex[:8],
            kind=spec.kind,
            region=spec.region,
            time_limit_s=spec.time_limit_s,
            max_pilots=spec.max_pilots,
            backlog=spec.backlog,
            pilot_vcpus=spec.pilot_vcpus,
            idle_timeout_s=spec.idle_timeout_s,
            extra_args=list(spec.extra_args),
            state=QueueState.ACTIVE.value,
            pause_reason=None,
            failed_submissions=0,
            failed_starts=0,
            created_at=self.services.clock.now(),
        )
        if dry_run:  # HyperQueue's rule: a queue Slurm would refuse is never added
            try:
                self.slurm.submit(
                    self._script(row, "dry-run", "dry-run"), self._sbatch_args(row), test_only=True
                )
            except SlurmError as exc:
                raise ValidationFailed(
                    f"sbatch --test-only refused the queue's arguments: {exc}", "sbatch"
                ) from None
        self.store.add_queue(row)
        log.info("allocation queue %s added: slurm, region %s", row.id, row.region)
        return row

    def _args_problem(self, args: list[str] | tuple[str, ...]) -> str | None:
        """Why the queue's extra sbatch arguments may not go to sbatch under today's allow-list."""
        more = tuple(self.services.settings.alloc_sbatch_options.split(","))
        return rules.sbatch_args_problem(args, more)

    def get(self, queue_id: str) -> QueueRow:
        row = self.store.queue(queue_id)
        if row is None:
            raise NotFound(f"allocation queue {queue_id} not found")
        return row

    def listing(self) -> list[tuple[QueueRow, list[PilotRow]]]:
        return [(q, self.store.pilots(q.id)) for q in self.store.queues()]

    def pause(self, queue_id: str) -> QueueRow:
        self.get(queue_id)
        self.store.set_state(queue_id, QueueState.PAUSED.value, "paused by an admin")
        return self.get(queue_id)

    def resume(self, queue_id: str) -> QueueRow:
        self.get(queue_id)
        self.store.set_state(queue_id, QueueState.ACTIVE.value, None, reset=True)
        return self.get(queue_id)

    def remove(self, queue_id: str) -> None:
        """Remove a queue; its pilots still in Slurm are cancelled (their jobs are recovered)."""
        self.get(queue_id)
        with self._lock:
            alive = self.store.pilots(queue_id, alive_only=True)
            doomed = {p.batch_job_id for p in alive if p.batch_job_id}
            if any(not p.batch_job_id for p in alive):
                # an sbatch that never answered (a server stopped in it) may still have queued a
                # job: no later round of this queue looks for it, so every job of its name goes
                try:
                    jobs = self.slurm.jobs(job_name(queue_id))
                    doomed |= {job_id for job_id, job in jobs.items() if job.waiting or job.running}
                except SlurmError as exc:
                    log.warning("could not list the Slurm jobs of queue %s: %s", queue_id, exc)
            for job_id in sorted(doomed):
                try:
                    self.slurm.cancel(job_id)
                except SlurmError as exc:
                    log.warning("could not cancel pilot Slurm job %s of queue %s: %s", job_id, queue_id, exc)
            self.store.remove_queue(queue_id)

    def queue_depth(self, region: str) -> dict[str, int | str]:
        """The metric an autoscaler (KEDA's metrics-api scaler) reads: a region's queued and active
        jobs and vCPUs; ``wantedVcpus`` (queued + active) is what its agents should offer."""
        queued, queued_vcpus, active, active_vcpus = self.store.queue_depth(region)
        return {
            "region": region,
            "queuedJobs": queued,
            "queuedVcpus": queued_vcpus,
            "activeJobs": active,
            "activeVcpus": active_vcpus,
            "wantedVcpus": queued_vcpus + active_vcpus,
        }

    # -- walltime ---------------------------------------------------------------------------------

    def max_timeout(self, agent_id: str) -> int | None:
        """The longest execTimeoutSeconds ``agent_id`` may start now: a pilot's walltime left less
        the drain margin (or that of an agent started with ``--time-limit``); None for an agent
        whose allocation has no known end. Read at most once a second per agent (each exchange of
        each agent asks)."""
        now = self.services.clock.now()
        with self._ends_lock:
            cached = self._ends.get(agent_id)
        if cached is None or now - cached[0] > (1.0 if cached[1] else 60.0):
            is_pilot, ends_at = self.store.pilot_end(agent_id, now)
            cached = (now, is_pilot, ends_at)
            with self._ends_lock:
                if len(self._ends) > 100000:
                    self._ends.clear()
                self._ends[agent_id] = cached
        _, is_pilot, ends_at = cached
        if not is_pilot or ends_at is None:
            return None
        return rules.max_timeout(ends_at - now)

    # -- one round ------------------------------------------------------------------------------

    def tick(self) -> None:
        with self._lock:
            queues = self.store.queues()
            if not queues:
                return
            now = self.services.clock.now()
            agents = self.store.agents(now - self.services.settings.agent_liveness_seconds)
            rounds: list[_Round] = []
            for queue in queues:  # first every queue's pilots, then submissions: they count them all
                try:
                    rounds.append(self._refresh(queue, agents, now))
                except SlurmInterrupted:
                    raise
                except SlurmError as exc:  # squeue down, say: try again next round
                    log.warning("allocation queue %s: %s", queue.id, exc)
            stopping = {p for r in rounds for p in r.stopping}
            # by region: the vCPUs live agents have free (not those asked to stop), and what waits
            coming: dict[str, int] = {}
            for agent in agents:
                if agent.pilot_id not in stopping:
                    coming[agent.region] = coming.get(agent.region, 0) + agent.vcpus - agent.held_vcpus
            for r in rounds:
                coming[r.queue.region] = coming.get(r.queue.region, 0) + r.waiting * r.queue.pilot_vcpus
            for r in rounds:
                self._finish(r, coming, now)

    def _refresh(self, queue: QueueRow, agents: list[AgentHolding], now: float) -> _Round:
        """Bring the queue's pilots up to date with squeue and their agents; stop idle ones."""
        out = _Round(queue, rules.Health(queue.failed_submissions, queue.failed_starts))
        alive = self.store.pilots(queue.id, alive_only=True)
        # a row written before an sbatch whose answer never came (the server stopped or died
        # meanwhile): Slurm may hold its job under no id we know
        unanswered = [p for p in alive if not p.batch_job_id]
        if unanswered:
            self._rows_match_slurm[queue.id] = False
        seen = self.slurm.jobs(job_name(queue.id)) if alive else {}
        if not self._rows_match_slurm.get(queue.id, True):
            try:
                self._cancel_orphans(queue, seen if alive else self.slurm.jobs(job_name(queue.id)), alive)
            except SlurmInterrupted:
                raise
            except SlurmError as exc:  # looked again next round; this round goes on
                log.warning(
                    "allocation queue %s: cannot look for pilots Slurm has and we do not: %s", queue.id, exc
                )
            else:
                for pilot in unanswered:
                    detail = "sbatch never answered (the server stopped): its Slurm job, if any, cancelled"
                    self.store.update_pilot(
                        pilot.id, state=PilotState.ENDED.value, ended_at=now, detail=detail
                    )
                    log.info("pilot %s: %s", pilot.id, detail)
                alive = [p for p in alive if p.batch_job_id]
        unlinked = [p.id for p in alive if p.agent_id is None]
        linked = self.store.agent_ids_of(unlinked) if unlinked else {}
        by_pilot = {a.pilot_id: a for a in agents if a.pilot_id}
        for pilot in alive:
            out.in_slurm += 1  # until Slurm shows it ended: the cap counts it, stopping or not
            agent_id = pilot.agent_id or linked.get(pilot.id)
            job = seen.get(pilot.batch_job_id)
            if not pilot.batch_job_id or (
                job is None and pilot.state == PilotState.SUBMITTED.value and now - pilot.submitted_at < 30
            ):
                out.alive += 1  # sbatch answered (or has not yet); squeue may not show it yet
                out.waiting += 1
                continue
            if job is None or not (job.waiting or job.running):
                detail = _ended(job, pilot)
                self.store.update_pilot(
                    pilot.id, state=PilotState.ENDED.value, ended_at=now, agent_id=agent_id, detail=detail
                )
                out.health, reason = rules.after_pilot_end(out.health, agent_id is not None, detail)
                out.pause = out.pause or reason
                out.in_slurm -= 1
                log.info("pilot %s (Slurm job %s) ended: %s", pilot.id, pilot.batch_job_id, detail)
                continue
            values: dict[str, object] = {}
            if agent_id != pilot.agent_id:
                values.update(agent_id=agent_id, last_busy_at=now)  # idle counts from its agent's start
                log.info("pilot %s (Slurm job %s): agent %s", pilot.id, pilot.batch_job_id, agent_id)
            state = PilotState.RUNNING if job.running else PilotState.PENDING
            if state.value != pilot.state:
                values["state"] = state.value
            if job.running and pilot.started_at is None:
                values["started_at"] = now
            if job.ends_at is not None and job.ends_at != pilot.ends_at:
                values["ends_at"] = job.ends_at
            agent = by_pilot.get(pilot.id)
            start_timeout = self.services.settings.alloc_start_timeout_seconds
            if (
                agent_id is None
                and pilot.detail is None
                and pilot.started_at is not None
                and now - pilot.started_at >= start_timeout
            ):
                # its agent never called (hung, or its node cannot reach us): nothing would ever
                # stop it before its walltime; once it has left, it counts as a failed start
                self.slurm.cancel(pilot.batch_job_id)
                values["detail"] = (
                    f"its agent had not called the server {start_timeout:.0f} s after it started: cancelled"
                )
                log.warning("pilot %s (Slurm job %s): %s", pilot.id, pilot.batch_job_id, values["detail"])
            elif agent is not None and agent.held_jobs:
                values["last_busy_at"] = now
            elif (
                agent is not None
                and pilot.detail is None
                and pilot.last_busy_at is not None
                and rules.is_idle(pilot.last_busy_at, now, queue.idle_timeout_s)
            ):
                self.slurm.cancel(pilot.batch_job_id, signal="TERM")  # the agent drains, exits
                values["detail"] = f"idle for {queue.idle_timeout_s} s: asked to stop"
                log.info("pilot %s (Slurm job %s) idle: stopping it", pilot.id, pilot.batch_job_id)
            if values:
                self.store.update_pilot(pilot.id, **values)
            if values.get("detail") is None and pilot.detail is None:
                out.alive += 1
                out.waiting += job.waiting
            else:
                out.stopping.append(pilot.id)
        return out

    def _cancel_orphans(self, queue: QueueRow, seen: dict[str, SlurmJob], alive: list[PilotRow]) -> None:
        """Cancel the queue's Slurm jobs that have no pilot row: an sbatch killed at its timeout
        after Slurm had accepted the job. Its agent would get no work (no known end) and hold the
        node until its walltime."""
        known = {p.batch_job_id for p in alive}
        for job_id, job in seen.items():
            if job_id not in known and (job.waiting or job.running):
                log.warning(
                    "allocation queue %s: Slurm job %s has no pilot here: cancelling it", queue.id, job_id
                )
                self.slurm.cancel(job_id)
        self._rows_match_slurm[queue.id] = True

    def _finish(self, r: _Round, coming: dict[str, int], now: float) -> None:
        """Submit what the queue's region needs (unless paused); record failures, pause."""
        queue, region = r.queue, r.queue.region
        if queue.state == QueueState.ACTIVE.value and r.pause is None:
            # a queue stored before the allow-list (or before the setting narrowed) is re-checked:
            # its arguments never reach sbatch unless allowed today
            problem = self._args_problem(queue.extra_args)
            if problem is not None:
                r.pause = f"its sbatch arguments are no longer allowed: {problem}"
        if queue.state == QueueState.ACTIVE.value and r.pause is None:
            # only the work a fresh pilot could take: a job longer than its walltime never fits
            queued = self.store.queued_vcpus(region, rules.max_timeout(queue.time_limit_s))
            demand = rules.Demand(queued, coming.get(region, 0))
            limits = rules.QueueLimits(queue.max_pilots, queue.backlog, queue.pilot_vcpus)
            # `coming` counts every queue's waiting pilots (the region's); the backlog is this queue's
            # the cap counts every pilot Slurm still has, those asked to stop too
            count = min(
                rules.pilots_to_submit(limits, demand, 0, r.in_slurm), max(0, queue.backlog - r.waiting)
            )
            for _ in range(count):
                error = self._submit(queue, now)
                r.health, reason = rules.after_submission(r.health, error)
                if error is None:
                    coming[region] = coming.get(region, 0) + queue.pilot_vcpus
                if reason is not None:
                    r.pause = reason
                    break
        if r.health != rules.Health(queue.failed_submissions, queue.failed_starts):
            self.store.set_health(queue.id, r.health.failed_submissions, r.health.failed_starts)
        if r.pause is not None and queue.state == QueueState.ACTIVE.value:
            self.store.set_state(queue.id, QueueState.PAUSED.value, r.pause)
            log.warning("allocation queue %s paused: %s", queue.id, r.pause)

    def _submit(self, queue: QueueRow, now: float) -> str | None:
        """Submit one pilot; the error when Slurm refused it."""
        pilot_id = uuid.uuid4().hex[:12]
        token = self.services.tokens.agent(f"pilot-{pilot_id}", queue.region, queue.time_limit_s + 3600)
        # the row first, with no job id: a server that stops or dies before sbatch answers
        # leaves it behind, and the queue's next round (this leader's or the next) looks for
        # the job that sbatch may have queued (_refresh)
        self.store.add_pilot(
            PilotRow(
                pilot_id, queue.id, "", PilotState.SUBMITTED.value, now, None, None, None, None, None, None
            )
        )
        try:
            job_id = self.slurm.submit(self._script(queue, pilot_id, token), self._sbatch_args(queue))
        except SlurmInterrupted:
            raise  # the server stops: not a failed submission (the round ends here); the row stays
        except SlurmError as exc:
            self.store.remove_pilot(pilot_id)
            self._rows_match_slurm[queue.id] = False
            log.warning("allocation queue %s: sbatch failed: %s", queue.id, exc)
            return str(exc)
        if not self.store.answer_pilot(pilot_id, job_id):  # another leader gave the row up meanwhile
            log.warning("allocation queue %s: pilot %s was given up meanwhile: cancelling Slurm job %s",
                        queue.id, pilot_id, job_id)  # fmt: skip
            self._rows_match_slurm[queue.id] = False  # the next round looks again, whatever this does
            try:
                self.slurm.cancel(job_id)
            except SlurmInterrupted:
                raise
            except SlurmError as exc:
                log.warning("allocation queue %s: cannot cancel Slurm job %s: %s", queue.id, job_id, exc)
            return None
        log.info("allocation queue %s: pilot %s submitted (Slurm job %s)", queue.id, pilot_id, job_id)
        return None

    def _sbatch_args(self, queue: QueueRow) -> list[str]:
        out_dir = self.log_dir / queue.id
        out_dir.mkdir(parents=True, exist_ok=True)
        return [
            f"--job-name={job_name(queue.id)}",
            f"--time={rules.slurm_time(queue.time_limit_s)}",
            "--nodes=1",
            "--ntasks=1",
            f"--cpus-per-task={queue.pilot_vcpus}",
            f"--signal=B:TERM@{rules.DRAIN_BEFORE_END}",  # the agent drains before the end
            f"--output={out_dir}/pilot-%j.log",
            *queue.extra_args,  # the admin's: they come last and so win
        ]

    def _script(self, queue: QueueRow, pilot_id: str, token: str) -> str:
        """The pilot: one agent in a fresh work directory of its own (so a new agent id: random,
        made at its first start and kept in the directory, agent/workdir.py), removed when the
        agent exits. SIGTERM (idle, or the walltime's end near) is passed on to the agent, which
        drains."""
        labels = f"{PILOT_LABEL}={pilot_id},{SLURM_JOB_LABEL}=$SLURM_JOB_ID"
        work = f'"${{TMPDIR:-/tmp}}/openhtc-pilot-{pilot_id}"'
        return (
            "#!/bin/sh\n"
            "# an openhtc pilot: one htc agent for the length of this allocation (docs/allocation.md)\n"
            f"export OPENHTC_AGENT_TOKEN={shlex.quote(token)}\n"
            f"{self.agent_command} --server {shlex.quote(self.server_url)}"
            f" --region {shlex.quote(queue.region)} --vcpus {queue.pilot_vcpus}"
            f' --labels "{labels}" --work-dir {work} &\n'
            "agent=$!\n"
            "trap 'kill -TERM \"$agent\"' TERM\n"
            'wait "$agent"; status=$?\n'
            'wait "$agent" 2>/dev/null && status=$?\n'  # after a trapped signal: its real end
            f"rm -rf {work}\n"
            'exit "$status"\n'
        )


@dataclass
class _Round:
    """One queue in one round: its counters, pause reason, and pilots alive, waiting, stopping."""

    queue: QueueRow
    health: rules.Health
    pause: str | None = None
    alive: int = 0
    waiting: int = 0
    in_slurm: int = 0  # every pilot not ended (waiting, running, asked to stop): max_pilots caps it
    stopping: list[str] = field(default_factory=list)


def job_name(queue_id: str) -> str:
    return f"openhtc-{queue_id}"


def _ended(job: SlurmJob | None, pilot: PilotRow) -> str:
    if pilot.detail:
        return pilot.detail
    if job is None:
        return "left Slurm's queue"
    return f"Slurm: {job.state}" + (f" ({job.reason})" if job.reason and job.reason != "None" else "")


def installation_workspace(services: ServiceSet) -> str | None:
    """The id of the workspace whose administrators are the installation's (they alone change
    allocation queues, which serve every workspace): ``installation_admin_workspace`` (an id or
    a name), else the first workspace, the one the first start created. None: no such workspace."""
    chosen = services.settings.installation_admin_workspace
    for ws in services.accounts.workspaces():  # oldest first
        if chosen is None or chosen in (ws.id, ws.name):
            return str(ws.id)
    return None


class AllocationLoop(LeaderLoop):
    """Runs :meth:`AllocationService.tick` every ``alloc_period_seconds``, on the leader only."""

    name = "allocation"

    def __init__(self, services: ServiceSet, allocation: AllocationService) -> None:
        super().__init__(services, services.settings.alloc_period_seconds, log)
        self.allocation = allocation

    def round(self) -> None:
        try:
            self.allocation.tick()
        except SlurmInterrupted as exc:
            self.log.info("allocation round interrupted: %s", exc)

    def stop(self) -> None:
        # a round waiting on a hanging sbatch or squeue ends now (the command killed), not after
        # the Slurm timeout, and leaves no command running behind the server
        self.allocation.slurm.interrupt()
        super().stop()
