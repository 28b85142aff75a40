"""Container repositories a project has created (``POST …/container-registry/repo/{name}``) or
been granted push to. Names are relative to the project's namespace (``repo``, not ``{pid}/repo``)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import Row, and_, insert, select
from sqlalchemy.exc import IntegrityError

from openhtc.store.db import Database
from openhtc.store.tables import repositories


class RepositoryStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    def get(self, project_id: str, name: str) -> Row[Any] | None:
        with self.db.read() as conn:
            return conn.execute(
                select(repositories).where(
                    and_(repositories.c.project_id == project_id, repositories.c.name == name)
                )
            ).first()

    def create(
        self, project_id: str, workspace_id: str, name: str, user_id: str, now: float
    ) -> tuple[Row[Any], bool]:
        """Record the repository unless it exists; returns (row, created)."""
        existing = self.get(project_id, name)
        if existing is not None:
            return existing, False
        try:
            with self.db.write() as conn:
                conn.execute(
                    insert(repositories).values(
                        project_id=project_id,
                        name=name,
                        workspace_id=workspace_id,
                        created_by=user_id,
                        created_at=now,
                    )
                )
        except IntegrityError:  # a concurrent request made it first
            row = self.get(project_id, name)
            assert row is not None
            return row, False
        row = self.get(project_id, name)
        assert row is not None
        return row, True

    def ensure(
        self, project_id: str, workspace_id: str, names: Iterable[str], user_id: str, now: float
    ) -> None:
        for name in names:
            if self.get(project_id, name) is None:
                self.create(project_id, workspace_id, name, user_id, now)

    def names(self, project_ids: Sequence[str]) -> dict[str, list[str]]:
        """The repository names of each project, sorted, in one query."""
        out: dict[str, list[str]] = {p: [] for p in project_ids}
        if not project_ids:
            return out
        with self.db.read() as conn:
            rows = conn.execute(
                select(repositories.c.project_id, repositories.c.name)
                .where(repositories.c.project_id.in_(list(project_ids)))
                .order_by(repositories.c.project_id, repositories.c.name)
            )
            for row in rows:
                out[row.project_id].append(row.name)
        return out
