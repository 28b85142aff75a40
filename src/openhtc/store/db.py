"""Engine creation, dialect differences and migrations.

SQLite runs in WAL mode; write transactions take the write lock up front (BEGIN IMMEDIATE) so two
writers never deadlock upgrading a read lock. PostgreSQL uses psycopg 3.
"""

from __future__ import annotations

import errno
import json
import select
import time
from collections import namedtuple
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError, DisconnectionError, InterfaceError, OperationalError

from openhtc.domain.errors import InsufficientStorage, OpenHTCError, Unavailable

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
MIGRATE_LOCK_KEY = int.from_bytes(b"openhtc\x03", "big")  # pg_advisory_xact_lock around migrations


@dataclass(frozen=True, slots=True)
class BulkStatement:
    """One statement applied to many rows of parameters.

    SQLite runs in-process, so ``sqlite`` (one '?' per column) is simply run once per row. On
    PostgreSQL each execution is a round trip, so ``postgres`` runs once for all rows: they travel
    as one JSON array of arrays (encoded in C, where psycopg's per-value array dumping is Python)
    and the statement reads them from the table :func:`json_rows` writes.
    """

    sqlite: str
    postgres: str

    @classmethod
    def insert(cls, table: str, columns: Sequence[tuple[str, str]], suffix: str = "") -> BulkStatement:
        """An INSERT of rows of ``columns`` ((name, SQL type) pairs), then ``suffix`` (an ON
        CONFLICT clause). The rows go in in their order: ids follow it, and so do row locks."""
        names = ", ".join(name for name, _ in columns)
        return cls(
            sqlite=f"INSERT INTO {table} ({names}) VALUES ({', '.join('?' * len(columns))}){suffix}",
            postgres=f"INSERT INTO {table} ({names}) SELECT {names} FROM "
            f"{json_rows(columns, numbered=True)} ORDER BY n{suffix}",
        )


def json_rows(columns: Sequence[tuple[str, str]], numbered: bool = False) -> str:
    """A PostgreSQL table ``v(name, ...)`` of the rows in one JSON array-of-arrays parameter.

    ``columns`` are (name, SQL type) pairs in row order; ``numbered`` adds the row's position as
    column ``n``, to keep the rows' order where it matters.
    """
    fields = ", ".join(f"(r->>{i})::{sql_type} AS {name}" for i, (name, sql_type) in enumerate(columns))
    if numbered:
        return f"(SELECT {fields}, n FROM json_array_elements(%s::json) WITH ORDINALITY AS t(r, n)) AS v"
    return f"(SELECT {fields} FROM json_array_elements(%s::json) AS t(r)) AS v"


