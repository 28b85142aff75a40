"""The composition root: builds every service of a server process and wires them together."""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.exc import DBAPIError

from openhtc import __version__
from openhtc.allocation.slurm import Slurm
from openhtc.auth.tokens import TokenService
from openhtc.config import Settings
from openhtc.domain.clock import Clock
from openhtc.domain.enums import Role
from openhtc.domain.errors import OpenHTCError
from openhtc.domain.limits import Limits
from openhtc.executor.capacity import host_architecture
from openhtc.executor.local import LocalExecutor
from openhtc.functions.pool import DatabaseResults, FunctionPool
from openhtc.metrics import Metrics
from openhtc.metrics.store import executors_by_state
from openhtc.registry import Registry
from openhtc.runtimes import build_runtime
from openhtc.runtimes.base import Runtime
from openhtc.runtimes.jobnet import Endpoint, url_endpoint
from openhtc.scheduler.loop import SchedulerLoop
from openhtc.services.agents import AgentService
from openhtc.services.allocation import AllocationLoop, AllocationService
from openhtc.services.executors import ExecutorService
from openhtc.services.leadership import Leadership
from openhtc.services.logs import LogStore
from openhtc.services.logwatch import LogWatch
from openhtc.services.notify import ClusterNotifier, LocalNotifier
from openhtc.services.periodic import StatisticsRefresher
from openhtc.services.retention import RetentionSweeper
from openhtc.services.service_set import ServiceSet
from openhtc.services.shared_keys import jwt_signing_key, share_registry_key
from openhtc.services.shared_logs import DatabaseLogs, LogMirror, MirroringStager
from openhtc.services.storage import StorageService, start_managed_storage
from openhtc.services.wakeups import Wakeups
from openhtc.startup import (
    DataDirLock,
    SqliteLock,
    StartupError,
    bind_listener,
    check_settings,
    describe,
    explain_database_failure,
    sqlite_file,
)
from openhtc.storage.seaweedfs import SeaweedFS
from openhtc.storage.staging import NoStager, Stager
from openhtc.store.accounts import AccountStore
from openhtc.store.allocation import AllocStore
from openhtc.store.db import Database
from openhtc.store.functions import FunctionStore
from openhtc.store.jobs import JobStore
from openhtc.store.leader_lock import PgLeaderLock
from openhtc.store.log_chunks import LogChunkStore
from openhtc.store.pg_notify import PgChannel
from openhtc.store.projects import ProjectStore
from openhtc.store.queue import QueueStore
from openhtc.store.shared_secrets import bootstrap_lock

log = logging.getLogger("openhtc")
ADMIN_EMAIL = "admin@localhost"
# Not "default": the rescalehtc client's `rauthenticate` makes a folder named after the workspace
# beside a symlink called "default", and the two would collide.
DEFAULT_WORKSPACE = "openhtc"
GRACEFUL_SECONDS = 5  # at SIGTERM, how long uvicorn waits for responses in progress


