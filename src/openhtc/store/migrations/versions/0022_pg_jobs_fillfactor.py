"""PostgreSQL: room on the jobs table's pages for a job's next row version (fillfactor)

A job's row gets a new version at every status write (its claim, its report). With full pages
the new version goes to another page; with room left on the page it stays beside the old one,
which PostgreSQL reclaims on that page when it next prunes it: 6-11 % less PostgreSQL CPU for a
job's row writes, measured in isolation (bench/pgrows.py; docs/performance.md, "PostgreSQL
per-job cost"), for up to twice the table's pages. It applies to pages written from now on.
SQLite has no such setting.

Revision ID: 0022
Revises: 0021
Create Date: 2026-12-05 12:00:00
"""

from __future__ import annotations

from alembic import op

revision = "0022"
down_revision = "0021"
branch_labels = None
depends_on = None

FILLFACTOR = 50  # tables.JOBS_FILLFACTOR, as of this revision


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(f"ALTER TABLE jobs SET (fillfactor = {FILLFACTOR})")


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("ALTER TABLE jobs RESET (fillfactor)")
