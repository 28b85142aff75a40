"""The pure parts of the dashboard: "why is my job pending?" and the last hour's throughput."""

from __future__ import annotations

from dataclasses import replace

import pytest

from openhtc.domain import throughput
from openhtc.domain.capacity import ExecutorOffer
from openhtc.domain.enums import JobStatus, Priority
from openhtc.domain.models import Capacity
from openhtc.domain.pending import Facts, explain
from openhtc.domain.throughput import FAILED, MINUTES, SUCCEEDED, first_minute, minute_of, wait_bucket
from openhtc.ui.charts import per_minute

pytestmark = pytest.mark.unit

S = JobStatus
BIG = ExecutorOffer("local", ("X86",), Capacity(16, 64_000))
QUEUED = Facts(
    status=S.SUBMITTED_TO_PROVIDER,
    region="local",
    architecture="X86",
    vcpus=2,
    memory_mb=1000,
    priority=int(Priority.ON_DEMAND_ECONOMY),
    materialized=True,
    project_vcpus=0,
    project_limit=None,
    workspace_vcpus=0,
    workspace_limit=None,
    offers=(BIG,),
)


def codes(facts: Facts) -> list[str]:
    return [r.code for r in explain(facts)]


def test_a_job_first_in_line_waits_only_for_free_capacity() -> None:
    assert codes(QUEUED) == ["WAITING_FOR_CAPACITY"]
    assert "2 vCPUs and 1000 MiB free" in explain(QUEUED)[0].message


def test_a_held_job_over_its_project_limit_says_so_with_the_figures() -> None:
    held = replace(QUEUED, status=S.SUBMITTED_TO_RESCALE, project_vcpus=7, project_limit=8)
    [reason] = explain(held)
    assert reason.code == "PROJECT_VCPU_LIMIT"
    assert "7 of 8 vCPUs" in reason.message and "needs 2" in reason.message


def test_a_held_job_over_the_workspace_limit_says_so() -> None:
    held = replace(QUEUED, status=S.SUBMITTED_TO_RESCALE, workspace_vcpus=10, workspace_limit=10)
    assert codes(held) == ["WORKSPACE_VCPU_LIMIT"]
    both = replace(held, project_vcpus=4, project_limit=4)
    assert codes(both) == ["PROJECT_VCPU_LIMIT", "WORKSPACE_VCPU_LIMIT"]


def test_no_executor_in_the_region_or_for_the_architecture() -> None:
    assert codes(replace(QUEUED, offers=())) == ["NO_EXECUTOR_IN_REGION"]
    elsewhere = ExecutorOffer("far", ("X86",), Capacity(64, 1 << 20))
    assert codes(replace(QUEUED, offers=(elsewhere,))) == ["NO_EXECUTOR_IN_REGION"]
    arm = replace(QUEUED, architecture="AARCH64")
    [reason] = explain(arm)
    assert reason.code == "NO_EXECUTOR_FOR_ARCHITECTURE" and "they run X86" in reason.message


def test_no_executor_large_enough_for_its_vcpus_or_memory() -> None:
    [vcpus] = explain(replace(QUEUED, vcpus=32))
    assert vcpus.code == "NO_EXECUTOR_LARGE_ENOUGH" and "16 vCPUs" in vcpus.message
    [memory] = explain(replace(QUEUED, memory_mb=100_000))
    assert memory.code == "NO_EXECUTOR_LARGE_ENOUGH" and "64000 MiB" in memory.message


def test_its_place_in_the_queue_and_the_higher_priority_jobs_ahead() -> None:
    [reason] = explain(replace(QUEUED, ahead=12, ahead_higher_priority=5))
    assert reason.code == "QUEUE_POSITION"
    assert (
        reason.message.startswith("12 jobs of its project are ahead")
        and "5 of them with a higher" in reason.message
    )
    [capped] = explain(replace(QUEUED, ahead=10_001, ahead_higher_priority=0, cap=10_000))
    assert "more than 10000 jobs" in capped.message


def test_a_job_whose_row_is_not_written_waits_for_materialization() -> None:
    assert codes(replace(QUEUED, materialized=False, ahead=40_000, cap=50_000)) == [
        "MATERIALIZATION",
        "QUEUE_POSITION",
    ]


def test_a_running_or_finished_job_is_not_pending() -> None:
    assert codes(replace(QUEUED, status=S.RUNNING)) == ["NOT_PENDING"]
    assert "ended (SUCCEEDED)" in explain(replace(QUEUED, status=S.SUCCEEDED))[0].message


def test_the_hour_sums_its_minutes_rows_and_leaves_out_older_ones() -> None:
    t0 = 1_000_020.0  # 20 s into a minute
    m0 = minute_of(t0)
    rows = [(m0, SUCCEEDED, 3), (m0, FAILED, 1), (m0 + 1, SUCCEEDED, 2)]
    rows += [(m0, wait_bucket(w), 1) for w in (1.0, 2.0, 100.0)]
    hour = throughput.hour(t0 + 60, rows)
    assert len(hour.succeeded) == MINUTES
    assert hour.succeeded[-2:] == [3, 2] and hour.failed[-2:] == [1, 0]
    assert hour.started == 3
    assert hour.wait_p50 is not None and 2.0 <= hour.wait_p50 <= 2.0 * 1.19
    assert hour.wait_p95 is not None and 100.0 <= hour.wait_p95 <= 100.0 * 1.19
    later = throughput.hour(t0 + 60 * MINUTES, rows)  # the first minute has left the hour
    assert sum(later.succeeded) == 2 and later.wait_p50 is None
    assert throughput.hour(t0, []).started == 0 and throughput.hour(t0, []).wait_p95 is None
    assert first_minute(t0 + 60 * MINUTES) == m0 + 1


def test_the_chart_stacks_failures_on_completions_and_labels_each_bar() -> None:
    chart = per_minute([0, 4, 2], [0, 0, 2])
    assert chart.peak == 4 and (chart.total_ok, chart.total_fail) == (6, 2)
    ok = [r for r in chart.rects if r.kind == "ok"]
    fail = [r for r in chart.rects if r.kind == "fail"]
    assert [r.label for r in ok] == ["1 min ago: 4 succeeded", "this minute: 2 succeeded"]
    assert fail[0].y + fail[0].h == pytest.approx(ok[1].y)  # stacked on the completions
    assert per_minute([0, 0], [0, 0]).rects == []
