"""Benchmarks for openhtc, side by side with HyperQueue, Dask, Ray and Slurm: figures, never
assertions.

``python -m bench --help`` lists the workloads (W1-W5, CP), systems and options;
docs/performance.md says what each workload measures, how each peer runs, and records the
figures of real runs.
"""

from __future__ import annotations
