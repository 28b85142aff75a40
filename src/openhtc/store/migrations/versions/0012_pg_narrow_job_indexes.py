"""PostgreSQL: job indexes that a status change past the queue no longer writes

Every status change writes a new version of the job's row, and PostgreSQL adds an entry for it
to every index whose predicate the new version meets. The queue index now holds queued jobs
only, the executor index only jobs an executor holds, and a small index keeps the failed ones
for the job list's status filter; a job that runs and succeeds writes 14 index entries instead
of 17 (docs/performance.md, PostgreSQL). SQLite is unchanged: its planner uses a partial index
only when the query repeats the index's condition word for word, so a ``status = ?`` query
could not use ``status IN (0, 1)``.

Revision ID: 0012
Revises: 0007
Create Date: 2026-12-05 02:50:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.drop_index("ix_jobs_queue", table_name="jobs")
    op.create_index(
        "ix_jobs_queue",
        "jobs",
        ["status", "project_id", "priority", "id"],
        postgresql_where=sa.text("status IN (0, 1)"),
    )
    op.drop_index("ix_jobs_executor", table_name="jobs")
    op.create_index(
        "ix_jobs_executor", "jobs", ["executor_id", "status"], postgresql_where=sa.text("status IN (2, 3, 4)")
    )
    op.create_index("ix_jobs_failed", "jobs", ["project_id", "id"], postgresql_where=sa.text("status = 6"))


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.drop_index("ix_jobs_failed", table_name="jobs")
    op.drop_index("ix_jobs_executor", table_name="jobs")
    op.create_index(
        "ix_jobs_executor",
        "jobs",
        ["executor_id", "status"],
        postgresql_where=sa.text("executor_id IS NOT NULL"),
    )
    op.drop_index("ix_jobs_queue", table_name="jobs")
    op.create_index("ix_jobs_queue", "jobs", ["status", "project_id", "priority", "id"])
