"""Benchmarks for openhtc: figures, never assertions.

``python -m bench --help`` lists the workloads, systems and options; docs/performance.md says what
each workload measures and records the figures of a real run.
"""

from __future__ import annotations
