"""Use cases over the domain and the store; the API and executors call these."""

from __future__ import annotations
