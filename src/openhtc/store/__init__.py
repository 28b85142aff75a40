"""Persistence: SQLAlchemy Core tables and repositories over SQLite or PostgreSQL."""

from __future__ import annotations
