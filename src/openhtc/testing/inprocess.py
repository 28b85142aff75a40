"""openhtc's services in this process, on a fresh database, with no threads: tests drive them.

The store-level tests (transitions, late materialization, retention) share this harness: the
services built as ``htc server`` builds them, the bootstrap (workspace, admin), and an executor
registered by hand, so a test submits, claims and reports exactly when it chooses.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from openhtc.auth.tokens import Principal
from openhtc.config import Settings
from openhtc.domain.clock import Clock
from openhtc.domain.enums import JobStatus
from openhtc.domain.models import AttemptReport, Capacity, JobLaunch
from openhtc.services.executors import ExecutorService
from openhtc.services.service_set import ServiceSet
from openhtc.services.submission import submit
from openhtc.wiring import bootstrap, build_services

REGION = "AWS_US_EAST_1"
EXECUTOR = "ex-1"
EXECUTOR_CAPACITY = Capacity(64, 1 << 20)


@contextmanager
def in_process_services(
    data_dir: Path, database_url: str | None, clock: Clock | None = None, **settings: Any
) -> Iterator[ServiceSet]:
    """The services on a fresh database (SQLite in ``data_dir`` when ``database_url`` is None),
    with no executor and no runtime: the caller plays both. Disposed of on exit."""
    values: dict[str, Any] = {"executor": False, "runtime": "noop", **settings}
    services = build_services(Settings(data_dir=data_dir, database_url=database_url, **values), clock)
    try:
        yield services
    finally:
        services.db.dispose()


class StoreHarness:
    """Bootstrapped services, the workspace admin, and an executor (``ex-1``) that claims and
    reports by hand."""

    def __init__(self, services: ServiceSet, *, capacity: Capacity = EXECUTOR_CAPACITY) -> None:
        self.services = services
        bootstrap(services)
        ws = services.accounts.workspaces()[0]
        self.workspace_id = ws.id
        user = services.accounts.user_by_email(ws.id, "admin@localhost")
        assert user is not None, "bootstrap made no admin user"
        self.who = Principal(user_id=user.id, workspace_id=ws.id, role=user.role)
        self.region = services.settings.region
        self.capacity = capacity
        self.executor = ExecutorService(services)
        self.executor.register(EXECUTOR, "inc-1", self.region, ["X86"], capacity)

    # -- projects, tasks, jobs ----------------------------------------------------------------

    def create_project(self, name: str | None = None) -> Any:
        return self.services.projects.create(
            self.workspace_id,
            name or f"p-{uuid.uuid4().hex[:6]}",
            "",
            [self.region],
            None,
            self.who.user_id,
            self.services.clock.now(),
        )

    def create_task(self, project: Any, name: str = "t") -> Any:
        return self.services.projects.create_task(
            project, name, "", self.who.user_id, self.services.clock.now()
        )

    def reload_task(self, task: Any) -> Any:
        row = self.services.projects.task(task.project_id, task.id)
        assert row is not None, f"task {task.id} is gone"
        return row

    @staticmethod
    def job_request(n: int = 1, name: str = "j", **definition: Any) -> dict[str, Any]:
        """One HTCJobSubmitRequest of ``n`` one-vCPU jobs running ``true``."""
        return {
            "jobName": name,
            "batchSize": n,
            "regions": [REGION],
            "htcJobDefinition": {
                "imageName": "busybox:latest",
                "commands": ["true"],
                "maxVCpus": 1,
                "maxMemory": 64,
                "architecture": "X86",
                **definition,
            },
        }

    def submit(self, project: Any, task: Any, *requests: dict[str, Any]) -> list[dict[str, Any]]:
        return submit(self.services, self.who, project, self.reload_task(task), list(requests), None)

    def claim(self, max_jobs: int) -> list[JobLaunch]:
        return self.executor.claim(EXECUTOR, self.region, ["X86"], self.capacity, max_jobs)

    def succeed(self, launches: list[JobLaunch]) -> None:
        """Report each claimed attempt STARTING, RUNNING, then SUCCEEDED with exit code 0."""
        now = self.services.clock.now()
        path = (JobStatus.STARTING, JobStatus.RUNNING, JobStatus.SUCCEEDED)
        self.executor.report(
            EXECUTOR,
            [
                AttemptReport(j.job_id, j.attempt, s, now, exit_code=0 if s is JobStatus.SUCCEEDED else None)
                for j in launches
                for s in path
            ],
        )

    # -- reading the database ------------------------------------------------------------------

    def sql(self, statement: str, *params: Any) -> list[tuple[Any, ...]]:
        """Rows of a read-only statement written with ``?`` placeholders (both databases)."""
        db = self.services.db
        with db.read() as conn:
            return [tuple(row) for row in conn.exec_driver_sql(db.sql(statement), params).all()]

    def counters(self, task_id: str) -> dict[int, int]:
        """The task's non-zero job counters, by status number."""
        rows = self.sql("SELECT status, count FROM job_counters WHERE task_id = ?", task_id)
        return {status: count for status, count in rows if count}
