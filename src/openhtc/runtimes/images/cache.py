"""A content-addressed cache of unpacked root filesystems, shared by an executor's jobs.

Layout under ``root``: ``<config-digest-hex>/rootfs/`` and ``<hex>/meta.json`` (image config,
size), ``locks/<hex>.lock``. An image is unpacked into a ``.tmp-*`` directory and renamed into
place, so a reader never sees half an image. Per-digest thread locks plus a file lock make
concurrent jobs, and executors sharing the directory, pull each image once.

A job's image name is resolved to a digest at most once per ``tag_ttl`` seconds per
(project, image): within that time a job costs a dictionary lookup; after it, one HEAD request
tells whether the tag moved (a re-pushed tag is picked up on the next resolution).

Images in use hold a shared ``flock`` on their ``meta.json``; eviction (least recently used
first, once the cache exceeds ``max_bytes``) takes the exclusive lock without waiting, so an
image in use by this or another executor is never removed.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from openhtc.runtimes.base import ImagePull, ImageSource
from openhtc.runtimes.images.oci import ImageConfig, ImageError
from openhtc.runtimes.images.registry import Manifest, RegistryClient
from openhtc.runtimes.images.unpack import LayerUnpacker

log = logging.getLogger("openhtc.images")


@dataclass(frozen=True, slots=True)
class PreparedImage:
    key: str  # hex of the image config digest
    rootfs: str
    config: ImageConfig


@dataclass(slots=True)
class _Resolution:
    top_digest: str  # what the tag pointed at (manifest or index)
    key: str
    expires: float


@contextlib.contextmanager
def _file_lock(path: str, flags: int = fcntl.LOCK_EX) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, flags)
        yield
    finally:
        os.close(fd)


class ImageCache:
    def __init__(
        self,
        root: str,
        max_bytes: int,
        tag_ttl: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        on_evict: Callable[[str], None] | None = None,
    ) -> None:
        self.root = os.path.abspath(root)
        self.max_bytes = max_bytes
        self.tag_ttl = tag_ttl
        self.clock = clock
        self.on_evict = on_evict  # told the rootfs path of an image leaving the cache
        self.pulls = 0  # images this process downloaded and unpacked (tests, metrics)
        os.makedirs(os.path.join(self.root, "locks"), exist_ok=True)
        self._lock = threading.Lock()
        self._resolved: dict[tuple[str, str], _Resolution] = {}
        self._by_top: dict[str, str] = {}  # manifest/index digest -> key
        self._ready: dict[str, PreparedImage] = {}
        self._users: dict[str, int] = {}
        self._holds: dict[str, int] = {}  # key -> fd holding LOCK_SH on meta.json
        self._key_locks: dict[str, threading.Lock] = {}
        self._clear_stale_temp()

    # -- public -----------------------------------------------------------------------------

    def acquire(self, project_id: str, image_name: str, source: ImageSource) -> PreparedImage:
        """The unpacked image a job of ``project_id`` names, marked in use until ``release``."""
        name = (project_id, image_name)
        with self._lock:
            res = self._resolved.get(name)
            if res is not None and res.expires > self.clock():
                image = self._use(res.key)
                if image is not None:
                    return image
        with self._named_lock(f"name:{project_id}/{image_name}"):
            with self._lock:  # another thread may have resolved it meanwhile
                res = self._resolved.get(name)
                if res is not None and res.expires > self.clock():
                    image = self._use(res.key)
                    if image is not None:
                        return image
            try:
                pull = source.pull_access(project_id, image_name)
            except Exception as exc:  # NotFound, ImageUnavailable, registry down: all say why
                raise ImageError(str(exc) or type(exc).__name__) from exc
            with RegistryClient(pull) as client:
                key, top, manifest = self._resolve(client, res)
                with self._lock:
                    self._resolved[name] = _Resolution(top, key, self.clock() + self.tag_ttl)
                    self._by_top[top] = key
                    image = self._use(key)
                if image is None:
                    self._ensure(key, client, pull, manifest)
                    with self._lock:
                        image = self._use(key)
                    if image is None:
                        raise ImageError(f"image {key[:12]} vanished from the cache while starting")
                    self._evict(keep=key)
                return image

    def release(self, image: PreparedImage) -> None:
        with self._lock:
            left = self._users.get(image.key, 1) - 1
            if left > 0:
                self._users[image.key] = left
                return
            self._users.pop(image.key, None)
            fd = self._holds.pop(image.key, None)
        if fd is not None:
            os.close(fd)

    # -- resolution and pulls ---------------------------------------------------------------

    def _resolve(
        self, client: RegistryClient, previous: _Resolution | None
    ) -> tuple[str, str, Manifest | None]:
        """(key, top digest, manifest if fetched) the tag names now: a HEAD request when the
        tag was resolved before and may not have moved."""
        if previous is not None:
            top = client.head_digest()
            with self._lock:
                key = self._by_top.get(top or "")
            if key is not None and top is not None:
                return key, top, None
        manifest = client.manifest()
        return manifest.config.digest.split(":", 1)[1], manifest.digest, manifest

    def _ensure(self, key: str, client: RegistryClient, pull: ImagePull, manifest: Manifest | None) -> None:
        final = os.path.join(self.root, key)
        with self._named_lock(f"key:{key}"), _file_lock(self._lock_path(key)):
            if not os.path.exists(os.path.join(final, "meta.json")):
                manifest = manifest or client.manifest()
                if manifest.config.digest.split(":", 1)[1] != key:  # the tag moved in between
                    raise ImageError(f"the tag {pull.tag} changed while pulling; try again")
                self._pull(client, manifest, final)
            with self._lock:
                self._ready[key] = self._load(key)

    def _pull(self, client: RegistryClient, manifest: Manifest, final: str) -> None:
        started = time.monotonic()
        work = tempfile.mkdtemp(prefix=f".tmp-{os.getpid()}-", dir=self.root)
        try:
            config = ImageConfig.from_json(client.config(manifest.config))
            unpacker = LayerUnpacker(os.path.join(work, "rootfs"))
            for layer in manifest.layers:
                with tempfile.TemporaryFile(dir=work) as blob:
                    client.blob_to(layer, blob)
                    blob.seek(0)
                    unpacker.apply(blob)
            unpacker.finish()
            meta = {"image": config.to_json(), "size": unpacker.size, "manifest": manifest.digest}
            with open(os.path.join(work, "meta.json"), "w") as fh:
                json.dump(meta, fh)
            shutil.rmtree(final, ignore_errors=True)  # a leftover without meta.json
            os.rename(work, final)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        self.pulls += 1
        log.info(
            "pulled %s@%s (%d layers, %.1f MB) in %.2f s",
            client.pull.repository,
            manifest.digest[:19],
            len(manifest.layers),
            unpacker.size / 1e6,
            time.monotonic() - started,
        )

    def _load(self, key: str) -> PreparedImage:
        with open(os.path.join(self.root, key, "meta.json")) as fh:
            meta = json.load(fh)
        return PreparedImage(
            key, os.path.join(self.root, key, "rootfs"), ImageConfig.from_json(meta["image"])
        )

    # -- use tracking and eviction (hold self._lock) -----------------------------------------

    def _use(self, key: str) -> PreparedImage | None:
        image = self._ready.get(key)
        if image is None:
            return None
        if key not in self._holds:
            try:
                fd = os.open(os.path.join(self.root, key, "meta.json"), os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:  # another executor evicted it
                self._ready.pop(key, None)
                return None
            fcntl.flock(fd, fcntl.LOCK_SH)
            self._holds[key] = fd
            os.utime(os.path.join(self.root, key))  # least-recently-used order
        self._users[key] = self._users.get(key, 0) + 1
        return image

    def _evict(self, keep: str) -> None:
        entries = []
        for name in os.listdir(self.root):
            meta = os.path.join(self.root, name, "meta.json")
            try:
                with open(meta) as fh:
                    size = int(json.load(fh).get("size", 0))
                mtime = os.stat(os.path.join(self.root, name)).st_mtime
            except (OSError, ValueError):
                continue
            entries.append((mtime, name, size))
        total = sum(size for _, _, size in entries)
        for _, key, size in sorted(entries):
            if total <= self.max_bytes:
                return
            if key == keep:
                continue
            with self._lock:
                trash = None if self._users.get(key) else self._try_remove(key)
            if trash is None:
                continue
            if self.on_evict is not None:
                self.on_evict(os.path.join(self.root, key, "rootfs"))
            shutil.rmtree(trash, ignore_errors=True)
            total -= size
            log.info("evicted image %s (%.1f MB) from the cache", key[:12], size / 1e6)

    def _try_remove(self, key: str) -> str | None:
        """Move an image no one uses out of the cache; returns where it went (to delete)."""
        lock_fd = os.open(self._lock_path(key), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                meta_fd = os.open(os.path.join(self.root, key, "meta.json"), os.O_RDONLY | os.O_CLOEXEC)
            except (BlockingIOError, FileNotFoundError):
                return None
            try:
                fcntl.flock(meta_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return None  # in use by another executor
            finally:
                os.close(meta_fd)
            trash = tempfile.mkdtemp(prefix=".trash-", dir=self.root)
            os.rename(os.path.join(self.root, key), os.path.join(trash, key))
        finally:
            os.close(lock_fd)
        self._ready.pop(key, None)
        return trash

    # -- helpers ----------------------------------------------------------------------------

    def _lock_path(self, key: str) -> str:
        return os.path.join(self.root, "locks", f"{key}.lock")

    @contextlib.contextmanager
    def _named_lock(self, name: str) -> Iterator[None]:
        with self._lock:
            lock = self._key_locks.setdefault(name, threading.Lock())
        with lock:
            yield

    def _clear_stale_temp(self) -> None:
        """Remove what a crashed pull or eviction left (``.tmp-PID-*`` of dead processes)."""
        for name in os.listdir(self.root):
            if name.startswith(".trash-"):
                shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)
            elif name.startswith(".tmp-"):
                pid = name.split("-")[1]
                if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
                    shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)
