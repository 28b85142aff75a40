"""job rows written in the background for large submits (late materialization)

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-22 08:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # NULL in every new column: a batch stored before this revision, all of its rows written.
    with op.batch_alter_table("batches") as batch:
        batch.add_column(sa.Column("first_job_id", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("pending_from", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("job_status", sa.SmallInteger(), nullable=True))
        batch.add_column(sa.Column("architecture", sa.String(length=16), nullable=True))
        batch.add_column(sa.Column("priority", sa.SmallInteger(), nullable=True))
        batch.add_column(sa.Column("vcpus", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("memory_mb", sa.Integer(), nullable=True))
    op.create_index(
        "ix_batches_pending",
        "batches",
        ["task_id", "id"],
        sqlite_where=sa.text("pending_from IS NOT NULL"),
        postgresql_where=sa.text("pending_from IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_batches_pending", table_name="batches")
    with op.batch_alter_table("batches") as batch:
        for column in ("memory_mb", "vcpus", "priority", "architecture", "job_status"):
            batch.drop_column(column)
        for column in ("pending_from", "first_job_id"):
            batch.drop_column(column)
