"""The scheduler loop: writes the rows of large submits, admits held jobs under the vCPU limits
and recovers expired leases."""

from __future__ import annotations

import logging
import threading
import time

from openhtc.domain.errors import InsufficientStorage, Unavailable
from openhtc.services.notify import EVERYTHING
from openhtc.services.service_set import ServiceSet

log = logging.getLogger("openhtc.scheduler")


class SchedulerLoop:
    def __init__(self, services: ServiceSet) -> None:
        self.services = services
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="scheduler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self.services.wakeups.schedule_round.set()
        self._thread.join(timeout=10)

    def tick(self) -> int:
        """One round: write one chunk of missing job rows, then admit as much as the limits allow."""
        s = self.services
        if s.jobs.materialize():
            s.wakeups.queued()  # new rows to claim
            s.wakeups.schedule_round.set()  # and another round at once, until all are written
        admitted = 0
        while not self._stopping.is_set():
            n = s.queue.admit(s.clock.now(), s.settings.admission_chunk)
            admitted += n
            if n:
                s.wakeups.queued()
            if n < s.settings.admission_chunk:
                break
        return admitted

    def _run(self) -> None:
        s = self.services
        next_expiry = next_liveness = 0.0
        while not self._stopping.is_set():
            s.wakeups.schedule_round.wait(timeout=1.0)
            try:
                self.tick()
                now = time.monotonic()
                if now >= next_expiry:
                    if (expired := s.queue.expire_leases(s.clock.now())).changes:
                        s.metrics.jobs.leases_expired(expired)
                        s.wakeups.schedule_round.set()
                        s.notify.publish((EVERYTHING,))  # recovered jobs: waiters look again
                    next_expiry = now + max(1.0, s.settings.lease_seconds / 4)
                if s.agents is not None and now >= next_liveness:
                    s.agents.check_liveness()  # agents silent past their liveness are lost
                    next_liveness = now + max(0.5, s.settings.agent_liveness_seconds / 8)
            except (Unavailable, InsufficientStorage) as exc:  # an outage: one line, not a traceback
                log.warning("scheduler: %s", exc.message)
                time.sleep(0.5)
            except Exception:
                log.exception("scheduler loop error")
                time.sleep(0.5)
