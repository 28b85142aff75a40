"""Executors: claim jobs for their free capacity, run them with a runtime, report in batches."""

from __future__ import annotations
