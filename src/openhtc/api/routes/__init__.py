"""Thin route modules: parse, authorize, call a store or service, serialize."""

from __future__ import annotations
