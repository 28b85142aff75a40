"""Task retention: the pure rule, and the sweep in-process on SQLite and PostgreSQL.

The sweep is driven by hand with an injected clock: nothing here waits for real time to pass.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from openhtc.domain.clock import Clock
from openhtc.domain.enums import LifecycleStatus
from openhtc.services.retention import (
    Action,
    RetentionPolicy,
    RetentionSweeper,
    TaskFacts,
    decide,
    effective_policy,
)
from openhtc.services.service_set import ServiceSet
from openhtc.services.shared_logs import DatabaseLogs
from openhtc.services.tasks import delete_task
from openhtc.testing.inprocess import StoreHarness, in_process_services

HOUR = 3600.0
REGION = "AWS_US_EAST_1"
ACTIVE, ARCHIVED = LifecycleStatus.ACTIVE.value, LifecycleStatus.ARCHIVED.value


# -- the pure rule ------------------------------------------------------------------------------


def facts(status: str = ACTIVE, last_active: float = 0.0, archived: float | None = None, busy: int = 0):
    return TaskFacts(status, last_active, archived, busy)


@pytest.mark.unit
def test_archive_is_due_after_archive_after_hours_of_inactivity() -> None:
    policy = RetentionPolicy(archive_after_hours=2, delete_after_hours=0)
    assert decide(policy, facts(last_active=0), 2 * HOUR - 1) is Action.NONE
    assert decide(policy, facts(last_active=0), 2 * HOUR) is Action.ARCHIVE


@pytest.mark.unit
def test_a_busy_task_is_kept_active_and_its_activity_recorded() -> None:
    policy = RetentionPolicy(archive_after_hours=1, delete_after_hours=1)
    assert decide(policy, facts(last_active=0, busy=3), 10 * HOUR) is Action.TOUCH
    assert decide(policy, facts(last_active=10 * HOUR, busy=3), 10 * HOUR) is Action.NONE
    busy_archived = facts(ARCHIVED, archived=0, busy=1)
    assert decide(policy, busy_archived, 10 * HOUR) is Action.NONE


@pytest.mark.unit
def test_delete_is_due_delete_after_hours_after_archiving() -> None:
    policy = RetentionPolicy(archive_after_hours=0, delete_after_hours=3)
    assert decide(policy, facts(ARCHIVED, archived=HOUR), 4 * HOUR - 1) is Action.NONE
    assert decide(policy, facts(ARCHIVED, archived=HOUR), 4 * HOUR) is Action.DELETE
    # deletion only ever follows archiving
    assert decide(policy, facts(ACTIVE, last_active=0), 100 * HOUR) is Action.NONE


@pytest.mark.unit
def test_zero_disables_a_step() -> None:
    off = RetentionPolicy(0, 0)
    assert decide(off, facts(last_active=0), 1e9) is Action.NONE
    assert decide(off, facts(ARCHIVED, archived=0), 1e9) is Action.NONE
    assert decide(None, facts(last_active=0), 1e9) is Action.NONE


@pytest.mark.unit
def test_a_project_policy_is_used_whole_over_the_workspace_policy() -> None:
    workspace = RetentionPolicy(archive_after_hours=1, delete_after_hours=1)
    project = RetentionPolicy(archive_after_hours=0, delete_after_hours=5)
    assert effective_policy(project, workspace) == project
    assert effective_policy(None, workspace) == workspace
    assert effective_policy(None, None) is None
    # the project's 0 switches archiving off even though the workspace would archive
    assert decide(effective_policy(project, workspace), facts(last_active=0), 50 * HOUR) is Action.NONE


# -- the sweep against a real database ------------------------------------------------------------


class ManualClock(Clock):
    def __init__(self, start: float) -> None:
        self.t = start

    def now(self) -> float:
        return self.t

    def advance(self, hours: float) -> None:
        self.t += hours * HOUR


class World:
    """The services on a fresh database, a workspace admin, and helpers to make tasks and jobs."""

    def __init__(self, services: ServiceSet, clock: ManualClock) -> None:
        self.services = services
        self.clock = clock
        self.sweeper = RetentionSweeper(services)
        self.store = StoreHarness(services)
        self.workspace_id = self.store.workspace_id

    def project(self) -> Any:
        return self.store.create_project()

    def task(self, project: Any) -> Any:
        return self.store.create_task(project)

    def reload(self, task: Any) -> Any:
        return self.store.reload_task(task)

    def status(self, task: Any) -> str:
        return str(self.reload(task).lifecycle_status)

    def submit(self, project: Any, task: Any, n: int = 1) -> None:
        self.store.submit(project, task, self.store.job_request(n))

    def run_all(self) -> None:
        """Claim every queued job and report it SUCCEEDED, as an executor would."""
        claimed = self.store.claim(1000)
        assert claimed
        self.store.succeed(claimed)

    def workspace_policy(self, archive: int, delete: int) -> None:
        self.services.accounts.update_workspace(
            self.workspace_id,
            retention_archive_after=archive,
            retention_delete_after=delete,
            retention_created_at=self.clock.now(),
        )

    def project_policy(self, project: Any, archive: int, delete: int) -> None:
        self.services.projects.update(
            project.id,
            retention_archive_after=archive,
            retention_delete_after=delete,
            retention_created_at=self.clock.now(),
        )


@pytest.fixture
def world(tmp_path: Path, db_url: str | None) -> Iterator[World]:
    clock = ManualClock(1_800_000_000.0)
    with in_process_services(tmp_path / "data", db_url, clock, runtime="process") as services:
        yield World(services, clock)


def test_sweep_archives_after_inactivity_then_deletes_after_the_grace_period(world: World) -> None:
    world.workspace_policy(archive=24, delete=48)
    project = world.project()
    task = world.task(project)

    world.clock.advance(23.9)
    assert world.sweeper.sweep().archived == 0
    assert world.status(task) == ACTIVE

    world.clock.advance(0.1)
    assert world.sweeper.sweep().archived == 1
    row = world.reload(task)
    assert row.lifecycle_status == ARCHIVED and row.archived_at == world.clock.now()

    world.clock.advance(47.9)
    assert world.sweeper.sweep().deleted == 0
    world.clock.advance(0.1)
    assert world.sweeper.sweep().deleted == 1
    row = world.reload(task)
    assert row.lifecycle_status == LifecycleStatus.DELETED.value and row.deleted_at == world.clock.now()
    # a deleted task is left alone afterwards
    world.clock.advance(1000)
    assert world.sweeper.sweep() == type(world.sweeper.sweep())()


def test_auto_delete_frees_the_tasks_storage_and_cancels_nothing_running(world: World) -> None:
    world.workspace_policy(archive=1, delete=1)
    project = world.project()
    doomed, other = world.task(project), world.task(project)
    storage = world.services.storage
    assert storage is not None
    backend = storage.backend
    keys = {
        doomed: f"projects/{project.id}/tasks/{doomed.id}/out/result.txt",
        other: f"projects/{project.id}/tasks/{other.id}/out/result.txt",
    }
    shared = f"projects/{project.id}/shared/input.txt"
    for key in [*keys.values(), shared]:
        upload = backend.begin_put(key)
        upload.write(b"data")
        upload.commit()
    world.submit(project, other)  # busy: stays active, keeps its storage

    world.clock.advance(1)
    world.sweeper.sweep()
    world.clock.advance(1)
    assert world.sweeper.sweep().deleted == 1
    assert world.status(doomed) == LifecycleStatus.DELETED.value
    assert backend.list(f"projects/{project.id}/tasks/{doomed.id}/", None, 10) == []
    assert [o.key for o in backend.list(f"projects/{project.id}/", None, 10)] == sorted([keys[other], shared])
    assert world.status(other) == ACTIVE


def test_a_submit_restarts_the_inactivity_clock(world: World) -> None:
    world.workspace_policy(archive=10, delete=0)
    project = world.project()
    task = world.task(project)
    world.clock.advance(8)
    world.submit(project, task)
    world.run_all()
    world.clock.advance(8)  # 16 h since creation, 8 h since the submit
    world.sweeper.sweep()
    assert world.status(task) == ACTIVE
    world.clock.advance(2)
    world.sweeper.sweep()
    assert world.status(task) == ARCHIVED


def test_a_task_with_unfinished_jobs_is_not_archived_and_counts_as_active(world: World) -> None:
    world.workspace_policy(archive=1, delete=1)
    project = world.project()
    task = world.task(project)
    world.submit(project, task, n=3)  # queued: unfinished

    world.clock.advance(5)
    result = world.sweeper.sweep()
    assert (result.archived, result.touched) == (0, 1)
    assert world.status(task) == ACTIVE
    assert world.reload(task).last_active_at == world.clock.now()

    world.run_all()  # the jobs end now; the inactivity clock starts at the last sweep that saw them
    world.clock.advance(0.5)
    world.sweeper.sweep()
    assert world.status(task) == ACTIVE
    world.clock.advance(0.5)
    world.sweeper.sweep()
    assert world.status(task) == ARCHIVED


def test_zero_disables_archiving_and_deleting(world: World) -> None:
    world.workspace_policy(archive=0, delete=1)
    project = world.project()
    idle = world.task(project)
    world.clock.advance(10_000)
    world.sweeper.sweep()
    assert world.status(idle) == ACTIVE

    world.workspace_policy(archive=1, delete=0)
    world.sweeper.sweep()
    assert world.status(idle) == ARCHIVED
    world.clock.advance(10_000)
    world.sweeper.sweep()
    assert world.status(idle) == ARCHIVED


def test_a_project_policy_overrides_the_workspace_policy(world: World) -> None:
    world.workspace_policy(archive=1, delete=1)
    governed, own = world.project(), world.project()
    world.project_policy(own, archive=0, delete=0)  # this project opts out entirely
    follows, keeps = world.task(governed), world.task(own)

    world.clock.advance(2)
    world.sweeper.sweep()
    assert (world.status(follows), world.status(keeps)) == (ARCHIVED, ACTIVE)

    world.project_policy(own, archive=5, delete=0)  # longer than the workspace's 1 h
    world.clock.advance(2)  # 4 h idle
    world.sweeper.sweep()
    assert world.status(keeps) == ACTIVE
    world.clock.advance(1)
    world.sweeper.sweep()
    assert world.status(keeps) == ARCHIVED
    assert world.status(follows) == LifecycleStatus.DELETED.value


def test_no_policy_means_nothing_happens(world: World) -> None:
    project = world.project()
    task = world.task(project)
    world.clock.advance(100_000)
    assert world.sweeper.sweep() == type(world.sweeper.sweep())()
    assert world.status(task) == ACTIVE


def test_an_unarchived_task_starts_over(world: World) -> None:
    world.workspace_policy(archive=1, delete=2)
    project = world.project()
    task = world.task(project)
    world.clock.advance(1)
    world.sweeper.sweep()
    assert world.status(task) == ARCHIVED
    world.clock.advance(1.5)
    # what PATCH lifecycleStatus=ACTIVE does
    world.services.projects.update_task(
        task.id, lifecycle_status=ACTIVE, archived_at=None, last_active_at=world.clock.now()
    )
    world.clock.advance(0.9)
    world.sweeper.sweep()
    assert world.status(task) == ACTIVE


def test_the_sweep_removes_log_chunks_written_after_their_task_was_deleted(
    tmp_path: Path, db_url: str | None
) -> None:
    """``log_store = database``: an agent's chunk that passed the server's checks just before its
    task was deleted is written just after the delete removed the task's logs (as is a killed
    job's last lines, copied by the embedded executor's mirror). Nothing else removes those rows:
    the leader's sweep does, and leaves the other tasks' logs alone."""
    clock = ManualClock(1_800_000_000.0)
    with in_process_services(
        tmp_path / "data", db_url, clock, runtime="process", log_store="database"
    ) as services:
        world = World(services, clock)
        logs = services.logs
        assert isinstance(logs, DatabaseLogs)
        project = world.project()
        first, second, kept = world.task(project), world.task(project), world.task(project)

        def key(task: Any) -> tuple[str, str, int, int]:
            return (task.id, f"{task.id}:1", 0, 1)

        def write(task: Any, text: str) -> None:
            end = logs.chunks.ends([key(task)])[key(task)]
            logs.append([(key(task), end, f"{clock.now()}\t{text}\n".encode())])

        for task in (first, second, kept):
            write(task, "started")
        delete_task(services, project.id, first.id, clock.now())
        assert logs.chunks.ends([key(first)])[key(first)] == 0  # its logs went with it
        write(first, "late")  # the chunk in flight lands after the delete
        write(kept, "more")
        assert world.sweeper.sweep().log_chunks == 1
        assert logs.chunks.ends([key(first)])[key(first)] == 0

        # later passes look at the tasks deleted since the previous one
        world.clock.advance(5)
        delete_task(services, project.id, second.id, clock.now())
        write(second, "late")
        world.clock.advance(0.1)
        assert world.sweeper.sweep().log_chunks == 1
        ends = logs.chunks.ends([key(first), key(second), key(kept)])
        assert ends[key(first)] == ends[key(second)] == 0
        assert [line.message for line in logs.page(key(kept)[:3], 1, 10, False)] == ["started", "more"]
