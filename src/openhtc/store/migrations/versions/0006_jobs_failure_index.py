"""the dashboard's failure code filter: an index of the jobs that failed, by task

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04 23:50:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index(
        "ix_jobs_task_failure",
        "jobs",
        ["task_id", "failure_code", "id"],
        sqlite_where=sa.text("failure_code IS NOT NULL"),
        postgresql_where=sa.text("failure_code IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_jobs_task_failure", table_name="jobs")