def build_services(settings: Settings, clock: Clock | None = None) -> ServiceSet:
    """Open the database (migrating it) and build the shared services. No threads start here."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    clock = clock or Clock()
    db = Database(settings.resolved_database_url())
    db.migrate()
    key = jwt_signing_key(settings, db)  # shared by every server on one PostgreSQL
    share_registry_key(settings, db)
    metrics = Metrics(lambda: executors_by_state(db, clock.now() - settings.lease_seconds))
    db.observer = metrics.db_transaction
    wakeups = Wakeups()
    # several servers on one PostgreSQL elect the one running the singletons; SQLite: one server
    leadership = Leadership.always() if db.is_sqlite else Leadership(PgLeaderLock(db.url))
    # waiters, and the loops' wake-ups, are told in process; with PostgreSQL also on the other
    # servers on it, through LISTEN/NOTIFY
    notify: LocalNotifier | ClusterNotifier = (
        LocalNotifier()
        if db.is_sqlite
        else ClusterNotifier(PgChannel(db.url), wakeups, lambda: leadership.is_leader)
    )
    services = ServiceSet(
        settings=settings,
        clock=clock,
        db=db,
        accounts=AccountStore(db),
        projects=ProjectStore(db),
        jobs=JobStore(db, settings.materialize_chunk),
        queue=QueueStore(db, settings.max_infrastructure_retries),
        tokens=TokenService(key, clock, settings.token_ttl_seconds, settings.refresh_token_ttl_seconds),
        logs=(
            DatabaseLogs(settings.data_dir / "logs", LogChunkStore(db))
            if settings.log_store == "database"
            else LogStore(settings.data_dir / "logs")
        ),
        wakeups=wakeups,
        registry=Registry(settings, clock, db),
        # process and noop never pull; 'auto' resolves to bwrap or podman, which do.
        images_required=settings.runtime not in ("process", "noop"),
        limits=limits_of(settings),
        notify=notify,
        logwatch=LogWatch(),
        metrics=metrics,
        leadership=leadership,
    )
    metrics.leader = lambda: services.leadership.is_leader
    services.storage = StorageService(settings, services.tokens, services.projects, clock)
    services.agents = AgentService(services, ExecutorService(services))  # htc agent, over HTTP
    services.allocation = AllocationService(  # Slurm pilot queues (docs/allocation.md)
        services,
        AllocStore(db),
        Slurm(),
        alloc_server_url(settings),
        settings.alloc_agent_command,
        settings.data_dir / "pilots",
    )
    return services


def alloc_server_url(settings: Settings) -> str:
    if settings.alloc_server_url:
        return settings.alloc_server_url.rstrip("/")
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "", "::") else settings.host
    return f"http://{host}:{settings.port}"


def limits_of(settings: Settings) -> Limits:
    return Limits(
        request_bytes=settings.max_request_bytes,
        string_chars=settings.max_string_chars,
        name_chars=settings.max_name_chars,
        description_chars=settings.max_description_chars,
        command_bytes=settings.max_command_bytes,
        envs_per_job=settings.max_envs_per_job,
        requests_per_call=settings.max_requests_per_call,
    )


def write_secret(path: Path, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(value + "\n")
    os.chmod(path, 0o600)


def bootstrap(services: ServiceSet) -> str | None:
    """First start: a workspace, an admin with an API key, and the local region.

    Returns the new admin key (also written to DATA_DIR/admin-api-key), or None if the
    installation already existed. Every start makes sure each workspace has the local region.
    """
    now = services.clock.now()
    accounts = services.accounts
    new_key = None
    if not accounts.workspaces():
        workspace_id = accounts.create_workspace(DEFAULT_WORKSPACE, now)
        user_id = accounts.create_user(
            workspace_id, ADMIN_EMAIL, "openhtc admin", Role.WORKSPACE_ADMIN.value, now
        )
        new_key = accounts.create_api_key(user_id, now, label="bootstrap admin key")
        write_secret(services.settings.data_dir / "admin-api-key", new_key)
    for ws in accounts.workspaces():
        accounts.ensure_region(ws.id, services.settings.region, [host_architecture()], "openhtc", now)
    return new_key


@dataclass
class Server:
    """A running control plane: services, scheduler and (optionally) the local executor."""

    services: ServiceSet
    scheduler: SchedulerLoop
    executor: LocalExecutor | None
    retention: RetentionSweeper
    storage_process: SeaweedFS | None = None  # --storage seaweedfs: the S3 server we supervise
    allocation: AllocationLoop | None = None  # submits Slurm pilots (leader only)
    statistics: StatisticsRefresher | None = None  # PostgreSQL: analyses tables grown in bursts

    def start(self) -> None:
        if isinstance(self.services.notify, ClusterNotifier):
            self.services.notify.start()
        if self.services.storage is not None:
            self.services.storage.open()  # creates the bucket if missing
        if self.services.registry is not None:
            self.services.registry.start()
        if self.executor is not None:
            # first: its registration recovers its own jobs knowing which may have started;
            # the scheduler's lease expiry would have to assume they all may have
            self.executor.start()
        self.scheduler.start()
        self.services.leadership.start()  # after the scheduler: it listens for taking the lead
        self.retention.start()
        if self.allocation is not None:
            self.allocation.start()
        if self.statistics is not None:
            self.statistics.start()

    def stop(self) -> None:
        began = time.monotonic()
        log.info("openhtc stopping")
        if self.executor is not None:
            self.executor.stop()
            self.executor.runtime.close()  # unmounts the bwrap runtime's scratch disks
        if self.allocation is not None:
            self.allocation.stop()
        self.retention.stop()
        if self.statistics is not None:
            self.statistics.stop()
        self.scheduler.stop()
        self.services.leadership.stop()  # after the singletons stopped: the next leader starts clean
        if self.services.registry is not None:
            self.services.registry.stop()
        if isinstance(self.services.notify, ClusterNotifier):
            self.services.notify.stop()
        self.services.db.dispose()
        if self.storage_process is not None:  # last: the executor uploads outputs until it stops
            self.storage_process.stop()
        log.info("openhtc stopped in %.1f s", time.monotonic() - began)


def job_endpoints(settings: Settings) -> list[Endpoint]:
    """What `--job-network openhtc` lets a job reach: the API, and the S3 store its tokens are for
    when its URL names an IPv4 address (SeaweedFS's is 127.0.0.1); jobs have no DNS."""
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "", "::") else settings.host
    urls = [f"http://{host}:{settings.port}"]
    if settings.storage != "local" and settings.s3_endpoint:
        urls.append(settings.s3_endpoint)
    endpoints = []
    for url in urls:
        endpoint = url_endpoint(url)
        if endpoint is not None:
            endpoints.append(endpoint)
        elif settings.job_network == "openhtc":
            log.warning("jobs cannot reach %s (not an IPv4 address): --job-network full can", url)
    return endpoints


