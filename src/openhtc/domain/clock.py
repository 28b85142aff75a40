"""Time: an injectable clock and the RFC 3339 format the API speaks."""

from __future__ import annotations

import time
from datetime import UTC, datetime


class Clock:
    """Wall-clock time in epoch seconds. Tests inject a subclass to move time by hand."""

    def now(self) -> float:
        return time.time()


def iso(ts: float | None) -> str | None:
    """Epoch seconds -> '2024-01-02T03:04:05.678Z' (UTC, millisecond precision)."""
    if ts is None:
        return None
    dt = datetime.fromtimestamp(ts, tz=UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"
