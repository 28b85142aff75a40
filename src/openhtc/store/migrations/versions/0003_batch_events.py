"""submission events once per batch

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22 04:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("job_events") as batch:
        batch.alter_column("job_id", existing_type=sa.BigInteger(), nullable=True)
        batch.add_column(sa.Column("batch_id", sa.BigInteger(), nullable=True))
    op.create_index(
        "ix_job_events_batch",
        "job_events",
        ["batch_id", "id"],
        sqlite_where=sa.text("job_id IS NULL"),
        postgresql_where=sa.text("job_id IS NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_job_events_batch", table_name="job_events")
    with op.batch_alter_table("job_events") as batch:
        batch.drop_column("batch_id")
        batch.alter_column("job_id", existing_type=sa.BigInteger(), nullable=False)