class Database:
    """An engine plus the transaction helpers every repository uses."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        # told each transaction's kind ("read", "write") and seconds: the metrics' hook
        self.observer: Callable[[str, float], None] | None = None
        self._statements: dict[int, tuple[Any, Any]] = {}  # select_together's, compiled once
        if self.is_sqlite:
            self.engine = _sqlite_engine(url)
        else:
            self.engine = _postgres_engine(url)

    @property
    def concurrent_writes(self) -> bool:
        """Whether two write transactions make progress at once (PostgreSQL's row locks), or
        one waits for the other's end (SQLite's single write lock)."""
        return not self.is_sqlite

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """A read-write transaction (the SQLite write lock is taken at BEGIN)."""
        with self._timed("write"), translated_failures(), _connection(self.engine) as conn:
            if self.is_sqlite:
                conn.exec_driver_sql("BEGIN IMMEDIATE")
                try:
                    yield conn
                except BaseException:
                    conn.exec_driver_sql("ROLLBACK")
                    raise
                conn.exec_driver_sql("COMMIT")
            else:
                with conn.begin():
                    yield conn

    @contextmanager
    def read(self, snapshot: bool = True) -> Iterator[Connection]:
        """A read-only unit of work. SQLite: a transaction, one snapshot for all its statements;
        ``snapshot=False``: none (each statement sees the database as of its own start), for
        reads that hold without one (a single statement; reads ordered to allow for what
        commits between them). PostgreSQL: no transaction either way. Its READ COMMITTED gives
        each statement a snapshot of its own in a transaction too, so for reads BEGIN and
        COMMIT change nothing but cost a round trip each (two of a lone job's ~30)."""
        with self._timed("read"), translated_failures(), _connection(self.engine) as conn:
            if not self.is_sqlite:
                yield conn.execution_options(isolation_level="AUTOCOMMIT")  # reset at its return
            elif not snapshot:
                yield conn  # the driver is in autocommit mode (isolation_level=None)
            else:
                conn.exec_driver_sql("BEGIN")
                try:
                    yield conn
                finally:
                    conn.exec_driver_sql("COMMIT")

    @contextmanager
    def _timed(self, kind: str) -> Iterator[None]:
        observer = self.observer
        if observer is None:
            yield
            return
        start = time.perf_counter()
        try:
            yield
        finally:
            observer(kind, time.perf_counter() - start)

    def ping(self) -> None:
        """One round trip; raises ``Unavailable`` or ``InsufficientStorage`` as any read does."""
        with self.read() as conn:
            conn.exec_driver_sql("SELECT 1")

    def sql(self, statement: str) -> str:
        """Hot-path SQL is written with '?' placeholders; psycopg wants '%s'."""
        return statement if self.is_sqlite else statement.replace("?", "%s")

    def cursor(self, conn: Connection) -> Any:
        """A DB-API cursor inside ``conn``'s transaction, for the hot paths (no SQL compilation)."""
        return conn.connection.driver_connection.cursor()  # type: ignore[union-attr]

    @contextmanager
    def pipelined(self, conn: Connection, commit: bool = False) -> Iterator[None]:
        """PostgreSQL: the statements run on ``cursor(conn)`` cursors in the block go in one
        round trip (psycopg's pipeline mode: a result read inside it waits for what was sent
        before it; errors are raised at its end at the latest), and with ``commit`` the COMMIT
        too (the caller's ``write()`` then commits nothing more: psycopg's commit outside a
        transaction is a no-op). Only plain DB-API statements belong in it, not SQLAlchemy's.
        SQLite, or a libpq without pipeline mode: the statements as they come; ``commit`` is
        left to ``write()``."""
        if self.is_sqlite:
            yield
            return
        import psycopg

        driver: Any = conn.connection.driver_connection
        if not psycopg.Pipeline.is_supported():
            yield
            if commit:
                driver.commit()
            return
        with driver.pipeline():
            yield
            if commit:
                driver.commit()  # queued behind the block's statements; the exit syncs

    def select_together(
        self, conn: Connection, queries: Sequence[tuple[Any, dict[str, Any]]]
    ) -> list[list[Any]]:
        """The rows of several SELECTs (SQLAlchemy Core statements with named bind parameters,
        none expanding), each as a named tuple of its columns. PostgreSQL: all in one round trip
        (``pipelined``), each statement compiled once; SQLite: one after another. For reads
        that need no snapshot across them (``read(snapshot=False)``)."""
        if self.is_sqlite:
            return [list(conn.execute(query, params)) for query, params in queries]
        prepared = [self._compiled(query) for query, _ in queries]
        cursors = [self.cursor(conn) for _ in queries]
        with self.pipelined(conn):
            for cur, (sql, defaults, _), (_, params) in zip(cursors, prepared, queries, strict=True):
                cur.execute(sql, {**defaults, **params})
        out: list[list[Any]] = []
        for cur, (_, _, shape) in zip(cursors, prepared, strict=True):
            rows = cur.fetchall()
            if shape[0] is None:  # its columns' names, known once it has run
                shape[0] = namedtuple("Row", [d.name for d in cur.description], rename=True)
            out.append([shape[0]._make(row) for row in rows])
        return out

    def _compiled(self, query: Any) -> tuple[str, dict[str, Any], list[Any]]:
        found = self._statements.get(id(query))
        if found is None or found[0] is not query:
            compiled = query.compile(dialect=self.engine.dialect)
            found = (query, (str(compiled), dict(compiled.params), [None]))
            self._statements[id(query)] = found
        return found[1]

    def run_bulk(self, cur: Any, statement: BulkStatement, rows: Sequence[tuple[Any, ...]]) -> int:
        """Apply ``statement`` to every row; returns the number of rows it changed."""
        if not rows:
            return 0
        if self.is_sqlite:
            cur.executemany(statement.sqlite, rows)
        else:
            cur.execute(statement.postgres, (json.dumps(rows),))
        return int(cur.rowcount)

    def in_ids(self, column: str) -> str:
        """A predicate matching ``column`` against one parameter holding a list of ids."""
        if self.is_sqlite:
            return f"{column} IN (SELECT value FROM json_each(?))"
        return f"{column} = ANY(?)"

    def ids_param(self, ids: Sequence[int]) -> Any:
        return json.dumps(list(ids)) if self.is_sqlite else list(ids)

    def insert_numbered(
        self, cur: Any, target: tuple[str, str], head: tuple[Any, ...], count: int, tail: tuple[Any, ...]
    ) -> None:
        """Insert ``count`` rows ``(*head, i, *tail)`` for i in 0..count-1, as one statement.

        A batch's rows differ only in their index, so the database generates them itself (a
        recursive CTE on SQLite, generate_series on PostgreSQL): no Python tuple or COPY line per
        row, which halves the cost of a million-job submit.
        """
        table, columns = target
        values = ", ".join(["?"] * len(head) + ["seq.i"] + ["?"] * len(tail))
        if self.is_sqlite:
            statement = (
                f"INSERT INTO {table} ({columns}) WITH RECURSIVE seq(i) AS "
                "(SELECT 0 UNION ALL SELECT i + 1 FROM seq WHERE i < ?) "
                f"SELECT {values} FROM seq"
            )
        else:
            statement = (
                f"INSERT INTO {table} ({columns}) SELECT {values} FROM generate_series(0, ?) AS seq(i)"
            )
            statement = statement.replace("?", "%s")
        last = count - 1  # the CTE's bound comes first in SQLite's text, generate_series's last
        cur.execute(statement, (last, *head, *tail) if self.is_sqlite else (*head, *tail, last))

    @property
    def for_update(self) -> str:
        return "" if self.is_sqlite else " FOR UPDATE OF j"

    def upsert(self, table: Any) -> Any:
        """An INSERT construct with ON CONFLICT support for this dialect."""
        return sqlite.insert(table) if self.is_sqlite else postgresql.insert(table)

    def migrate(self) -> None:
        """Bring the schema to the newest Alembic revision."""
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS_DIR))
        with self.engine.connect() as conn:
            if self.is_sqlite:
                # Alembic manages its own transaction; give it the driver's default behaviour.
                conn.exec_driver_sql("BEGIN")
            else:  # servers starting together on one PostgreSQL migrate one after the other
                conn.exec_driver_sql("SELECT pg_advisory_xact_lock(%s)", (MIGRATE_LOCK_KEY,))
            config.attributes["connection"] = conn
            command.upgrade(config, "head")
            if self.is_sqlite:
                conn.exec_driver_sql("COMMIT")
            else:
                conn.commit()

    def dispose(self) -> None:
        self.engine.dispose()


