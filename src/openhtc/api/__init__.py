"""The HTTP API: Rescale HTC routes under /api/v1 and /."""

from __future__ import annotations
