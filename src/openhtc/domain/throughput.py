"""Completions, failures and queue waits per minute over the last hour: the pure part.

Each status flush tallies what it changed per (minute, project, bucket) and adds that to the
database's ``throughput_minutes`` rows in the same transaction (store/transitions.py), so every
server reads the same hour and a restart keeps it; the dashboard's overview and ``htc top`` sum
the rows of the projects a user may see (store/queue.py). Counting as jobs change costs a few
additions per job, where reading them back from the job rows would scan an hour of jobs on
every poll.

Queue waits go into a fixed log-scale histogram (bins 19 % wide), so percentiles over the hour
cost O(bins), whatever the number of jobs. Buckets: 0 succeeded, 1 failed, 2 + i a first
attempt's wait (submission to RUNNING) in bin i.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

MINUTES = 60
SUCCEEDED, FAILED, WAITS = 0, 1, 2  # buckets; a wait in bin i is bucket WAITS + i
_BASE = 2**0.25  # bin width: each bin's upper edge is 19 % above its lower one
_FLOOR = 0.01  # seconds: waits below this share the first bin
_BINS = 112  # up to ~0.01 * 2**28 s (about a month)


def wait_bucket(seconds: float) -> int:
    """The bucket counting a queue wait of ``seconds``."""
    if seconds <= _FLOOR:
        return WAITS
    return WAITS + min(_BINS - 1, 1 + int(math.log(seconds / _FLOOR, _BASE)))


def _upper(index: int) -> float:
    return float(_FLOOR * _BASE**index)


def minute_of(now: float) -> int:
    return int(now // 60)


@dataclass(frozen=True)
class Hour:
    """The last hour, oldest minute first: one entry per minute (``MINUTES`` of them)."""

    succeeded: list[int]
    failed: list[int]
    wait_p50: float | None  # seconds; None: no job started within the hour
    wait_p95: float | None
    started: int


def first_minute(now: float) -> int:
    """The oldest minute of the hour ending with the minute holding ``now``."""
    return minute_of(now) - MINUTES + 1


def hour(now: float, rows: Iterable[tuple[int, int, int]]) -> Hour:
    """The hour up to the minute holding ``now`` from (minute, bucket, count) rows, summed over
    projects; rows outside the hour are left out."""
    first = first_minute(now)
    succeeded, failed = [0] * MINUTES, [0] * MINUTES
    waits = [0] * _BINS
    for minute, bucket, count in rows:
        offset = minute - first
        if not 0 <= offset < MINUTES:
            continue
        if bucket == SUCCEEDED:
            succeeded[offset] += count
        elif bucket == FAILED:
            failed[offset] += count
        elif WAITS <= bucket < WAITS + _BINS:
            waits[bucket - WAITS] += count
    started = sum(waits)
    return Hour(succeeded, failed, _percentile(waits, 0.5), _percentile(waits, 0.95), started)


def _percentile(bins: list[int], q: float) -> float | None:
    """The upper edge of the bin holding the q-quantile (an over-estimate by at most 19 %)."""
    total = sum(bins)
    if not total:
        return None
    rank = math.ceil(q * total)
    seen = 0
    for index, count in enumerate(bins):
        seen += count
        if seen >= rank:
            return _upper(index)
    return _upper(_BINS - 1)
