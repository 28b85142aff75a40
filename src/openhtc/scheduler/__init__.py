"""The scheduler loop (loop.py); the decisions it applies are pure, in ``openhtc.domain.scheduling``."""

from __future__ import annotations
