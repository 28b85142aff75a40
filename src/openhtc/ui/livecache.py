"""A one-second cache of the dashboard's live parts (the fragments htmx polls for).

Many open dashboards following one task ask for the same fragment every 2 to 3 seconds; each
answer costs the server a few database reads and a render, on the interpreter that also runs
the scheduler and the executor. Within ``ttl`` seconds a fragment is answered once per audience.
What a page shows depends only on the workspace and the role of its viewer (every lookup is
scoped by workspace; roles decide the admin-only columns), so that is the key, with the URL;
a fragment is at most ``ttl`` seconds older than a fresh one. The pages consult it only after
their own scope checks, and not for job tokens (scoped to one task, which the key does not hold).
"""

from __future__ import annotations

import threading
import time

from openhtc.auth.tokens import Principal


class LiveCache:
    def __init__(self, ttl: float = 1.0, size: int = 512) -> None:
        self.ttl = ttl
        self.size = size
        self._lock = threading.Lock()
        self._items: dict[tuple[str, str, bool, str], tuple[float, str]] = {}

    @staticmethod
    def key(who: Principal, url: str) -> tuple[str, str, bool, str]:
        return (who.workspace_id, who.role, who.is_job, url)

    def get(self, key: tuple[str, str, bool, str]) -> str | None:
        with self._lock:
            found = self._items.get(key)
        if found is None or found[0] < time.monotonic():
            return None
        return found[1]

    def put(self, key: tuple[str, str, bool, str], body: str) -> None:
        now = time.monotonic()
        with self._lock:
            if len(self._items) >= self.size:
                self._items = {k: v for k, v in self._items.items() if v[0] >= now}
                if len(self._items) >= self.size:
                    self._items.clear()
            self._items[key] = (now + self.ttl, body)
