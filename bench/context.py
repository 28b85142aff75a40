"""What one benchmark run shares: output directory, options and the PostgreSQL cluster."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import log
from bench.runners import ContainerRunner
from openhtc.testing.postgres import PostgresCluster, PostgresUnavailable


@dataclass
class Context:
    out: Path
    stamp: str
    smoke: bool = False
    profile: bool = False
    vcpus: int | None = None  # executor vCPUs for the process-runtime servers; None: server default
    container: str = "bwrap"  # W3's container runner for every system: bwrap or podman
    runtime: str = "bwrap"  # the soak workload's runtime: bwrap, podman or process
    _pg: PostgresCluster | None = None
    _pg_error: str | None = None
    _runner: ContainerRunner | None = None
    notes: list[str] = field(default_factory=list)

    def database_url(self, db: str) -> str | None:
        """None for SQLite (the server's default file in its data dir); a fresh PG database else."""
        if db == "sqlite":
            return None
        if db != "postgres":
            raise ValueError(db)
        if self._pg_error:
            raise PostgresUnavailable(self._pg_error)
        if self._pg is None:
            try:
                cluster = PostgresCluster()
                log(f"starting a private PostgreSQL cluster ({cluster.bin_dir})")
                cluster.start()
            except (PostgresUnavailable, RuntimeError, OSError) as exc:
                self._pg_error = str(exc)
                raise PostgresUnavailable(self._pg_error) from exc
            self._pg = cluster
            self.notes.append(f"PostgreSQL: {cluster.version}, private cluster, fsync/synchronous_commit off")
        return self._pg.new_database()

    @property
    def slots(self) -> int:
        """CPUs every system may use: openhtc's executor vCPUs, the peers' worker cores."""
        return self.vcpus or os.cpu_count() or 1

    @property
    def runner(self) -> ContainerRunner:
        if self._runner is None:
            self._runner = ContainerRunner(self.container)
        return self._runner

    def profile_path(self, name: str) -> Path:
        return self.out / "profiles" / f"{self.stamp}-{name}.txt"

    def close(self) -> None:
        if self._runner is not None:
            self._runner.close()
            self._runner = None
        if self._pg is not None:
            self._pg.stop()
            self._pg = None
