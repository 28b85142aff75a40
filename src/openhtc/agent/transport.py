"""The executor protocol over HTTP: ``ExecutorPort`` (executor/transport.py) for ``htc agent``.

The local executor (executor/local.py) calls register, claim, report and heartbeat as it does
in-process; here each becomes an exchange with the server (one persistent connection pool):

- every exchange carries the reports not yet acknowledged (the on-disk outbox) and every
  attempt held, and renews the agent's liveness and its leases;
- ``report`` buffers on disk first and returns even when the server is away (the reports go
  with the next exchange that gets through);
- an idle agent (nothing held, nothing to report) long-polls: the server holds the call until a
  job is admitted, up to its ``poll_seconds``;
- when the server is unreachable the agent keeps running what it has, claims nothing, and tries
  again with exponential backoff and jitter; when the server answers 409 (it restarted and lost
  the agent, or marked it lost) it registers again with its ``running`` list first;
- kill lists (cancelled, recovered, fenced attempts) are handed to the executor at its next
  heartbeat.
"""

from __future__ import annotations

import logging
import random
import socket
import threading
import time
from collections.abc import Callable, Collection, Sequence
from typing import Any

import httpx

from openhtc.agent.functions import AgentFunctions
from openhtc.agent.outbox import Outbox
from openhtc.domain.models import AttemptReport, Capacity, JobLaunch
from openhtc.domain.recovery import EveryAttempt
from openhtc.executor import protocol as wire
from openhtc.executor.journal import AttemptJournal
from openhtc.store.functions import CallResult

log = logging.getLogger("openhtc.agent")
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 10.0  # well below the server's liveness timeout: a short outage loses no agent
# The executor reports, then claims at once: the claim's exchange carries the reports, so a turn
# is one round trip, not two (W1 through agents ran at a third of the embedded rate). Reports no
# exchange took this long after they were made are sent by an exchange of their own.
REPORT_DEFER_SECONDS = 0.05


class ServerAway(Exception):
    """The server cannot be reached (or refused us) right now."""

    def __init__(self, message: str, status: int | None = None) -> None:
        self.status = status  # the HTTP status it answered, if it answered
        super().__init__(message)


def _refused_line(status: int, text: str) -> str:
    """One clear line for a 401/403: the server does not take this agent's token."""
    why = "the token is invalid or expired" if status == 401 else "the token may not act for this agent"
    return (
        f"agent: the server refuses this agent's token (HTTP {status}: {why}): {text[:200]}; "
        "mint one with htc admin create-agent-token"
    )


