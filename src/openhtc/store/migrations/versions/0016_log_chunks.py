"""job logs in the database (log_store = "database"): the chunks agents ship, by attempt and offset

Revision ID: 0016
Revises: 0014
Create Date: 2026-12-05 06:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0016"
down_revision = "0014"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "log_chunks",
        sa.Column("task_id", sa.String(64), nullable=False),
        sa.Column("parent_job_id", sa.String(64), nullable=False),
        sa.Column("idx", sa.Integer(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("byte_offset", sa.BigInteger(), nullable=False),
        sa.Column("end_offset", sa.BigInteger(), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint(
            "task_id", "parent_job_id", "idx", "attempt", "byte_offset", name="pk_log_chunks"
        ),
    )


def downgrade() -> None:
    op.drop_table("log_chunks")