def build_server(settings: Settings, clock: Clock | None = None) -> Server:
    storage_process, settings = start_managed_storage(settings)
    try:
        services = build_services(settings, clock)
        with bootstrap_lock(services.db):  # servers starting together: one creates the installation
            new_key = bootstrap(services)
    except BaseException:
        if storage_process is not None:
            storage_process.stop()
        raise
    if new_key:
        print(
            "openhtc: created the admin API key (shown once; also in "
            f"{settings.data_dir / 'admin-api-key'}):\n  {new_key}",
            file=sys.stderr,
            flush=True,
        )
    executor = None
    if settings.executor:
        runtime = build_runtime(
            settings.runtime,
            str(settings.data_dir / "work"),
            services.registry,  # the ImageSource container runtimes pull job images through
            image_cache_gib=settings.image_cache_gib,
            job_network=settings.job_network,
            job_endpoints=job_endpoints(settings),
            max_log_bytes=settings.max_log_bytes_per_job,
            launcher_dir=str(settings.data_dir / "executor" / "launchers"),
            adopt_seconds=_adopt_seconds(settings, services),
        )
        executor = LocalExecutor(
            services.agents.executors if services.agents else ExecutorService(services),
            runtime,
            settings,
            services.logs,
            services.wakeups,
            settings.region,
            [host_architecture()],
            stager=_stager(services),
            functions=_function_pool(services, runtime),
            lazy_journal=True,  # in-process: its register may say EveryAttempt
        )
    server = Server(services, SchedulerLoop(services), executor, RetentionSweeper(services), storage_process)
    if services.allocation is not None:
        server.allocation = AllocationLoop(services, services.allocation)
    if not services.db.is_sqlite and services.settings.planner_statistics_seconds > 0:
        server.statistics = StatisticsRefresher(services)
    return server


def _stager(services: ServiceSet) -> Stager | None:
    """The embedded executor's storage folders; with ``log_store = database`` it also tells the
    log mirror which attempts run (their files are copied to the database)."""
    stager = services.storage.stager() if services.storage else None
    if isinstance(services.logs, DatabaseLogs):
        return MirroringStager(stager or NoStager(), LogMirror(services.logs, services.notify))
    return stager


def _adopt_seconds(settings: Settings, services: ServiceSet) -> float:
    """How long launchers keep a crashed server's jobs. On PostgreSQL another server may expire
    this executor's leases meanwhile and run its jobs again: there the jobs must be gone before
    that can happen (a lease, less the heartbeat period it may have been renewed in, and a margin)."""
    wait = settings.executor_adopt_seconds
    if services.db.is_sqlite or wait <= 0:
        return wait
    bound = max(0.0, settings.lease_seconds - 2 * settings.heartbeat_seconds)
    if wait > bound:
        log.info(
            "executor_adopt_seconds %.0f s capped at %.0f s: with a shared database another "
            "server expires this executor's leases after lease_seconds (%.0f s)",
            wait,
            bound,
            settings.lease_seconds,
        )
    return min(wait, bound)