class HttpTransport:
    concurrent_writes = False  # one exchange carries both: no gain from two at once

    def __init__(
        self,
        server: str,
        token: str,
        outbox: Outbox,
        *,
        labels: dict[str, str],
        runtime: str,
        version: str,
    ) -> None:
        self.server = server
        self.outbox = outbox
        self.labels = labels
        self.runtime = runtime
        self.version = version
        self.held: Callable[[], list[tuple[int, int]]] = list  # set by the agent: the executor's
        self.idle: Callable[[], bool] = lambda: False  # the executor holds and reports nothing
        self.on_kill: Callable[[], None] = lambda: None  # kills arrived: heartbeat (and kill) now
        # the executor's claim right now (bound, max jobs; None: none), and where leases that an
        # exchange of reports claimed go: set by the agent (LocalExecutor.want, .leased); unset,
        # a claim asks for what its caller said and an exchange of reports claims nothing
        self.want: Callable[[], tuple[Capacity, int] | None] | None = None
        self.on_leases: Callable[[list[JobLaunch]], None] = lambda launches: None
        self.journal: AttemptJournal | None = None  # the executor's: synced if the server needs it
        self.draining = False
        self.poll_seconds = 0.0
        self.registry_host: str | None = None
        self.pull_tokens: dict[tuple[str, str], str] = {}  # (project, image) -> registry token
        self._headers = {"Authorization": f"Bearer {token}"}
        self._client = self._new_client(60.0)
        # one exchange at a time (the control thread, or a stop); re-entrant: an exchange that
        # gets 409 registers again under it
        self._lock = threading.RLock()
        self._kills: set[tuple[int, int]] = set()
        # Every lease received (or adopted at start) until a report of its attempt is in the
        # outbox: listed as held, so the server, which re-queues the claimed leases an agent
        # does not list (their answer was lost), keeps them. Whatever the executor is doing
        # with it meanwhile (prefetched, running, ended with its report not yet flushed or on
        # its way to the outbox), it stays listed: complete by construction. Dropped when
        # the server kills or refuses the attempt (no longer this agent's).
        self._received: set[tuple[int, int]] = set()
        self._received_lock = threading.Lock()  # not the exchange lock: a report never waits for a poll
        self._exchanges = 0  # exchanges sent: each says it (exchange_seq)
        # Self-fencing: past the server's liveness timeout without one successful call, the
        # server has marked this agent lost and re-queued its jobs: it kills its attempts.
        self.liveness: float | None = None  # from the register answer
        self._last_ok = time.monotonic()
        self._fenced = False
        self._refusal: int | None = None  # the 401/403 of the current streak, logged once
        self._registration: dict[str, Any] | None = None
        self._adopted: set[tuple[int, int]] = set()  # taken back at start: running until held() has them
        self._registered = False
        self._backoff = 0.0
        self._next_try = 0.0
        self._batch_envs: dict[int, tuple[tuple[str, str], ...]] = {}
        Envs = tuple[tuple[str, str], ...]
        self._fixed_envs: dict[int, tuple[Envs, Envs]] = {}  # batch -> (as sent, as run)
        self.launched: dict[tuple[int, int], JobLaunch] = {}  # claimed, until its log is shipped
        self.functions: AgentFunctions | None = None  # function calls' events and results
        self.refused_logs: set[tuple[int, int]] = set()  # attempts whose log the server refuses
        self._unsent = threading.Event()  # reports in the outbox that no exchange has carried yet
        self._sender: threading.Thread | None = None

    def _new_client(self, read_timeout: float) -> httpx.Client:
        # the read timeout exceeds the longest long poll; connecting fails fast
        timeout = httpx.Timeout(connect=5.0, read=read_timeout, write=30.0, pool=5.0)
        return httpx.Client(base_url=self.server, headers=self._headers, timeout=timeout)

    def close(self) -> None:
        self._client.close()

    def interrupt(self) -> None:
        """End a long poll in progress (a stop): a draining call, on a connection of its own,
        makes the server answer it."""
        if not getattr(self, "agent_id", None):
            return
        body = {"incarnation": self.incarnation, "free": {"vcpus": 0, "memory_mb": 0}, "max_jobs": 0,
                "draining": True}  # fmt: skip
        try:
            with self._new_client(10.0) as client:
                client.post(f"{wire.PREFIX}/{self.agent_id}/exchange", json=body)
        except httpx.HTTPError:
            pass  # the server is away: nothing is held there either

    # -- ExecutorPort ---------------------------------------------------------------------------

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
        """The first registration: retried (with backoff) until the server answers. ``adopted``:
        attempts a previous start left running that this one took back (sent as running)."""
        self.agent_id = executor_id
        self.incarnation = incarnation
        self._registration = {
            "agent_id": executor_id,
            "incarnation": incarnation,
            "region": region,
            "architectures": list(architectures),
            "capacity": {"vcpus": capacity.vcpus, "memory_mb": capacity.memory_mb},
            "labels": self.labels,
            "version": self.version,
            "host": host or socket.gethostname(),
            "runtime": self.runtime,
        }
        self._adopted = set(adopted)
        with self._received_lock:
            self._received.update(adopted)
        while True:
            try:
                return self._register(may_have_started)
            except ServerAway as exc:
                delay = self._failed()
                if exc.status in (401, 403):
                    self._refused(exc)
                else:
                    log.warning(
                        "agent: cannot register with %s (%s); again in %.1f s", self.server, exc, delay
                    )
                time.sleep(delay)

    def claim(
        self, executor_id: str, region: str, architectures: Sequence[str], free: Capacity, max_jobs: int
    ) -> list[JobLaunch]:
        idle = self.idle() and not len(self.outbox)
        wait = self.poll_seconds if idle else 0.0
        # not idle: what the executor wants is asked again once this call has the connection (an
        # exchange of reports it waited for may have claimed it meanwhile)
        answer = self._exchange(free, 0 if self.draining else max_jobs, wait, recheck=not idle)
        if answer is None:
            return []
        return [self._launch(lease) for lease in answer.leases]

    def report(
        self, executor_id: str, reports: Sequence[AttemptReport], results: Sequence[CallResult] = ()
    ) -> None:
        if results and self.functions is not None:  # each goes with its call's end (results_for)
            self.functions.save(results)
        carried = self.functions.results_for(reports) if self.functions is not None else None
        self.outbox.add(reports, carried)  # on disk: delivered by the next exchange (the claim's, mostly)
        if self.functions is not None:  # only now: if the outbox failed, the retry carries them
            self.functions.delivered(reports)
        with self._received_lock:  # listed by outbox.attempts() now, until acknowledged
            self._received.difference_update((r.job_id, r.attempt) for r in reports)
        if self.draining:  # no claim follows
            self._exchange(Capacity(0, 0), 0, 0.0)
            return
        self._unsent.set()
        if self._sender is None:
            self._sender = threading.Thread(target=self._send_unsent, name="agent-reports", daemon=True)
            self._sender.start()

    def _send_unsent(self) -> None:
        """Reports that no claim carried within REPORT_DEFER_SECONDS go in an exchange of their
        own, which also claims what the executor wants by then: while it runs, the executor's
        own claim waits for the connection (one exchange at a time), so it must not come back
        empty-handed (W1 through agents: slots ran dry behind such exchanges)."""
        while True:
            self._unsent.wait()
            time.sleep(REPORT_DEFER_SECONDS)
            if self._unsent.is_set():
                try:
                    claims = not self.draining and self.want is not None
                    answer = self._exchange(Capacity(0, 0), wire.MAX_JOBS if claims else 0, 0.0, True)
                    if answer is not None and answer.leases:
                        self.on_leases([self._launch(lease) for lease in answer.leases])
                except Exception:  # kept on disk: the next exchange carries them
                    log.warning("agent: could not send reports", exc_info=True)
                    time.sleep(1.0)

    def heartbeat(self, executor_id: str, held: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
        self._exchange(Capacity(0, 0), 0, 0.0)
        with self._lock:
            kills, self._kills = sorted(self._kills), set()
        return kills

    # -- the wire -------------------------------------------------------------------------------

    def _failed(self) -> float:
        """The connection failed: when to try again (exponential backoff with jitter)."""
        self._backoff = min(BACKOFF_MAX, max(BACKOFF_FIRST, self._backoff * 2))
        delay = self._backoff * random.uniform(0.5, 1.0)
        self._next_try = time.monotonic() + delay
        return delay

    def _register(self, may_have_started: Collection[tuple[int, int]] = ()) -> int:
        assert self._registration is not None
        # What it runs and keeps, and the attempts whose end is not yet acknowledged. Not an
        # attempt whose outbox holds only its STARTING or RUNNING report and that the executor
        # no longer holds: it died with a previous start of the agent, and is recovered by its
        # journal's word (kept, it would stay STARTING for ever, run by nobody).
        held = set(self.held())
        with self._received_lock:
            held |= self._received
        running = sorted(held | self.outbox.ended() | self._adopted)
        body = {**self._registration, "running": running}
        if isinstance(may_have_started, EveryAttempt):  # its journal cannot say: the server assumes all
            body.update(may_have_started=[], journal_untrusted=True)
        else:
            body["may_have_started"] = sorted(may_have_started)
        sent = time.monotonic()
        resp = self._post("/register", body)
        if resp.status_code != 200:
            raise ServerAway(f"register: HTTP {resp.status_code} {resp.text[:200]}", resp.status_code)
        answer = wire.RegisterResponse.model_validate_json(resp.content)
        self._succeeded(sent)
        self.liveness = answer.liveness_seconds
        self.poll_seconds = answer.poll_seconds
        if not answer.lazy_journal and self.journal is not None and self.journal.lazy:
            # an older server would take an untrusted journal's empty list at its word
            log.warning("agent: the server does not take an untrusted journal: syncing it before each job")
            self.journal.synced()
        self.registry_host = answer.registry.host if answer.registry else None
        if self.functions is not None:
            self.functions.configure(answer.function_result_max_bytes)
        with self._lock:
            self._kills.update(answer.kill)
        with self._received_lock:  # no longer this agent's
            self._received.difference_update(answer.kill)
        self._registered = True
        if answer.kill:  # attempts run on here that are no longer ours: the executor kills them now
            self.on_kill()
        self._adopted = set()  # the executor holds them now (held())
        self._backoff = 0.0
        if answer.recovered:
            log.warning("agent: the server recovered %d job(s) this agent no longer runs", answer.recovered)
        return answer.recovered

    def _post(self, path: str, body: dict[str, Any], timeout: float | None = None) -> httpx.Response:
        try:
            if timeout is None:
                return self._client.post(wire.PREFIX + path, json=body)
            return self._client.post(wire.PREFIX + path, json=body, timeout=timeout)
        except httpx.HTTPError as exc:
            raise ServerAway(str(exc) or type(exc).__name__) from None

    def _exchange(
        self, free: Capacity, max_jobs: int, wait: float, recheck: bool = False
    ) -> wire.ExchangeResponse | None:
        """One exchange; None while the server is away (nothing claimed, reports kept), or when
        ``recheck`` finds nothing to claim and nothing to carry. ``recheck``: claim what the
        executor wants once the connection is this call's (at most ``max_jobs``)."""
        if time.monotonic() < self._next_try:
            self._fence_if_silent()
            return None
        with self._lock:
            if recheck and max_jobs > 0 and self.want is not None:
                wanted = self.want()
                # leases an exchange before this one received that have not reached the
                # executor yet (its caller hands them over after the lock): want() counts none
                held = set(self.held())
                with self._received_lock:
                    on_the_way = len(self._received - held)
                free, max_jobs = (
                    (Capacity(0, 0), 0)
                    if wanted is None
                    else (wanted[0], min(max_jobs, wanted[1] - on_the_way))
                )
                if max_jobs <= 0 and not self._unsent.is_set():
                    return None  # an exchange before this one carried it all and claimed enough
            try:
                if not self._registered:
                    self._register()
                    log.info("agent: registered again with %s", self.server)
                return self._exchange_once(free, max_jobs, wait)
            except ServerAway as exc:
                was = self._backoff == 0.0
                delay = self._failed()
                if exc.status in (401, 403):
                    self._refused(exc)
                elif was:
                    log.warning("agent: lost the server (%s); running jobs go on, retrying", exc)
                else:
                    log.debug("agent: server still away (%s); again in %.1f s", exc, delay)
                self._fence_if_silent()
                return None

    def _succeeded(self, sent: float) -> None:
        """A call sent at ``sent`` succeeded: the server heard the agent then (its liveness
        clock starts at the call's arrival, not at its answer, which a long poll delays)."""
        self._last_ok = max(self._last_ok, sent)
        self._refusal = None
        if self._fenced:
            self._fenced = False
            log.info("agent: the server answers again")

    def _refused(self, exc: ServerAway) -> None:
        if self._refusal != exc.status:  # one line per streak, not one per retry
            self._refusal = exc.status
            log.error(_refused_line(exc.status or 0, str(exc)))

    def _fence_if_silent(self) -> None:
        """Past the liveness timeout without a successful call (the server away, refusing the
        token, or failing), the server has taken this agent for lost and re-queued its jobs:
        kill every attempt it holds (their reports stay in the outbox) and register again
        when the server answers. Running on would run those jobs twice."""
        if self._fenced or self.liveness is None:
            return
        silent = time.monotonic() - self._last_ok
        if silent <= self.liveness:
            return
        with self._lock:
            self._fenced = True
            self._registered = False  # the next call that gets through registers first
            with self._received_lock:
                doomed = set(self.held()) | self._received
            self._kills.update(doomed)
        log.error(
            "agent: no successful call to %s for %.0f s (the server's liveness timeout): it has "
            "taken this agent for lost; killing its %d attempt(s) and registering again when it "
            "answers",
            self.server,
            silent,
            len(doomed),
        )
        if doomed:
            self.on_kill()

    def _holding(self) -> set[tuple[int, int]]:
        """Every attempt this agent may hold a claimed lease of: what the executor holds or
        has to report, the leases received with no report in the outbox yet (read before the
        outbox: ``report`` adds to it first, then drops them here), and the outbox's."""
        held = set(self.held())
        with self._received_lock:
            held |= self._received
        return held | self.outbox.attempts()

    def _exchange_once(self, free: Capacity, max_jobs: int, wait: float) -> wire.ExchangeResponse | None:
        self._unsent.clear()  # before the outbox is read: a report added after is sent after
        reports = self.outbox.pending()
        self._exchanges += 1
        body = {
            "incarnation": self.incarnation,
            "free": {"vcpus": max(0, free.vcpus), "memory_mb": max(0, free.memory_mb)},
            "max_jobs": max_jobs,
            # complete (exchange_seq says so): a lease it does not list never reached it
            # (and the attempts whose reports wait in the outbox: an exchange may carry only some)
            "held": sorted(self._holding()),
            "reports": [r.model_dump() for r in reports],
            "wait_seconds": wait,
            "draining": self.draining,
            "exchange_seq": self._exchanges,
        }
        sent = time.monotonic()
        resp = self._post(f"/{self.agent_id}/exchange", body, timeout=wait + 30.0 if wait else None)
        if resp.status_code == 409:  # the server does not know this agent as it is: register first
            log.warning("agent: the server says %s; registering again", resp.text[:100])
            self._registered = False
            self._register()
            return None
        if resp.status_code != 200:
            raise ServerAway(f"exchange: HTTP {resp.status_code} {resp.text[:200]}", resp.status_code)
        answer = wire.ExchangeResponse.model_validate_json(resp.content)
        if self.functions is not None:  # its limit now: lowered since registration, say
            self.functions.configure(answer.function_result_max_bytes)
        self._succeeded(sent)
        self._backoff = 0.0
        self.outbox.done(answer.acked)
        if answer.refused:
            self.outbox.forget_attempt(answer.refused)
        with self._received_lock:  # the killed and refused are no longer this agent's
            self._received.difference_update(answer.refused, answer.kill)
            self._received.update((lease.job_id, lease.attempt) for lease in answer.leases)
        if answer.kill:
            self._kills.update(answer.kill)
            self.on_kill()
        for lease in answer.leases:
            if lease.pull_token:
                self.pull_tokens[(lease.project_id, lease.image)] = lease.pull_token
        return answer

    def _launch(self, lease: wire.Launch) -> JobLaunch:
        if len(self._fixed_envs) >= 1024:  # one entry per batch ever leased: bounded
            self._fixed_envs.clear()
            self._batch_envs.clear()
        launch = wire.launch_from_wire(lease, self._batch_envs)
        # the job reaches the API at the URL this agent reaches the server by
        api = f"{self.server}/api/v1"
        source = launch.batch_envs
        cached = self._fixed_envs.get(launch.batch_id)
        if cached is None or cached[0] != source:  # one tuple per batch: runtimes cache on it
            cached = (source, tuple((k, api if k == "OPENHTC_API_URL" else v) for k, v in source))
            self._fixed_envs[launch.batch_id] = cached
        launch = launch._replace(batch_envs=cached[1])
        self.launched[(launch.job_id, launch.attempt)] = launch
        if self.functions is not None:
            self.functions.leased(launch, lease.event)
        return launch

    def send_logs(
        self, chunks: list[dict[str, Any]], timeout: float | None = None
    ) -> list[tuple[int, int, int]] | None:
        """POST log chunks; None if the server did not take them (sent again later)."""
        if not self._registered or time.monotonic() < self._next_try:
            return None
        body = {"incarnation": self.incarnation, "chunks": chunks}
        try:
            resp = self._post(f"/{self.agent_id}/logs", body, timeout=timeout)
        except ServerAway:
            return None
        if resp.status_code == 409:  # some chunks are for attempts not this agent's: drop those
            refused = wire.ErrorBody.model_validate_json(resp.content).refused
            if refused:
                self.refused_logs.update((job, attempt) for job, attempt in refused)
            return None
        if resp.status_code != 200:  # 503, 507: the server keeps nothing; sent again later
            return None
        return wire.LogsResponse.model_validate_json(resp.content).acked
