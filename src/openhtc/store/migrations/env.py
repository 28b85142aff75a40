"""Alembic environment: runs on the connection openhtc hands over (see Database.migrate)."""

from __future__ import annotations

from alembic import context

from openhtc.store.tables import metadata

connection = context.config.attributes.get("connection")
if connection is None:  # pragma: no cover - openhtc always passes its connection
    raise RuntimeError("run migrations through openhtc.store.db.Database.migrate()")

context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
