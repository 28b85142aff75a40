"""``htc agent``: build the local executor over the HTTP transport, run it until SIGTERM.

The agent is the embedded executor (executor/local.py: claims, prefetch, journal, runtimes,
clean stop) with another transport; only what is remote differs: reports buffered on disk,
logs shipped, images pulled with the lease's token from the advertised registry.

SIGTERM drains: no new claims, running jobs finish (up to ``drain_seconds``), their ends are
reported, then the agent exits. A second SIGTERM (or Ctrl-C) kills what still runs, reports it
as an infrastructure fault, and exits.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from typing import Any
from urllib.parse import urlsplit

from openhtc import __version__
from openhtc.agent.functions import AgentFunctions
from openhtc.agent.logship import LogShipper
from openhtc.agent.outbox import Outbox
from openhtc.agent.settings import AgentSettings
from openhtc.agent.storage import LeaseStager
from openhtc.agent.transport import HttpTransport
from openhtc.agent.workdir import claim_work_dir, legacy_agent_id
from openhtc.config import Settings
from openhtc.domain.allocation import DRAIN_BEFORE_END, ENDS_AT_LABEL
from openhtc.domain.errors import ImageUnavailable
from openhtc.executor.capacity import host_architecture
from openhtc.executor.local import LocalExecutor
from openhtc.functions.pool import FunctionPool
from openhtc.registry.service import split_image
from openhtc.runtimes import build_runtime
from openhtc.runtimes.base import ImagePull
from openhtc.runtimes.jobnet import url_endpoint
from openhtc.services.logs import LogStore
from openhtc.services.wakeups import Wakeups

log = logging.getLogger("openhtc.agent")


class LeaseImages:
    """ImageSource for container runtimes: the advertised registry, with the token of the lease."""

    def __init__(self, transport: HttpTransport) -> None:
        self.transport = transport

    def pull_access(self, project_id: str, image_name: str) -> ImagePull:
        token = self.transport.pull_tokens.get((project_id, image_name))
        host = self.transport.registry_host
        if token is None or host is None:
            raise ImageUnavailable(f"no registry pull token for {image_name} (the server has no registry)")
        repo, tag = split_image(image_name)
        repository = f"{project_id}/{repo}"
        return ImagePull(
            registry_url=f"http://{host}",
            reference=f"{host}/{repository}:{tag}",
            repository=repository,
            tag=tag,
            username="openhtc-executor",
            password=token,
            insecure=True,
        )


AGENT_PREFETCH_SECONDS = 1.0
# At most this many jobs held beyond what runs: an agent's crash fails the ones it journaled
# ahead (infrastructure faults), and a hoard keeps work from the rest of the fleet.
AGENT_PREFETCH_MAX = 256


def build_agent(
    settings: AgentSettings, agent_id: str | None = None
) -> tuple[LocalExecutor, HttpTransport, LogShipper, Outbox]:
    """``agent_id``: the id of the work directory (agent/workdir.py), which the caller holds locked."""
    work = settings.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    executor_settings = Settings.model_validate(
        {
            "data_dir": work,
            "region": settings.region,
            "runtime": settings.runtime,
            "executor_vcpus": settings.vcpus,
            "executor_memory_mb": settings.memory_mb,
            "executor_stop_grace_seconds": settings.drain_seconds,
            "max_running_jobs": settings.max_running_jobs,
            # a claim is a round trip to the server (tens of ms, more under load), not an
            # in-process call: hold about a second of work, so short jobs never wait for one
            "executor_prefetch_seconds": AGENT_PREFETCH_SECONDS,
            "executor_prefetch_max": AGENT_PREFETCH_MAX,
        }
    )
    outbox = Outbox(work / "agent" / "reports.jsonl", settings.max_buffered_reports)
    outbox.open()
    labels = settings.label_map()
    if settings.time_limit is not None:  # the server gives it only jobs that fit (issue 17)
        labels[ENDS_AT_LABEL] = str(int(time.time()) + settings.time_limit)
    transport = HttpTransport(
        settings.server,
        settings.token,
        outbox,
        labels=labels,
        runtime=settings.runtime,
        version=__version__,
    )
    endpoint = url_endpoint(settings.server)
    runtime = build_runtime(
        settings.runtime,
        str(work / "work"),
        LeaseImages(transport),
        job_network=settings.job_network,
        job_endpoints=[endpoint] if endpoint is not None else [],
        max_log_bytes=executor_settings.max_log_bytes_per_job,
    )
    logs = LogStore(work / "logs")
    wakeups = Wakeups()
    # function calls in warm workers, as on the embedded executor; events and results travel
    # with leases and reports (agent/functions.py)
    functions = AgentFunctions(settings.server)
    pool = FunctionPool(
        runtime,
        work / "functions",
        functions.events,
        functions,
        result_max_bytes=executor_settings.function_result_max_bytes,
        idle_seconds=executor_settings.function_worker_idle_seconds,
        max_idle=executor_settings.max_running_jobs,
        max_log_bytes=executor_settings.max_log_bytes_per_job,
    )
    functions.pool = pool
    transport.functions = functions
    # PROJECT_SHARED_FOLDER and TASK_SHARED_FOLDER through the server's object API
    stager = LeaseStager(f"{settings.server}/api/v1", work / "storage", settings.shared_ttl_seconds)
    executor = LocalExecutor(
        transport,
        runtime,
        executor_settings,
        logs,
        wakeups,
        settings.region,
        [host_architecture()],
        functions=pool,
        executor_id=agent_id or legacy_agent_id(str(work)),
        stager=stager,
        # no sync before a hand-off: after a crash of its machine the agent registers saying its
        # journal cannot tell (journal_untrusted), and the server recovers every attempt it held
        # as one that may have started; an older server, which would not, gets a synced journal
        lazy_journal=True,
    )
    transport.journal = executor.journal
    # what it holds, and what ended since the last flush (its reports not in the outbox yet): a
    # lease the agent does not list is re-queued as never received, and a function call can
    # start and end between two exchanges
    transport.held = lambda: executor.held() + executor.reporting()
    transport.idle = executor.idle
    transport.want = executor.want  # an exchange of reports claims too
    transport.on_leases = executor.leased
    transport.on_kill = wakeups.cancel  # the executor's next turn heartbeats and kills
    shipper = LogShipper(transport, logs, executor.held)
    stager.after_finish = shipper.flush  # an attempt's last lines reach the server before its end
    return executor, transport, shipper, outbox


def _until_stopped(
    stop: threading.Event, settings: AgentSettings, executor: LocalExecutor, transport: HttpTransport
) -> None:
    """Until SIGTERM; or, with ``--time-limit``, a minute before its allocation ends; or, with
    ``--idle-timeout``, once it has held no job that long (then the agent drains and exits)."""
    ends_at = transport.labels.get(ENDS_AT_LABEL)
    drain_at = float(ends_at) - DRAIN_BEFORE_END if ends_at is not None else None
    last_busy = time.monotonic()
    while not stop.wait(1.0):
        if executor.held():
            last_busy = time.monotonic()
        if drain_at is not None and time.time() >= drain_at:
            log.info("agent: its allocation ends in %d s", DRAIN_BEFORE_END)
            return
        if settings.idle_timeout is not None and time.monotonic() - last_busy >= settings.idle_timeout:
            log.info("agent: idle for %d s: leaving", settings.idle_timeout)
            return


def run_agent(settings: AgentSettings) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per exchange
    stop = threading.Event()
    signals = {"count": 0}
    executor_box: dict[str, Any] = {}

    def on_signal(*_: object) -> None:
        signals["count"] += 1
        stop.set()
        if signals["count"] == 2 and "executor" in executor_box:
            log.warning("agent: second signal: killing the running jobs")
            executor_box["executor"].hurry()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    agent_id, _lock = claim_work_dir(settings.work_dir.resolve())  # WorkDirTaken: exit 2
    executor, transport, shipper, outbox = build_agent(settings, agent_id)
    executor_box["executor"] = executor
    log.info(
        "htc agent %s: %s in %s, %d vCPUs, runtime %s, server %s (%s)",
        __version__,
        executor.executor_id,
        settings.region,
        executor.capacity.vcpus,
        executor.runtime.name,
        settings.server,
        urlsplit(settings.server).netloc,
    )
    executor.start()
    shipper.start()
    try:
        _until_stopped(stop, settings, executor, transport)
    finally:
        log.info("agent: draining (no new jobs; a second SIGTERM kills the running ones)")
        transport.draining = True
        transport.interrupt()  # a long poll in progress answers now
        executor.stop()
        shipper.stop()
        if len(outbox):  # the last ends: one more try before leaving (they stay on disk anyway)
            transport.heartbeat(executor.executor_id, [])
        outbox.close()
        transport.close()
        if transport.functions is not None:
            transport.functions.close()
        executor.runtime.close()
        log.info("agent: stopped (%d report(s) left to send at the next start)", len(outbox))
