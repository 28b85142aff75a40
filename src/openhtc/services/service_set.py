"""The services one server process shares, built once by the composition root (openhtc.wiring): a
plain bag of the stores and services, passed to the loops and the API."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from openhtc.auth.tokens import TokenService
from openhtc.config import Settings
from openhtc.domain.clock import Clock
from openhtc.domain.limits import Limits
from openhtc.metrics import Metrics
from openhtc.services.logs import LogStore
from openhtc.services.logwatch import LogWatch
from openhtc.services.notify import EVERYTHING, LocalNotifier, Notifier
from openhtc.services.wakeups import Wakeups
from openhtc.store.accounts import AccountStore
from openhtc.store.db import Database
from openhtc.store.jobs import JobStore
from openhtc.store.projects import ProjectStore
from openhtc.store.queue import QueueStore

if TYPE_CHECKING:
    from openhtc.registry import Registry
    from openhtc.services.storage import StorageService


@dataclass
class ServiceSet:
    settings: Settings
    clock: Clock
    db: Database
    accounts: AccountStore
    projects: ProjectStore
    jobs: JobStore
    queue: QueueStore
    tokens: TokenService
    logs: LogStore
    wakeups: Wakeups
    # The container registry (None only where a caller builds ServiceSet by hand).
    registry: Registry | None = None
    # True when jobs run from registry images (bwrap, podman): submissions then need them.
    images_required: bool = False
    # Project and task storage (None only where a caller builds ServiceSet by hand).
    storage: StorageService | None = None
    # Request limits (config: max_*), enforced at the API's edge and in validation.
    limits: Limits = field(default_factory=Limits)
    # Clients that wait (openhtc's /openhtc/v1 routes) are told of committed changes here.
    notify: Notifier = field(default_factory=LocalNotifier)
    logwatch: LogWatch = field(default_factory=LogWatch)  # log streams: when a followed log grows

    # Prometheus metrics of this process (served at /htc/metrics; docs/metrics.md).
    metrics: Metrics = field(default_factory=Metrics)
    # services.agents.AgentService: the executor protocol for `htc agent` over HTTP (None where a
    # caller builds ServiceSet by hand). Typed loosely: it is built on this bag (no import cycle).
    agents: Any = None

    def __post_init__(self) -> None:
        # A cancel changes jobs of a task in bulk: every waiter looks again (cancels are rare).
        self.wakeups.on_cancel(lambda: self.notify.publish((EVERYTHING,)))
