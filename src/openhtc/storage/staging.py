"""Executor side: give every job its PROJECT_SHARED_FOLDER and TASK_SHARED_FOLDER.

``BindStager`` (local backend): both folders are the store's own directories, bound straight
into the job: shared read-only, the task's folder read-write. Nothing is copied, outputs are in
task storage the moment they are written, and preparing a job is a dictionary lookup.

``SyncStager`` (S3 backends): jobs cannot mount a bucket, so the project's shared prefix is
synced into an executor-side cache (at most once per ``shared_ttl`` seconds per project; only
objects whose size or modification time changed are downloaded) and mounted read-only, and
every attempt gets an empty task folder whose files are uploaded to the task's prefix when the
attempt ends, whatever the outcome (success, failure, timeout, cancel); a folder its job left
empty serves a later attempt of the same task, never another task's. A failed upload is written
to the job's log.

Both skip a task deleted meanwhile: its storage is freed, and an output that a cancelled job
wrote late must not bring it back.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import shutil
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from openhtc.domain.errors import Unavailable, ValidationFailed
from openhtc.domain.models import JobLaunch, Mount
from openhtc.runtimes.base import LogOpener
from openhtc.storage.base import Backend
from openhtc.storage.layout import (
    PROJECT_SHARED_ENV,
    PROJECT_SHARED_MOUNT,
    TASK_SHARED_ENV,
    TASK_SHARED_MOUNT,
    clean_relative,
    shared_prefix,
    task_prefix,
)

log = logging.getLogger("openhtc.storage")
MAX_EMPTY = 256  # empty attempt folders kept for the next attempts
TaskGone = Callable[[str, str], bool]  # (project_id, task_id) -> the task was deleted


class Stager(Protocol):
    def prepare(self, launch: JobLaunch) -> tuple[Mount, ...]:
        """The job's storage mounts; called before the runtime starts it."""
        ...

    def finish(self, launch: JobLaunch, stopped: bool, open_log: LogOpener) -> None:
        """After the attempt ended (``stopped``: cancelled, timed out or lease lost). Never raises."""
        ...


def _mounts(shared: str, task: str) -> tuple[Mount, ...]:
    return (
        Mount(PROJECT_SHARED_ENV, shared, PROJECT_SHARED_MOUNT, True),
        Mount(TASK_SHARED_ENV, task, TASK_SHARED_MOUNT, False),
    )


def job_log(open_log: LogOpener, message: str) -> None:
    """Add a line to the job's log, as the runtimes write them."""
    try:
        with open_log() as fh:
            fh.write(f"{time.time():.6f}\t{message}\n")
    except OSError:
        log.exception("cannot write to a job log")


class NoStager:
    """No storage folders (executors built without storage)."""

    def prepare(self, launch: JobLaunch) -> tuple[Mount, ...]:
        return ()

    def finish(self, launch: JobLaunch, stopped: bool, open_log: LogOpener) -> None:
        return None


class BindStager:
    def __init__(self, root: Path, task_gone: TaskGone) -> None:
        self.root = root.resolve()
        self.task_gone = task_gone
        self._mounts: dict[tuple[str, str], tuple[Mount, ...]] = {}

    def prepare(self, launch: JobLaunch) -> tuple[Mount, ...]:
        key = (launch.project_id, launch.task_id)
        mounts = self._mounts.get(key)
        if mounts is None:
            shared = self.root / shared_prefix(launch.project_id)
            task = self.root / task_prefix(launch.project_id, launch.task_id)
            shared.mkdir(parents=True, exist_ok=True)
            task.mkdir(parents=True, exist_ok=True)
            mounts = _mounts(str(shared), str(task))
            if len(self._mounts) > 10000:
                self._mounts.clear()
            self._mounts[key] = mounts
        return mounts

    def finish(self, launch: JobLaunch, stopped: bool, open_log: LogOpener) -> None:
        if not stopped:
            return
        try:
            if self.task_gone(launch.project_id, launch.task_id):
                self._mounts.pop((launch.project_id, launch.task_id), None)
                shutil.rmtree(self.root / task_prefix(launch.project_id, launch.task_id), ignore_errors=True)
        except Exception:
            log.exception("storage clean-up after job %s failed", launch.job_uuid)


@dataclass
class _SharedCopy:
    path: Path
    lock: threading.Lock = field(default_factory=threading.Lock)
    synced_at: float = float("-inf")
    files: dict[str, tuple[int, float]] = field(default_factory=dict)  # relative path -> (size, mtime)


