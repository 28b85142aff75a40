"""executors: an agent's token binding (the hash of the token it registered with) and its drain flag

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-05 06:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("executors") as batch:
        batch.add_column(sa.Column("token_hash", sa.String(64), nullable=True))
        batch.add_column(sa.Column("draining", sa.Boolean, nullable=True))
    op.create_index("ix_executors_token_hash", "executors", ["token_hash"])


def downgrade() -> None:
    op.drop_index("ix_executors_token_hash", "executors")
    with op.batch_alter_table("executors") as batch:
        batch.drop_column("draining")
        batch.drop_column("token_hash")
