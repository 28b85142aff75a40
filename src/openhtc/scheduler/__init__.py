"""Scheduling: pure decisions (policy) and the loop that applies them (loop)."""

from __future__ import annotations
