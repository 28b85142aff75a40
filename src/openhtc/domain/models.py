"""Plain value types exchanged between the scheduler, the store and executors.

JobLaunch and AttemptReport are NamedTuples: immutable like frozen dataclasses, but built
several times faster, and thousands of them are built per second.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from openhtc.domain.enums import JobStatus


@dataclass(frozen=True, slots=True)
class Capacity:
    """Resources an executor offers, or has free."""

    vcpus: int
    memory_mb: int

    def fits(self, vcpus: int, memory_mb: int) -> bool:
        return vcpus <= self.vcpus and memory_mb <= self.memory_mb

    def minus(self, vcpus: int, memory_mb: int) -> Capacity:
        return Capacity(self.vcpus - vcpus, self.memory_mb - memory_mb)

    def plus(self, vcpus: int, memory_mb: int) -> Capacity:
        return Capacity(self.vcpus + vcpus, self.memory_mb + memory_mb)


class Mount(NamedTuple):
    """A host directory a job sees, and the environment variable that names it inside the job.

    Container runtimes bind ``host_path`` at ``container_path`` and set ``env_name`` to the
    container path; the process runtime has no mount namespace and sets it to ``host_path``.
    """

    env_name: str
    host_path: str
    container_path: str
    read_only: bool


class JobLaunch(NamedTuple):
    """Everything an executor needs to run one attempt of one job."""

    job_id: int
    attempt: int
    job_uuid: str
    batch_id: int
    array_index: int
    project_id: str
    task_id: str
    region: str
    image: str
    commands: tuple[str, ...]
    envs: tuple[tuple[str, str], ...]
    vcpus: int
    memory_mb: int
    disk_gib: int
    timeout_s: int | None
    working_dir: str | None
    # Storage folders (PROJECT_SHARED_FOLDER, TASK_SHARED_FOLDER), filled in on the executor.
    mounts: tuple[Mount, ...] = ()
    # What every job of the batch gets, after ``envs`` (the job's own): tokens, IDs, the user's
    # ``envs``. One tuple shared by the batch's launches, so runtimes can cache what they build.
    batch_envs: tuple[tuple[str, str], ...] = ()
    # A function call's event, when its claim read it (a small claim: one round trip less for
    # a lone call); else the function pool reads it (a chunk of its batch's at a time).
    event: str | None = None


class AttemptReport(NamedTuple):
    """A status change an executor observed for one attempt."""

    job_id: int
    attempt: int
    status: JobStatus
    at: float
    exit_code: int | None = None
    failure_code: str | None = None
    reason: str | None = None
