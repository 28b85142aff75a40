"""The job state machine's legality table; it lives in ``domain/lifecycle.py`` with what each move does."""

from __future__ import annotations

from openhtc.domain.lifecycle import EFFECTS, TRANSITIONS, can_transition, check_transition

__all__ = ["EFFECTS", "TRANSITIONS", "can_transition", "check_transition"]