class SyncStager:
    def __init__(
        self,
        backend: Backend,
        root: Path,
        task_gone: TaskGone,
        shared_ttl: float = 10.0,
        stale_ok: bool = False,
    ) -> None:
        """``stale_ok``: when the store cannot be reached, a shared copy synced before serves
        (``htc agent``, which keeps running jobs while its server is away)."""
        self.backend = backend
        self.stale_ok = stale_ok
        self.cache_root = root / "shared-cache"
        self.stage_root = root / "attempts"
        self.partial_dir = root / "partial"
        self.task_gone = task_gone
        self.shared_ttl = shared_ttl
        self._shared: dict[str, _SharedCopy] = {}
        self._lock = threading.Lock()
        # Attempt folders: one per running attempt; one left empty by its job is used again
        # (creating and removing a directory per job cost more than the rest of staging), but
        # only by a job of the same task: a process the job left behind may still write into it,
        # and what it writes must not reach another task's outputs. Oldest task's first out.
        self._folders: dict[tuple[int, int], Path] = {}
        self._empty: OrderedDict[tuple[str, str], list[Path]] = OrderedDict()
        self._empty_count = 0
        self._names = itertools.count()
        shutil.rmtree(self.stage_root, ignore_errors=True)  # folders of a previous run's attempts
        self.stage_root.mkdir(parents=True, exist_ok=True)

    def prepare(self, launch: JobLaunch) -> tuple[Mount, ...]:
        shared = self._sync_shared(launch.project_id)
        owner = (launch.project_id, launch.task_id)
        with self._lock:
            task = None
            if kept := self._empty.get(owner):
                task = kept.pop()
                self._empty_count -= 1
                if not kept:
                    del self._empty[owner]
            name = next(self._names)
        if task is None or not _empty(task):  # (something wrote late into it: not reused)
            if task is not None:
                shutil.rmtree(task, ignore_errors=True)
            task = self.stage_root / str(name)
            task.mkdir(parents=True)
        with self._lock:
            self._folders[(launch.job_id, launch.attempt)] = task
        return _mounts(str(shared), str(task))

    def finish(self, launch: JobLaunch, stopped: bool, open_log: LogOpener) -> None:
        with self._lock:
            task = self._folders.pop((launch.job_id, launch.attempt), None)
        if task is None:
            return
        empty = False
        try:
            if _empty(task):
                empty = True
                return  # nothing to upload (and no database look-up)
            if self.task_gone(launch.project_id, launch.task_id):
                return
            failed = self._upload(task, task_prefix(launch.project_id, launch.task_id), open_log)
            if failed:
                log.warning("job %s: %d output file(s) not uploaded", launch.job_uuid, failed)
        except Exception as exc:
            log.exception("uploading the outputs of job %s failed", launch.job_uuid)
            job_log(open_log, f"openhtc: uploading TASK_SHARED_FOLDER to task storage failed: {exc}")
        finally:
            dropped = [] if empty else [task]
            if empty:
                with self._lock:
                    owner = (launch.project_id, launch.task_id)
                    self._empty.setdefault(owner, []).append(task)
                    self._empty.move_to_end(owner)
                    self._empty_count += 1
                    while self._empty_count > MAX_EMPTY:
                        oldest = next(iter(self._empty.values()))
                        dropped.append(oldest.pop())
                        self._empty_count -= 1
                        if not oldest:
                            self._empty.popitem(last=False)
            for folder in dropped:
                shutil.rmtree(folder, ignore_errors=True)

    def _upload(self, folder: Path, prefix: str, open_log: LogOpener) -> int:
        """Upload every regular file below ``folder`` (links are not followed); returns failures."""
        failed = 0
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames.sort()
            for name in sorted(filenames):
                path = os.path.join(dirpath, name)
                relative = os.path.relpath(path, folder)
                try:
                    if not stat.S_ISREG(os.lstat(path).st_mode):
                        raise ValueError("not a regular file (links are not uploaded)")
                    clean_relative(relative, "file name")
                    self.backend.put_file(prefix + relative, path)
                except Exception as exc:  # one bad file must not keep the others back
                    failed += 1
                    job_log(open_log, f"openhtc: could not upload TASK_SHARED_FOLDER/{relative}: {exc}")
        return failed

    def _sync_shared(self, project_id: str) -> Path:
        with self._lock:
            copy = self._shared.get(project_id)
            if copy is None:
                copy = _SharedCopy(self.cache_root / shared_prefix(project_id))
                self._shared[project_id] = copy
        with copy.lock:  # one sync at a time per project; the others wait for its result
            if time.monotonic() - copy.synced_at >= self.shared_ttl:
                try:
                    self._sync(copy, shared_prefix(project_id))
                except Unavailable as exc:
                    if not self.stale_ok or copy.synced_at == float("-inf"):
                        raise
                    log.warning(
                        "shared folder of project %s not synced (%s): the last copy serves", project_id, exc
                    )
                copy.synced_at = time.monotonic()  # failed: tried again after the ttl, not per job
        return copy.path

    def _sync(self, copy: _SharedCopy, prefix: str) -> None:
        copy.path.mkdir(parents=True, exist_ok=True)
        listed: dict[str, tuple[int, float]] = {}
        after: str | None = None
        while True:
            page = self.backend.list(prefix, after, 1000)
            for obj in page:
                relative = obj.key[len(prefix) :]
                try:
                    clean_relative(relative, "key")  # a key with '..' must not escape the cache
                except ValidationFailed:
                    log.warning("not staging shared object %r: not a safe file name", obj.key)
                    continue
                listed[relative] = (obj.size, obj.last_modified)
            if len(page) < 1000:
                break
            after = page[-1].key
        for relative, version in listed.items():
            if copy.files.get(relative) == version and (copy.path / relative).is_file():
                continue
            try:
                self._fetch(prefix + relative, copy.path / relative)
                copy.files[relative] = version
            except Exception:
                log.exception("cannot stage shared object %s", prefix + relative)
        for relative in set(copy.files) - set(listed):
            copy.files.pop(relative, None)
            with contextlib.suppress(OSError):
                (copy.path / relative).unlink()

    def _fetch(self, key: str, target: Path) -> None:
        """Download beside the target, then rename: a running job never sees half a file."""
        target.parent.mkdir(parents=True, exist_ok=True)
        self.partial_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.partial_dir / f"{threading.get_ident()}.part"  # outside the mounted folder
        try:
            self.backend.download(key, str(tmp))
            os.chmod(tmp, 0o444)
            os.replace(tmp, target)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()


def _empty(folder: Path) -> bool:
    try:
        with os.scandir(folder) as entries:
            return next(entries, None) is None
    except OSError:
        return False
