"""The pure core: scheduling decisions and the job state machine, without I/O."""

from __future__ import annotations

import pytest

from openhtc.domain.enums import JobStatus, Priority
from openhtc.domain.errors import InvalidTransition
from openhtc.domain.models import Capacity
from openhtc.domain.scheduling import QueuedJob, admit, dispatch, effective_limit
from openhtc.domain.states import TRANSITIONS, check_transition

pytestmark = pytest.mark.unit  # pure code: make test-unit runs it

P, E = int(Priority.ON_DEMAND_PRIORITY), int(Priority.ON_DEMAND_ECONOMY)


def job(job_id: int, project: str, priority: int = P, vcpus: int = 1, memory: int = 100) -> QueuedJob:
    return QueuedJob(job_id, project, priority, vcpus, memory)


def ids(jobs: list[QueuedJob]) -> list[int]:
    return [j.job_id for j in jobs]


def test_priority_jobs_run_before_economy_jobs_of_any_project() -> None:
    queues = {"a": [job(1, "a", E), job(2, "a", E)], "b": [job(3, "b", P)]}
    assert ids(dispatch(queues, {}, Capacity(1, 10_000), 10)) == [3]


def test_fair_share_gives_the_next_slot_to_the_project_using_fewer_vcpus() -> None:
    queues = {"a": [job(1, "a"), job(2, "a"), job(3, "a")], "b": [job(10, "b"), job(11, "b")]}
    chosen = dispatch(queues, {"a": 4, "b": 0}, Capacity(3, 10_000), 10)
    # b is behind by 4 vCPUs, so it gets both of its jobs before a gets one more
    assert ids(chosen) == [10, 11, 1]


def test_fifo_inside_a_project() -> None:
    queues = {"a": [job(5, "a"), job(6, "a"), job(7, "a")]}
    assert ids(dispatch(queues, {}, Capacity(2, 10_000), 10)) == [5, 6]


def test_packing_skips_a_job_that_does_not_fit_and_fills_with_smaller_ones() -> None:
    queues = {"a": [job(1, "a", vcpus=3), job(2, "a", vcpus=1)]}
    assert ids(dispatch(queues, {}, Capacity(2, 10_000), 10)) == [2]


def test_memory_bounds_packing() -> None:
    queues = {"a": [job(1, "a", memory=4000), job(2, "a", memory=4000), job(3, "a", memory=4000)]}
    assert ids(dispatch(queues, {}, Capacity(8, 9000), 10)) == [1, 2]


def test_max_jobs_bounds_a_claim() -> None:
    queues = {"a": [job(i, "a") for i in range(100)]}
    assert len(dispatch(queues, {}, Capacity(64, 10**9), 5)) == 5


def test_admission_respects_project_and_workspace_limits_in_fifo_order() -> None:
    held = [job(1, "a", vcpus=2), job(2, "a", vcpus=2), job(3, "b", vcpus=1), job(4, "b", vcpus=1)]
    admitted = admit(held, {"a": 0, "b": 0}, {"a": 3, "b": None}, workspace_active_vcpus=0, workspace_limit=4)
    # a fits one 2-vCPU job under its limit of 3; the workspace limit of 4 then leaves room for b's 3
    assert admitted == [1, 3, 4]


def test_admission_keeps_fifo_when_the_head_job_waits() -> None:
    held = [job(1, "a", vcpus=4), job(2, "a", vcpus=1)]
    assert admit(held, {"a": 0}, {"a": 3}, 0, None) == []


def test_effective_limit_is_the_tightest() -> None:
    assert effective_limit([None, 8, 3]) == 3
    assert effective_limit([None]) is None


def test_every_status_has_a_row_and_terminal_statuses_are_final() -> None:
    assert set(TRANSITIONS) == set(JobStatus)
    for status in (JobStatus.SUCCEEDED, JobStatus.FAILED):
        assert not TRANSITIONS[status]


@pytest.mark.parametrize("status", [s for s in JobStatus if not s.terminal])
def test_cancel_reaches_failed_from_every_non_terminal_status(status: JobStatus) -> None:
    check_transition(1, status, JobStatus.FAILED)


def test_a_job_cannot_skip_its_lifecycle() -> None:
    with pytest.raises(InvalidTransition):
        check_transition(1, JobStatus.SUBMITTED_TO_RESCALE, JobStatus.RUNNING)
    with pytest.raises(InvalidTransition):
        check_transition(1, JobStatus.SUCCEEDED, JobStatus.RUNNING)
