"""Completions, failures and queue waits per minute over the last hour, kept in memory.

Fed by the store after each committed batch of executor reports (store/queue.py), read by the
dashboard's overview and ``htc top``. Counting as reports arrive costs a few additions per job,
where reading them back from the job rows would scan an hour of jobs on every poll. Keyed by
project, so a page sums only the projects its user may see. The history starts with the server
process: a restart begins an empty hour.

Queue waits go into a fixed log-scale histogram per minute (bins 19 % wide), so percentiles over
the hour cost O(bins), whatever the number of jobs.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field

MINUTES = 60
_BASE = 2**0.25  # bin width: each bin's upper edge is 19 % above its lower one
_FLOOR = 0.01  # seconds: waits below this share the first bin
_BINS = 112  # up to ~0.01 * 2**28 s (about a month)


def _bin(seconds: float) -> int:
    if seconds <= _FLOOR:
        return 0
    return min(_BINS - 1, 1 + int(math.log(seconds / _FLOOR, _BASE)))


def _upper(index: int) -> float:
    return float(_FLOOR * _BASE**index)


@dataclass
class _Minute:
    succeeded: int = 0
    failed: int = 0
    waits: list[int] = field(default_factory=lambda: [0] * _BINS)


@dataclass(frozen=True)
class Hour:
    """The last hour, oldest minute first: one entry per minute (``MINUTES`` of them)."""

    succeeded: list[int]
    failed: list[int]
    wait_p50: float | None  # seconds; None: no job started within the hour
    wait_p95: float | None
    started: int


class Throughput:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._minutes: dict[tuple[int, str], _Minute] = {}

    def record(
        self, now: float, project_id: str, succeeded: int, failed: int, waits: Iterable[float]
    ) -> None:
        minute = int(now // 60)
        with self._lock:
            slot = self._minutes.get((minute, project_id))
            if slot is None:
                self._forget(minute)
                slot = self._minutes[(minute, project_id)] = _Minute()
            slot.succeeded += succeeded
            slot.failed += failed
            for wait in waits:
                slot.waits[_bin(wait)] += 1

    def _forget(self, minute: int) -> None:
        for key in [k for k in self._minutes if k[0] <= minute - MINUTES]:
            del self._minutes[key]

    def hour(self, now: float, project_ids: Iterable[str]) -> Hour:
        """The projects' last hour, summed, up to the minute holding ``now``."""
        wanted = set(project_ids)
        last = int(now // 60)
        succeeded, failed = [0] * MINUTES, [0] * MINUTES
        waits = [0] * _BINS
        with self._lock:
            for (minute, project), slot in self._minutes.items():
                offset = minute - (last - MINUTES + 1)
                if project not in wanted or not 0 <= offset < MINUTES:
                    continue
                succeeded[offset] += slot.succeeded
                failed[offset] += slot.failed
                waits = [a + b for a, b in zip(waits, slot.waits, strict=True)]
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
