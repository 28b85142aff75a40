"""The pure core: domain types, the job state machine and the error hierarchy. No I/O here."""

from __future__ import annotations
