"""openhtc: self-hosted High Throughput Computing, wire-compatible with the Rescale HTC API."""

from __future__ import annotations

__all__ = ["__version__"]
__version__ = "0.1.0"
