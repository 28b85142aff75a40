"""Aids for testing and benchmarking openhtc: a private PostgreSQL cluster."""

from __future__ import annotations
