"""PROJECT_SHARED_FOLDER and TASK_SHARED_FOLDER for the jobs of ``htc agent``.

An agent cannot see the server's store (its data directory, or a bucket it has no credentials
for), so it stages both folders through the server's object API: a ``SyncStager`` (the one S3
uses on the server: the shared folder synced read-only into a cache at most once per
``shared_ttl``, only changed objects fetched; an empty task folder per attempt (one a job of the
same task left empty, or a new one), uploaded when the attempt ends whatever its outcome; a
deleted task skipped) over an ``HttpBackend``. Every call
made for a job carries that job's own token, taken from its lease: its task's folder read-write,
its project's shared folder read-only, nothing else. The same on either server storage.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from openhtc.domain.models import JobLaunch, Mount
from openhtc.runtimes.base import LogOpener
from openhtc.storage.http_backend import HttpBackend, JobToken
from openhtc.storage.staging import SyncStager

log = logging.getLogger("openhtc.agent")


class LeaseStager:
    """A ``SyncStager`` over the object API, each call acting as the job it is made for."""

    def __init__(self, api_url: str, root: Path, shared_ttl: float = 10.0) -> None:
        self.backend = HttpBackend(api_url)
        self.inner = SyncStager(self.backend, root, self.backend.task_deleted, shared_ttl, stale_ok=True)
        self._tokens: dict[tuple[int, int], JobToken] = {}  # attempt -> its token, until it ends
        # after an attempt's outputs, before its end is reported: the agent ships its last lines
        self.after_finish: Callable[[JobLaunch], None] = lambda launch: None

    def close(self) -> None:
        self.backend.close()

    def prepare(self, launch: JobLaunch) -> tuple[Mount, ...]:
        key = (launch.job_id, launch.attempt)
        token = JobToken.of(launch) or self._tokens.get(key)
        if token is None:  # not a lease of a server (no job token): no storage to stage
            return ()
        with self.backend.acting_as(token):
            mounts = self.inner.prepare(launch)
        # kept only once staged: an attempt whose staging raised is never finished
        self._tokens[key] = token
        return mounts

    def finish(self, launch: JobLaunch, stopped: bool, open_log: LogOpener) -> None:
        try:
            self._finish(launch, stopped, open_log)
        finally:
            self.after_finish(launch)

    def _finish(self, launch: JobLaunch, stopped: bool, open_log: LogOpener) -> None:
        token = self._tokens.pop((launch.job_id, launch.attempt), None) or JobToken.of(launch)
        if token is None:  # nothing was staged for it
            return
        with self.backend.acting_as(token):
            self.inner.finish(launch, stopped, open_log)
