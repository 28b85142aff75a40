"""One periodic loop for the server's singletons: a thread that calls :meth:`LeaderLoop.round`
every ``period`` seconds while this server leads (services/leadership.py), logging a round that
fails and going on. Retention (services/retention.py), allocation queues
(services/allocation.py) and the planner statistics' refresh (below) are such loops; tests call
their rounds directly instead."""

from __future__ import annotations

import logging
import threading

from openhtc.services.service_set import ServiceSet
from openhtc.store.planner_stats import PlannerStatistics

_statistics_log = logging.getLogger("openhtc.statistics")


class LeaderLoop:
    """Subclasses set ``name`` (the thread's, and the log's words) and implement :meth:`round`."""

    name = "periodic"

    def __init__(self, services: ServiceSet, period: float, log: logging.Logger) -> None:
        self.services = services
        self.period = period
        self.log = log
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def round(self) -> None:
        raise NotImplementedError

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stopping.wait(self.period):
            if not self.services.leadership.is_leader:  # one server runs it
                continue
            try:
                self.round()
            except Exception:
                self.log.exception("%s round failed", self.name)


class StatisticsRefresher(LeaderLoop):
    """Keeps PostgreSQL's planner statistics in step with bursts of jobs (store/planner_stats.py)."""

    name = "planner-statistics"

    def __init__(self, services: ServiceSet) -> None:
        super().__init__(services, services.settings.planner_statistics_seconds, _statistics_log)
        self.statistics = PlannerStatistics(services.db)

    def round(self) -> None:
        analysed = self.statistics.refresh()
        if analysed:
            self.log.debug("analysed %s", ", ".join(analysed))
