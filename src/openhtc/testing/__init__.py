"""Aids for testing and benchmarking openhtc.

``ci``: skip locally, fail in CI, when a tool is missing. ``postgres``: a private PostgreSQL
cluster. ``server``: ``htc server`` as a subprocess and raw-HTTP helpers. ``inprocess``: the
services on a fresh database, driven by hand. ``images``: test container images built offline.
``procstats`` and ``soak``: measurements for the benchmarks and the soak test. ``slurm``: a private
single-node Slurm (``python -m openhtc.testing.slurm up|status|down``). ``parallel``: which tests one
pytest-xdist worker must run together.
"""

from __future__ import annotations
