"""Prometheus metrics of one server process, in a registry the composition root builds.

Served at ``/htc/metrics`` after Rescale's workspace gauges (docs/metrics.md). Three kinds:

- server-wide families (:meth:`Metrics.server_families`): job transitions, queue wait and run
  time, claims, reports, lease expiries, executors by state, HTTP and database latency. None has
  a job, task, project or workspace label.
- per-project families (:meth:`Metrics.project_families`): vCPU-seconds, shown only for the
  projects of the caller's workspace.
- Rescale's own gauges, computed per request from ``job_counters`` (api/routes/system.py).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from openhtc.metrics.jobs import JobMetrics

__all__ = ["EXECUTOR_STATES", "JobMetrics", "Metrics"]

EXECUTOR_STATES = ("online", "lost")
# seconds: a cached token check answers in well under a millisecond, a million-job submit in tens
LATENCY_BOUNDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

# (state, executors, vCPUs) rows, read from the executors table at scrape time
ExecutorCounts = Callable[[], Iterable[tuple[str, int, int]]]


class Metrics:
    """The metrics one server process keeps. ``executors`` reads the executors by state."""

    def __init__(self, executors: ExecutorCounts | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.jobs = JobMetrics()
        self._executors = executors
        self.leader: Callable[[], bool] = lambda: True  # set by the composition root (leadership)
        self.http_latency = Histogram(
            "openhtc_http_request_duration_seconds",
            "Time from a request's arrival to its response's first byte, by route template",
            ["method", "route"],
            buckets=LATENCY_BOUNDS,
            registry=self.registry,
        )
        self.http_requests = Counter(
            "openhtc_http_requests",
            "HTTP requests answered, by route template and status code",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.db_latency = Histogram(
            "openhtc_db_transaction_duration_seconds",
            "Database transactions, from BEGIN to COMMIT or ROLLBACK, by kind (read or write)",
            ["kind"],
            buckets=LATENCY_BOUNDS,
            registry=self.registry,
        )
        self._db_children = {kind: self.db_latency.labels(kind) for kind in ("read", "write")}
        # the agents' group commit (services/group_commit.py): calls per group is its batching
        self.agent_groups = Counter(
            "openhtc_agent_exchange_groups",
            "Groups the agents' exchanges were served in (one read, at most one write transaction each)",
            registry=self.registry,
        )
        self.agent_group_calls = Counter(
            "openhtc_agent_exchange_group_calls",
            "Agent exchanges and woken long polls' claims served in those groups",
            registry=self.registry,
        )
        self.registry.register(_ServerCollector(self))

    def db_transaction(self, kind: str, seconds: float) -> None:
        """The database's hook (Database.observer): one transaction of ``kind`` took ``seconds``."""
        self._db_children[kind].observe(seconds)

    def set_executor_counts(self, executors: ExecutorCounts) -> None:
        self._executors = executors

    def executor_counts(self) -> list[tuple[str, int, int]]:
        return list(self._executors()) if self._executors is not None else []

    # -- exposition -----------------------------------------------------------------------------

    def server_families(self) -> bytes:
        """The server-wide families in Prometheus text format."""
        return generate_latest(self.registry)

    def project_families(self, project_ids: Collection[str]) -> bytes:
        """The per-project families, for ``project_ids`` only (the caller's workspace)."""
        registry = CollectorRegistry(auto_describe=True)
        registry.register(_ProjectCollector(self.jobs, project_ids))
        return generate_latest(registry)


class _ServerCollector(Collector):
    """Families computed when scraped: job counts from JobMetrics, executors from the store."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily | HistogramMetricFamily]:
        snap = self.metrics.jobs.snapshot()
        transitions = CounterMetricFamily(
            "openhtc_job_transitions",
            "Job status changes, by the status entered and (for FAILED) the failure code",
            labels=["status", "failure_code"],
        )
        for (status, code), n in sorted(snap.transitions.items()):
            transitions.add_metric([status, code], n)
        yield transitions
        for name, doc, (buckets, total) in (
            (
                "openhtc_job_queue_wait_seconds",
                "Time from a job's submission to its first claim by an executor",
                snap.queue_wait,
            ),
            (
                "openhtc_job_run_seconds",
                "Time from a job attempt's RUNNING report to its SUCCEEDED or FAILED report",
                snap.run_time,
            ),
        ):
            family = HistogramMetricFamily(name, doc)
            family.add_metric([], buckets, total)
            yield family
        yield CounterMetricFamily(
            "openhtc_executor_claims", "Claim calls made by executors", value=snap.claim_calls
        )
        yield CounterMetricFamily(
            "openhtc_executor_claimed_jobs", "Jobs handed to executors by claims", value=snap.claimed_jobs
        )
        yield CounterMetricFamily(
            "openhtc_executor_reports", "Attempt status reports received from executors", value=snap.reports
        )
        yield CounterMetricFamily(
            "openhtc_lease_expiries",
            "Jobs recovered because their executor stopped renewing its lease",
            value=snap.lease_expiries,
        )
        executors = GaugeMetricFamily(
            "openhtc_executors",
            "Registered executors: online (heard from within lease_seconds) or lost",
            labels=["state"],
        )
        vcpus = GaugeMetricFamily(
            "openhtc_executor_vcpus", "vCPUs the registered executors offer, by state", labels=["state"]
        )
        found = {state: (n, cpu) for state, n, cpu in self.metrics.executor_counts()}
        for state in EXECUTOR_STATES:
            n, cpu = found.get(state, (0, 0))
            executors.add_metric([state], n)
            vcpus.add_metric([state], cpu)
        yield executors
        yield vcpus
        yield GaugeMetricFamily(
            "openhtc_leader",
            "1 while this server leads (runs the scheduler, lease expiry and retention), else 0",
            value=1 if self.metrics.leader() else 0,
        )


class _ProjectCollector(Collector):
    def __init__(self, jobs: JobMetrics, project_ids: Collection[str]) -> None:
        self.jobs = jobs
        self.project_ids = project_ids

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            "openhtc_vcpu_seconds",
            "vCPU-seconds used by finished job attempts (vCPUs x run time), by project",
            labels=["project_id"],
        )
        for project_id, seconds in sorted(self.jobs.snapshot().vcpu_seconds.items()):
            if project_id in self.project_ids:
                family.add_metric([project_id], seconds)
        yield family
