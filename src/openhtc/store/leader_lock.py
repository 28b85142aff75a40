"""The PostgreSQL leader lock: a session advisory lock on a connection of its own.

The connection is outside the pool and in autocommit, so no transaction ever holds it open. A
server that dies (``kill -9`` included) closes its socket; PostgreSQL ends the session and frees
the lock, and the next follower to try takes it. TCP keepalives bound how long a half-open
connection (a lost host) keeps the lock.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

from sqlalchemy.engine import make_url

log = logging.getLogger("openhtc.leadership")

# pg_try_advisory_lock's bigint key: "openhtc\x01" read as an integer, unlikely to collide.
LEADER_KEY = int.from_bytes(b"openhtc\x01", "big")
CONNECT_TIMEOUT = 3  # seconds: a follower's try must not hang on an unreachable database
# A lost host or network: the client gives up on a query unanswered for 5 s (so the leader steps
# down), and the database ends the session after about 11 s of silence (5 s idle, then 3 probes
# 2 s apart), which frees the lock for a follower only once the old leader has stepped down.
CLIENT_TCP_USER_TIMEOUT_MS = 5000
SERVER_KEEPALIVES = "-c tcp_keepalives_idle=5 -c tcp_keepalives_interval=2 -c tcp_keepalives_count=3"


def psycopg_params(url: str) -> dict[str, Any]:
    """psycopg.connect keyword arguments for a SQLAlchemy ``postgresql+psycopg://`` URL."""
    u = make_url(url)
    params: dict[str, Any] = {"dbname": u.database, "user": u.username, "host": u.host, "port": u.port}
    if u.password:
        params["password"] = u.password
    params.update({k: v for k, v in u.query.items() if isinstance(v, str)})
    return {k: v for k, v in params.items() if v is not None}


def connect(url: str, **extra: Any) -> Any:
    """A dedicated autocommit connection with keepalives (the lock's, the notifier's)."""
    import psycopg

    params = psycopg_params(url)
    params["options"] = f"{params.get('options', '')} {SERVER_KEEPALIVES}".strip()
    # ours win for the liveness settings; the URL's query may carry any of these too (a
    # duplicate keyword would be a TypeError: no server would ever lead)
    params.update(
        autocommit=True,
        connect_timeout=CONNECT_TIMEOUT,
        keepalives=1,
        keepalives_idle=5,
        keepalives_interval=2,
        keepalives_count=3,
        tcp_user_timeout=CLIENT_TCP_USER_TIMEOUT_MS,
    )
    for key, value in extra.items():
        params.setdefault(key, value)  # application_name: the URL's, if it names one
    return psycopg.connect(**params)


class PgLeaderLock:
    def __init__(self, url: str, key: int = LEADER_KEY) -> None:
        self.url = url
        self.key = key
        self._conn: Any = None
        self._held = False
        self._warned = -1e9  # when hold() last logged a failure at warning level

    def hold(self) -> bool:
        try:
            if self._conn is None or self._conn.closed:
                self._held = False
                self._conn = connect(self.url, application_name="openhtc leader lock")
            if self._held:
                self._conn.execute("SELECT 1")  # still alive: the session, hence the lock, is ours
            else:
                row = self._conn.execute("SELECT pg_try_advisory_lock(%s)", (self.key,)).fetchone()
                self._held = bool(row and row[0])
        except Exception as exc:  # unreachable or lost: not leader until a new session takes it
            now = time.monotonic()
            if now - self._warned > 60:  # an outage says so once a minute, not every second
                self._warned = now
                log.warning("leader lock: %s", exc)
            else:
                log.debug("leader lock: %s", exc)
            self._close()
        return self._held

    def _close(self) -> None:
        self._held = False
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):  # already broken
                conn.close()

    def release(self) -> None:
        self._close()  # ending the session frees the lock
