"""jobs.infra_retries: re-runs after infrastructure faults, apart from the user's maxRetries

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-05 00:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # 0 for every job stored before: its infrastructure faults spent user retries then
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("infra_retries", sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("infra_retries")
