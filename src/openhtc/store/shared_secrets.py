"""Secrets shared by every server on one database (table ``shared_secrets``).

The first server to start creates each one; the others read it. On PostgreSQL the read-or-create
runs under a transaction advisory lock, so servers starting together agree on one value.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from sqlalchemy import select

from openhtc.store.db import Database
from openhtc.store.tables import shared_secrets

SECRETS_LOCK_KEY = int.from_bytes(b"openhtc\x02", "big")
BOOTSTRAP_LOCK_KEY = int.from_bytes(b"openhtc\x04", "big")


@contextmanager
def bootstrap_lock(db: Database) -> Iterator[None]:
    """Servers starting together on one PostgreSQL bootstrap (first workspace, admin key) one
    after the other, so only one of them creates the installation."""
    if db.is_sqlite:  # one server per SQLite database
        yield
        return
    with db.engine.connect() as conn:
        conn.exec_driver_sql("SELECT pg_advisory_lock(%s)", (BOOTSTRAP_LOCK_KEY,))
        conn.commit()
        try:
            yield
        finally:
            conn.exec_driver_sql("SELECT pg_advisory_unlock(%s)", (BOOTSTRAP_LOCK_KEY,))
            conn.commit()


def shared_secret(db: Database, name: str, make: Callable[[], str]) -> str:
    """The secret ``name``; ``make()`` creates it when no server did yet."""
    with db.write() as conn:
        if not db.is_sqlite:  # SQLite's write transaction is already exclusive
            conn.exec_driver_sql("SELECT pg_advisory_xact_lock(%s)", (SECRETS_LOCK_KEY,))
        value = conn.execute(select(shared_secrets.c.value).where(shared_secrets.c.name == name)).scalar()
        if value is not None:
            return str(value)
        value = make()
        conn.execute(shared_secrets.insert().values(name=name, value=value, created_at=time.time()))
        return value