# SQLite errors that mean "the file cannot be used right now", not "this statement is wrong".
_SQLITE_UNAVAILABLE = ("database is locked", "unable to open database file", "disk i/o error", "readonly")
_PG_UNAVAILABLE = ("57P01", "57P02", "57P03", "53300")  # admin/crash shutdown, cannot connect now, too many


def failure(exc: BaseException) -> OpenHTCError | None:
    """The domain error an outage or a full disk is, or None for any other failure.

    The one place that recognises them: OSError ENOSPC, SQLite's "database or disk is full",
    PostgreSQL's disk_full (53100) -> InsufficientStorage; a lost or refused connection, or an
    SQLite file that cannot be opened or written -> Unavailable.
    """
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return InsufficientStorage()
    if _raw_psycopg(exc):  # from a DB-API cursor of the hot paths: SQLAlchemy never saw it
        import psycopg

        state = getattr(exc, "sqlstate", None)
        if state == "53100":
            return InsufficientStorage()
        if isinstance(exc, psycopg.InterfaceError) or (
            isinstance(exc, psycopg.OperationalError)
            and (state is None or state.startswith("08") or state in _PG_UNAVAILABLE)
        ):
            return Unavailable()
        return None
    if not isinstance(exc, DBAPIError):
        return None
    text = str(exc.orig).lower()
    if "database or disk is full" in text or getattr(exc.orig, "sqlstate", None) == "53100":
        return InsufficientStorage()
    if exc.connection_invalidated or isinstance(exc, InterfaceError):
        return Unavailable()
    if isinstance(exc, OperationalError):
        if type(exc.orig).__module__.startswith("sqlite3"):
            return Unavailable() if any(m in text for m in _SQLITE_UNAVAILABLE) else None
        # psycopg: no SQLSTATE when the connection was refused or lost; class 08 (connection
        # exception), a server shutting down or starting, too many connections. A deadlock or
        # a statement timeout stays what it is.
        state = getattr(exc.orig, "sqlstate", None)
        if state is None or state.startswith("08") or state in _PG_UNAVAILABLE:
            return Unavailable()
    return None


