"""the dashboard's last hour in the database (throughput_minutes)

Revision ID: 0021
Revises: 0013
Create Date: 2026-12-05 06:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0021"
down_revision = "0016"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "throughput_minutes",
        sa.Column("minute", sa.BigInteger(), nullable=False),
        sa.Column("project_id", sa.String(64), nullable=False),
        sa.Column("bucket", sa.SmallInteger(), nullable=False),
        sa.Column("count", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("minute", "project_id", "bucket", name=op.f("pk_throughput_minutes")),
    )


def downgrade() -> None:
    op.drop_table("throughput_minutes")
