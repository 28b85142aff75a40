"""PostgreSQL ``LISTEN``/``NOTIFY`` for the cluster notifier (services/notify.py).

Two dedicated autocommit connections per server, outside the pool: one sends, one listens. A
notification is a hint ("look again"), so a failure to send is dropped (the timers of the loops
and waiters cover it), and a listener that lost its connection reconnects and tells the server
to look at everything, since it may have missed notifications meanwhile.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

from openhtc.store.leader_lock import connect

log = logging.getLogger("openhtc.notify")

CHANNEL = "openhtc_changes"
RECONNECT_SECONDS = 1.0


class PgChannel:
    def __init__(self, url: str) -> None:
        self.url = url
        self._send_conn: Any = None
        self._listen_conn: Any = None

    def send(self, payloads: Sequence[str]) -> None:
        """NOTIFY each payload, in one statement; raises when the database cannot be reached."""
        try:
            if self._send_conn is None or self._send_conn.closed:
                self._send_conn = connect(self.url, application_name="openhtc notify")
            self._send_conn.execute(
                "SELECT pg_notify(%s, p) FROM unnest(%s::text[]) AS p", (CHANNEL, list(payloads))
            )
        except Exception:
            self._close_send()
            raise

    def _close_send(self) -> None:
        conn, self._send_conn = self._send_conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    def listen(self, deliver: Callable[[str | None], None], stopping: threading.Event) -> None:
        """Feed each payload received to ``deliver`` until ``stopping`` is set; after a
        reconnection ``deliver(None)`` says that notifications may have been missed."""
        first = True
        quiet = False  # an outage is announced once; the retries each second say nothing new
        while not stopping.is_set():
            try:
                conn = connect(self.url, application_name="openhtc listen")
                self._listen_conn = conn
                conn.execute(f"LISTEN {CHANNEL}")
                if not first:
                    log.info("notify: listening again")
                    deliver(None)
                first = quiet = False
                while not stopping.is_set():
                    for note in conn.notifies(timeout=0.5):
                        deliver(note.payload)
            except Exception as exc:
                if stopping.is_set():
                    break
                reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
                log.log(
                    logging.DEBUG if quiet else logging.WARNING,
                    "notify: not listening (%s); retrying",
                    reason,
                )
                first, quiet = False, True
                stopping.wait(RECONNECT_SECONDS)
            finally:
                self._close_listen()

    def _close_listen(self) -> None:
        conn, self._listen_conn = self._listen_conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    def close(self) -> None:
        self._close_send()
