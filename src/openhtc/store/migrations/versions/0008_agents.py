"""executors: agents (htc agent) say their kind, labels and runtime, and are marked lost

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-05 02:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("executors") as batch:
        batch.add_column(sa.Column("kind", sa.String(16), nullable=True))
        batch.add_column(sa.Column("labels", sa.JSON, nullable=True))
        batch.add_column(sa.Column("runtime", sa.String(32), nullable=True))
        batch.add_column(sa.Column("lost_at", sa.Float, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("executors") as batch:
        batch.drop_column("lost_at")
        batch.drop_column("runtime")
        batch.drop_column("labels")
        batch.drop_column("kind")