def _raw_psycopg(exc: BaseException) -> bool:
    return type(exc).__module__.startswith("psycopg")


@contextmanager
def _connection(engine: Engine) -> Iterator[Connection]:
    """A pooled connection; one a raw driver error (a hot path's DB-API cursor) left broken is
    invalidated, so the pool drops it instead of resetting it (which would fail, and log)."""
    with engine.connect() as conn:
        try:
            yield conn
        except Exception as exc:
            if _raw_psycopg(exc) and not conn.invalidated:
                driver: Any = conn.connection.driver_connection
                if driver is None or driver.closed or getattr(driver, "broken", False):
                    conn.invalidate(exc)
            raise


@contextmanager
def translated_failures() -> Iterator[None]:
    """Raise outages and full disks as their domain errors (the cause kept as __cause__)."""
    try:
        yield
    except Exception as exc:
        translated = failure(exc)
        if translated is None:
            raise
        raise translated from exc


def _postgres_engine(url: str) -> Engine:
    """A pool whose connections are checked at checkout without a round trip (SQLAlchemy's
    ``pool_pre_ping`` sends a ``SELECT 1`` each time: a round trip per transaction, a tenth of a
    lone job's on PostgreSQL). An idle connection has nothing to read; one the server closed (a
    restart, an outage, a terminated backend) has its goodbye or the end of the stream waiting:
    it is replaced, as a failed ping's would be. One closed after the check fails its statement
    (503, as any outage), and SQLAlchemy then renews the pool's older connections."""
    engine = create_engine(url, pool_size=10, max_overflow=20)

    @event.listens_for(engine, "checkout")
    def _on_checkout(dbapi_conn: Any, _record: Any, _proxy: Any) -> None:
        if not _idle_and_open(dbapi_conn):
            raise DisconnectionError("the database closed this connection")

    return engine


def _idle_and_open(conn: Any) -> bool:
    """Whether a pooled psycopg connection is still open, seen from its socket alone."""
    if conn.closed or getattr(conn, "broken", False):
        return False
    try:
        fd = conn.fileno()
    except Exception:  # psycopg raises once the connection is gone
        return False
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLPRI)
    return not poller.poll(0)  # readable or hung up while idle: closed by the server


def _sqlite_engine(url: str) -> Engine:
    path = url.split("///", 1)[1] if "///" in url else ""
    if path and path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    # The driver runs in autocommit mode (isolation_level=None); Database.write/read issue BEGIN.
    engine = create_engine(
        url, connect_args={"check_same_thread": False, "timeout": 60, "isolation_level": None}
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA busy_timeout=60000")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA cache_size=-65536")
        cur.execute("PRAGMA temp_store=MEMORY")
        cur.close()

    return engine
