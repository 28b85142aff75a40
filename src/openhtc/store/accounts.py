"""Workspaces, users, API keys and regions."""

from __future__ import annotations

import hashlib
import secrets
import string
from typing import Any

from sqlalchemy import Connection, Row, and_, bindparam, insert, select

from openhtc.store.db import Database
from openhtc.store.tables import api_keys, regions, users, workspaces

_REGIONS = select(regions).where(regions.c.workspace_id == bindparam("ws")).order_by(regions.c.name)
_ALNUM = string.ascii_letters + string.digits


def hash_api_key(key: str) -> str:
    """API keys are long random secrets, so a fast unsalted hash is the right tool (like GitHub's)."""
    return hashlib.sha256(key.encode()).hexdigest()


def new_user_id() -> str:
    return "".join(secrets.choice(_ALNUM) for _ in range(5))


def new_workspace_id() -> str:
    return f"04-{secrets.randbelow(10**7):07d}"


class AccountStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    def create_workspace(self, name: str, now: float) -> str:
        workspace_id = new_workspace_id()
        with self.db.write() as conn:
            conn.execute(insert(workspaces).values(id=workspace_id, name=name, created_at=now))
        return workspace_id

    def workspace(self, workspace_id: str) -> Row[Any] | None:
        with self.db.read() as conn:
            return conn.execute(select(workspaces).where(workspaces.c.id == workspace_id)).first()

    def workspaces(self) -> list[Row[Any]]:
        with self.db.read() as conn:
            return list(conn.execute(select(workspaces).order_by(workspaces.c.created_at)).all())

    def update_workspace(self, workspace_id: str, **values: Any) -> None:
        with self.db.write() as conn:
            conn.execute(workspaces.update().where(workspaces.c.id == workspace_id).values(**values))

    def create_user(self, workspace_id: str, email: str, full_name: str, role: str, now: float) -> str:
        user_id = new_user_id()
        with self.db.write() as conn:
            conn.execute(
                insert(users).values(
                    id=user_id,
                    workspace_id=workspace_id,
                    email=email,
                    full_name=full_name,
                    role=role,
                    created_at=now,
                )
            )
        return user_id

    def user_by_email(self, workspace_id: str, email: str) -> Row[Any] | None:
        with self.db.read() as conn:
            return conn.execute(
                select(users).where(and_(users.c.workspace_id == workspace_id, users.c.email == email))
            ).first()

    def create_api_key(self, user_id: str, now: float, label: str | None = None) -> str:
        """Make a new key; only its hash is stored, the key itself is returned once."""
        key = secrets.token_hex(20)  # 40 hex characters, like Rescale's keys
        with self.db.write() as conn:
            conn.execute(
                insert(api_keys).values(
                    user_id=user_id, key_hash=hash_api_key(key), label=label, created_at=now, revoked=False
                )
            )
        return key

    def user_for_api_key(self, key: str) -> Row[Any] | None:
        with self.db.read() as conn:
            return conn.execute(
                select(users)
                .select_from(users.join(api_keys, api_keys.c.user_id == users.c.id))
                .where(and_(api_keys.c.key_hash == hash_api_key(key), api_keys.c.revoked.is_(False)))
            ).first()

    def ensure_region(
        self, workspace_id: str, name: str, architectures: list[str], updated_by: str, now: float
    ) -> None:
        with self.db.write() as conn:
            stmt = self.db.upsert(regions).values(
                workspace_id=workspace_id,
                name=name,
                enabled=True,
                weight=1.0,
                architectures=architectures,
                updated_by=updated_by,
                updated_at=now,
            )
            conn.execute(stmt.on_conflict_do_nothing(index_elements=["workspace_id", "name"]))

    def regions(self, workspace_id: str) -> list[Row[Any]]:
        with self.db.read() as conn:
            return self.regions_in(conn, workspace_id)

    @staticmethod
    def regions_in(conn: Connection, workspace_id: str) -> list[Row[Any]]:
        return list(conn.execute(_REGIONS, {"ws": workspace_id}))
