"""The pure rules of allocation queues (domain/allocation.py) and the Slurm output parsers."""

from __future__ import annotations

from datetime import datetime

import pytest

from openhtc.allocation.slurm import parse_squeue
from openhtc.domain import allocation as rules
from openhtc.domain.allocation import Demand, Health, QueueLimits

pytestmark = pytest.mark.unit

LIMITS = QueueLimits(max_pilots=4, backlog=1, pilot_vcpus=2)


def test_no_queued_work_submits_no_pilot() -> None:
    assert rules.pilots_to_submit(LIMITS, Demand(0, 0), waiting=0, alive=0) == 0


def test_queued_work_the_live_agents_can_take_submits_no_pilot() -> None:
    assert rules.pilots_to_submit(LIMITS, Demand(queued_vcpus=6, free_vcpus=6), 0, 2) == 0


def test_at_most_backlog_pilots_wait_at_once_so_capacity_ramps_up() -> None:
    # 100 vCPUs queued, nothing free: the backlog (1) caps each round, not the demand (50 pilots)
    assert rules.pilots_to_submit(LIMITS, Demand(100, 0), waiting=0, alive=0) == 1
    assert rules.pilots_to_submit(LIMITS, Demand(100, 0), waiting=1, alive=1) == 0
    wide = QueueLimits(max_pilots=10, backlog=3, pilot_vcpus=2)
    assert rules.pilots_to_submit(wide, Demand(100, 0), waiting=1, alive=3) == 2


def test_max_pilots_caps_every_pilot_alive() -> None:
    wide = QueueLimits(max_pilots=4, backlog=10, pilot_vcpus=1)
    assert rules.pilots_to_submit(wide, Demand(100, 0), waiting=0, alive=3) == 1
    assert rules.pilots_to_submit(wide, Demand(100, 0), waiting=0, alive=4) == 0


def test_waiting_pilots_count_as_capacity_on_its_way() -> None:
    wide = QueueLimits(max_pilots=10, backlog=10, pilot_vcpus=2)
    # 5 vCPUs queued: 3 pilots of 2; one waits already, so 2 more
    assert rules.pilots_to_submit(wide, Demand(5, 0), waiting=1, alive=1) == 2


def test_ten_failed_submissions_in_a_row_pause_with_the_last_error() -> None:
    health, reason = Health(), None
    for i in range(rules.SUBMIT_FAILURES):
        assert reason is None, i
        health, reason = rules.after_submission(health, "sbatch: error: invalid partition")
    assert reason is not None and "10 submissions failed" in reason and "invalid partition" in reason


def test_a_successful_submission_resets_the_failure_count() -> None:
    health = Health(failed_submissions=9)
    health, reason = rules.after_submission(health, None)
    assert health.failed_submissions == 0 and reason is None
    health, reason = rules.after_submission(health, "boom")
    assert reason is None


def test_three_pilots_in_a_row_dying_at_start_pause() -> None:
    health = Health()
    health, r1 = rules.after_pilot_end(health, False, "Slurm: FAILED")
    health, r2 = rules.after_pilot_end(health, False, "Slurm: FAILED")
    assert r1 is None and r2 is None
    _, r3 = rules.after_pilot_end(health, False, "Slurm: FAILED (NonZeroExitCode)")
    assert r3 is not None and "3 pilots in a row" in r3 and "NonZeroExitCode" in r3


def test_a_pilot_whose_agent_called_resets_the_start_failures() -> None:
    health, _ = rules.after_pilot_end(Health(failed_starts=2), True, "Slurm: COMPLETED")
    assert health.failed_starts == 0
    _, reason = rules.after_pilot_end(health, False, "Slurm: FAILED")
    assert reason is None


def test_a_job_fits_a_pilot_only_with_its_timeout_inside_the_time_left() -> None:
    assert rules.fits(600, None)  # no walltime
    assert rules.fits(600, 3600)
    assert not rules.fits(3600, 3600)  # the pilot drains a minute before its end
    assert rules.fits(None, 3600)  # a job stating no timeout fits any pilot (as in HyperQueue)
    assert rules.max_timeout(3600) == 3540 and rules.max_timeout(None) is None
    assert rules.fits(3540, 3600) and not rules.fits(3541, 3600)


def test_idle_after_the_idle_timeout() -> None:
    assert not rules.is_idle(last_busy=100, now=399, idle_timeout=300)
    assert rules.is_idle(last_busy=100, now=400, idle_timeout=300)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("300", 300), ("300s", 300), ("5m", 300), ("1h", 3600), ("1h30m", 5400), ("2d", 172800)],
)
def test_durations(text: str, seconds: int) -> None:
    assert rules.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "0", "h", "5x", "1h30", "-5m"])
def test_bad_durations_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        rules.parse_duration(text)


def test_slurm_time_rounds_up_to_minutes() -> None:
    assert rules.slurm_time(3600) == "0-01:00:00"
    assert rules.slurm_time(61) == "0-00:02:00"
    assert rules.slurm_time(90000) == "1-01:00:00"


def test_squeue_lines_parse_to_jobs() -> None:
    jobs = parse_squeue("12|RUNNING|2026-12-05T03:10:00|None\n13|PENDING|N/A|Resources\n\n")
    assert [j.job_id for j in jobs] == ["12", "13"]
    assert jobs[0].running and not jobs[0].waiting
    assert jobs[0].ends_at == datetime(2026, 12, 5, 3, 10).timestamp()
    assert jobs[1].waiting and jobs[1].ends_at is None and jobs[1].reason == "Resources"
