"""A private, throw-away PostgreSQL cluster, for the test suite and the benchmarks.

The cluster lives in a temporary directory, listens on 127.0.0.1 on a free port (and on a Unix
socket inside that directory), trusts every local connection, and is stopped and deleted at the
end. Each openhtc server under test (or benchmark) gets its own database from
:meth:`PostgresCluster.new_database`.

When run as root, the PostgreSQL binaries run as the ``postgres`` user through ``runuser``,
because ``initdb`` and ``postgres`` refuse to run as root.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class PostgresUnavailable(RuntimeError):
    """The PostgreSQL server binaries (or a way to run them) are missing on this machine."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def find_bin_dir() -> Path:
    """The directory holding initdb and pg_ctl: $OPENHTC_TEST_PG_BIN if set, else Debian's newest
    /usr/lib/postgresql/*/bin, else the one on PATH."""
    explicit = os.environ.get("OPENHTC_TEST_PG_BIN")
    if explicit:
        candidates = [Path(explicit)]  # only this one: a wrong setting must not go unnoticed
    else:
        debian = sorted(
            glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name), reverse=True
        )
        candidates = [Path(p) for p in debian]
        on_path = shutil.which("pg_ctl")
        if on_path:
            candidates.append(Path(on_path).parent)
    for directory in candidates:
        if (directory / "initdb").is_file() and (directory / "pg_ctl").is_file():
            return directory
    raise PostgresUnavailable(
        "PostgreSQL server binaries (initdb, pg_ctl) not found; install the Debian package "
        "'postgresql' or set OPENHTC_TEST_PG_BIN"
    )


class PostgresCluster:
    """initdb + pg_ctl in a temporary directory; ``url_for(db)`` builds connection URLs."""

    user = "postgres"

    def __init__(self, bin_dir: Path | None = None, base: Path | None = None) -> None:
        self.bin_dir = bin_dir or find_bin_dir()
        self.run_as: list[str] = []
        if os.geteuid() == 0:
            runuser = shutil.which("runuser")
            try:
                pwd.getpwnam("postgres")
            except KeyError as exc:
                raise PostgresUnavailable("running as root but there is no 'postgres' user") from exc
            if not runuser:
                raise PostgresUnavailable("running as root but 'runuser' is missing")
            self.run_as = [runuser, "-u", "postgres", "--"]
        # Not under pytest's tmp dir: that one is mode 0700 and root-owned, so 'postgres' could
        # not reach it.
        # `htc cluster` passes a directory of its own (see attach).
        self.base = base or Path(tempfile.mkdtemp(prefix="openhtc-pg-"))
        self.base.mkdir(parents=True, exist_ok=True)
        self.base.chmod(0o755)
        self.data = self.base / "data"
        self.log = self.base / "postgres.log"
        self.port = 0
        self._options = ""
        self.started = False
        self.paused = False

    @classmethod
    def attach(cls, base: Path, port: int) -> PostgresCluster:
        """The cluster an earlier process started in ``base`` on ``port`` (`htc cluster down`)."""
        cluster = cls(base=base)
        cluster.port = port
        cluster.started = True
        return cluster

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [*self.run_as, *args], capture_output=True, text=True, timeout=120, check=False
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
                f"\n--- {self.log} ---\n{self.log_tail()}"
            )
        return result

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def start(self) -> None:
        if self.run_as:
            shutil.chown(self.base, user="postgres", group="postgres")
        self._run(
            str(self.bin_dir / "initdb"), "-D", str(self.data), "-A", "trust", "-U", self.user,
            "-E", "UTF8", "--no-sync",
        )  # fmt: skip
        # A port can be taken between free_port() and the bind; try a few.
        for _ in range(5):
            self.port = free_port()
            options = (
                f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.base} "
                "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
            )
            self._options = options
            try:
                self._run(
                    str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-l", str(self.log),
                    "-o", options, "-w", "-t", "60", "start",
                )  # fmt: skip
            except RuntimeError:
                if "already in use" in self.log_tail():
                    continue
                raise
            self.started = True
            return
        raise RuntimeError(f"PostgreSQL could not bind a free port:\n{self.log_tail()}")

    @property
    def version(self) -> str:
        """What ``pg_ctl --version`` says, for reports."""
        out = subprocess.run([str(self.bin_dir / "pg_ctl"), "--version"], capture_output=True, text=True)
        return out.stdout.strip()

    def url_for(self, dbname: str) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{dbname}"

    def new_database(self, prefix: str = "openhtc") -> str:
        """Create an empty database and return its URL."""
        import psycopg

        name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(
            host="127.0.0.1", port=self.port, user=self.user, dbname="postgres", autocommit=True
        ) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url_for(name)

    def pause(self) -> None:
        """Stop the server but keep its data, as an outage would (see :meth:`resume`)."""
        self._run(str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")
        self.paused = True

    def resume(self) -> None:
        """Start the paused server again, on the same port."""
        self._run(
            str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-l", str(self.log),
            "-o", self._options, "-w", "-t", "60", "start",
        )  # fmt: skip
        self.paused = False

    def stop(self) -> None:
        if self.started and not self.paused:  # a test that failed while it was paused
            try:
                self._run(str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
            finally:
                self.started = False
        shutil.rmtree(self.base, ignore_errors=True)


@contextmanager
def running_cluster() -> Iterator[PostgresCluster]:
    """A started cluster, stopped and deleted on exit. In a test: when the PostgreSQL binaries
    are missing it skips, or fails in CI (see openhtc.testing.ci)."""
    try:
        cluster = PostgresCluster()
    except PostgresUnavailable as exc:
        from openhtc.testing.ci import skip_or_fail

        skip_or_fail(f"PostgreSQL unavailable (required in CI): {exc}")
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
