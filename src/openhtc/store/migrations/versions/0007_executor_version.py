"""executors say which openhtc version they run and on which host (the dashboard's executors page)

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-05 01:15:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("executors") as batch:
        batch.add_column(sa.Column("version", sa.String(64), nullable=True))
        batch.add_column(sa.Column("host", sa.String(255), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("executors") as batch:
        batch.drop_column("host")
        batch.drop_column("version")