def _function_pool(services: ServiceSet, runtime: Runtime) -> FunctionPool:
    """Warm workers for function tasks (docs/functions.md), over the executor's runtime."""
    store = FunctionStore(services.db)
    settings = services.settings
    return FunctionPool(
        runtime,
        settings.data_dir / "functions",
        store.events,
        DatabaseResults(),
        result_max_bytes=settings.function_result_max_bytes,
        idle_seconds=settings.function_worker_idle_seconds,
        max_idle=settings.max_running_jobs,
        max_log_bytes=settings.max_log_bytes_per_job,
        window=settings.function_worker_window,
    )


def serve(settings: Settings) -> None:
    """Run the API, scheduler and local executor until interrupted.

    Raises StartupError (one clear message) for what an operator must fix: settings that would
    be ignored, a port in use, a data directory another server owns or that cannot be written,
    a database that cannot be opened. The checks come in that order, before anything is made.
    """
    import uvicorn

    from openhtc.api.app import create_app
    from openhtc.ui import install as install_dashboard

    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    check_settings(settings)
    lock = DataDirLock(settings.data_dir)
    database = sqlite_file(settings)
    sqlite_lock = SqliteLock(database) if database is not None else None
    try:
        if settings.data_dir.is_dir():  # an existing directory: its owner is the first thing to know
            lock.acquire(settings.host, settings.port)
        listener = bind_listener(settings.host, settings.port)
        try:
            if not settings.data_dir.is_dir():
                lock.acquire(settings.host, settings.port)
            if sqlite_lock is not None:
                sqlite_lock.acquire(settings.host, settings.port)
            server = _build_or_explain(settings)
            app = create_app(server.services, extensions=[install_dashboard])  # the dashboard: /ui/
            _run(server, app, listener, uvicorn)
        finally:
            listener.close()
    finally:
        if sqlite_lock is not None:
            sqlite_lock.release()
        lock.release()


def _build_or_explain(settings: Settings) -> Server:
    try:
        server = build_server(settings)
    except (DBAPIError, OpenHTCError) as exc:
        raise StartupError(explain_database_failure(settings, exc)) from None
    except OSError as exc:
        where = exc.filename or settings.data_dir
        raise StartupError(
            f"cannot write {where}: {exc.strerror or exc}; fix its permissions or free space, "
            "or choose another --data-dir"
        ) from None
    runtime = server.executor.runtime.name if server.executor else "none (--no-executor)"
    lines = describe(server.services.settings, runtime)  # with a managed SeaweedFS: its endpoint
    log.info("openhtc %s\n  %s", __version__, "\n  ".join(lines))
    return server


def _run(server: Server, app: Any, listener: socket.socket, uvicorn: Any) -> None:
    # uvicorn re-raises SIGTERM once it has shut down, with the handler it found: without one of
    # ours the process would die right there, skipping server.stop() below (executor, runtime
    # mounts, registry). Exiting normally instead runs it.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    server.start()
    settings = server.services.settings
    try:
        config = uvicorn.Config(
            app,
            host=settings.host,
            port=settings.port,
            log_level="warning" if settings.log_level == "info" else settings.log_level,
            access_log=False,
            # a backstop: open waits and streams end as the notifier closes (_Uvicorn.shutdown)
            timeout_graceful_shutdown=GRACEFUL_SECONDS,
        )
        notify = server.services.notify

        class _Uvicorn(uvicorn.Server):
            async def shutdown(self, sockets: Any = None) -> None:
                # uvicorn waits for every response in progress: long polls and streams first
                # answer (the notifier wakes them all and they see it closing)
                notify.close()
                await super().shutdown(sockets)

        _Uvicorn(config).run(sockets=[listener])  # the socket bound at start-up
    finally:
        if server.executor is not None:
            handler = _on_signal_while_stopping(server.executor)
            signal.signal(signal.SIGTERM, handler)
            signal.signal(signal.SIGINT, handler)
        server.stop()


def _on_signal_while_stopping(executor: LocalExecutor) -> Callable[..., None]:
    """A second SIGTERM or Ctrl-C kills the running jobs now (no more grace); a third leaves."""
    hurried = False

    def handle(*_: object) -> None:
        nonlocal hurried
        if hurried:
            sys.exit(1)
        hurried = True
        executor.hurry()

    return handle
