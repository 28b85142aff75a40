"""Local storage: files under ``DATA_DIR/storage/`` in the storage layout.

Credentials are openhtc storage tokens (JWTs listing the prefixes they reach) for openhtc's own
object API; presigned URLs are HMAC-signed upload URLs served by the same API. Jobs see the
files directly through bind mounts (see ``storage.staging``).

Job folders are writable by jobs, so a job may leave symbolic links in them: nothing here
follows one (reads, writes and deletes refuse a path that crosses a link, listings skip links),
or a link could expose host files or another project's storage through the API.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

from openhtc.auth.tokens import TokenService
from openhtc.domain.errors import Conflict, NotFound, PermissionDenied
from openhtc.storage.base import Credentials, ObjectBody, ObjectInfo
from openhtc.storage.layout import Scope

STORAGE_NAME = "openhtc-local"
CHUNK = 1 << 20


class UrlSigner:
    """Signs and checks presigned upload URLs (HMAC-SHA256 over method, key and expiry)."""

    def __init__(self, secret: bytes) -> None:
        self.secret = secret

    def signature(self, key: str, expires: int) -> str:
        message = f"PUT\n{key}\n{expires}".encode()
        return hmac.new(self.secret, message, hashlib.sha256).hexdigest()

    def valid(self, key: str, expires: int, signature: str) -> bool:
        return hmac.compare_digest(self.signature(key, expires), signature)


class _FileUpload:
    """Bytes go to a temporary file beside the store, renamed into place on commit."""

    def __init__(self, backend: LocalBackend, key: str) -> None:
        self.backend = backend
        self.key = key
        backend.tmp_dir.mkdir(parents=True, exist_ok=True)
        fd, self.tmp = tempfile.mkstemp(dir=backend.tmp_dir, prefix="upload-")
        self.fh = os.fdopen(fd, "wb")
        self.size = 0

    def write(self, data: bytes) -> None:
        self.fh.write(data)
        self.size += len(data)

    def commit(self) -> int:
        self.fh.close()
        try:
            path = self.backend.path(self.key)
            self.backend.check_no_links(path)  # before mkdir, which would follow a link
            path.parent.mkdir(parents=True, exist_ok=True)
            os.chmod(self.tmp, 0o644)
            os.replace(self.tmp, path)
        except (FileExistsError, NotADirectoryError, IsADirectoryError):
            self.abort()  # a file where a folder must be, or the reverse: S3 allows both, files not
            raise Conflict(f"{self.key} clashes with an existing object or folder of that name") from None
        except BaseException:
            self.abort()
            raise
        return self.size

    def abort(self) -> None:
        self.fh.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.tmp)


class LocalBackend:
    provider = "UNASSIGNED"  # in the spec's CloudProvider enum, which strict clients enforce
    storage_name = STORAGE_NAME

    def __init__(self, root: Path, tokens: TokenService, signer: UrlSigner) -> None:
        self.root = root.resolve()
        self.tmp_dir = self.root / ".uploads"  # same filesystem, so commits are atomic renames
        self.tokens = tokens
        self.signer = signer

    # -- paths ----------------------------------------------------------------------------------

    def url(self, key: str) -> str:
        return f"openhtc://{STORAGE_NAME}/{key}"

    def path(self, key: str) -> Path:
        return self.root / key

    def check_no_links(self, path: Path) -> None:
        """Refuse a path with a symbolic link anywhere between the store's root and it."""
        current = self.root
        for part in path.relative_to(self.root).parts:
            current = current / part
            try:
                if stat.S_ISLNK(os.lstat(current).st_mode):
                    raise PermissionDenied(f"storage path {path.relative_to(self.root)} crosses a link")
            except FileNotFoundError:
                return

    def _regular_file(self, key: str) -> Path:
        path = self.path(key)
        self.check_no_links(path)
        if not path.is_file():
            raise NotFound(f"no object {key}")
        return path

    # -- objects --------------------------------------------------------------------------------

    def open(self) -> None:
        (self.root / "projects").mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)

    def begin_put(self, key: str) -> _FileUpload:
        return _FileUpload(self, key)

    def put_file(self, key: str, path: str) -> None:
        upload = self.begin_put(key)
        with open(path, "rb") as src:
            shutil.copyfileobj(src, upload.fh, CHUNK)
        upload.commit()

    def get(self, key: str) -> ObjectBody:
        path = self._regular_file(key)
        fh = open(path, "rb")  # noqa: SIM115 - closed by ObjectBody.close once streamed
        size = os.fstat(fh.fileno()).st_size
        return ObjectBody(size, iter(lambda: fh.read(CHUNK), b""), [fh])

    def download(self, key: str, path: str) -> None:
        shutil.copyfile(self._regular_file(key), path)

    def delete(self, key: str) -> None:
        path = self.path(key)
        self.check_no_links(path)
        try:
            path.unlink()
        except (FileNotFoundError, IsADirectoryError):
            return
        self._prune(path.parent)

    def _prune(self, directory: Path) -> None:
        """Remove directories an object deletion left empty, below the task or shared folder
        (those stay: running jobs have them mounted)."""
        stop = self.root / "projects"
        while directory.is_relative_to(stop):
            parts = directory.relative_to(stop).parts
            if len(parts) <= (3 if parts[1:2] == ("tasks",) else 2):
                return
            try:
                directory.rmdir()
            except OSError:
                return
            directory = directory.parent

    def delete_prefix(self, prefix: str) -> int:
        count = sum(1 for _ in self._walk(prefix, None))
        base, _, name = prefix.rpartition("/")
        directory = self.path(base) if base else self.root
        if name == "":
            shutil.rmtree(directory, ignore_errors=True)  # rmtree never follows links
        else:
            for info in list(self._walk(prefix, None)):
                self.delete(info.key)
        return count

    def list(self, prefix: str, after: str | None, limit: int) -> list[ObjectInfo]:
        out: list[ObjectInfo] = []
        for info in self._walk(prefix, after):
            out.append(info)
            if len(out) >= limit:
                break
        return out

    def _walk(self, prefix: str, after: str | None) -> Iterator[ObjectInfo]:
        """Objects under ``prefix`` in key order, lazily, skipping whole subtrees before ``after``."""
        base, _, _ = prefix.rpartition("/")
        directory = self.path(base) if base else self.root
        try:
            self.check_no_links(directory)
        except PermissionDenied:
            return
        yield from self._walk_dir(directory, f"{base}/" if base else "", prefix, after)

    def _walk_dir(
        self, directory: Path, key_base: str, prefix: str, after: str | None
    ) -> Iterator[ObjectInfo]:
        try:
            with os.scandir(directory) as it:
                entries = [(e.name + ("/" if e.is_dir(follow_symlinks=False) else ""), e) for e in it]
        except (FileNotFoundError, NotADirectoryError):
            return
        # Sorting names with a trailing "/" on directories gives exactly the order of full keys.
        for name, entry in sorted(entries, key=lambda pair: pair[0]):
            key = key_base + name
            if not (key.startswith(prefix) or prefix.startswith(key)):
                continue
            if name.endswith("/"):
                if after is not None and after >= key and not after.startswith(key):
                    continue  # everything below sorts before `after`
                if key_base == "" and name == ".uploads/":
                    continue
                yield from self._walk_dir(Path(entry.path), key, prefix, after)
            elif entry.is_file(follow_symlinks=False) and key.startswith(prefix):
                if after is not None and key <= after:
                    continue
                st = entry.stat(follow_symlinks=False)
                yield ObjectInfo(key, st.st_size, st.st_mtime)

    # -- access ---------------------------------------------------------------------------------

    def presign_put(self, key: str, ttl: int, api_url: str) -> tuple[str, float]:
        expires = int(self.tokens.clock.now()) + ttl
        signature = self.signer.signature(key, expires)
        url = f"{api_url}/htc/storage/upload/{quote(key)}?expires={expires}&signature={signature}"
        return url, float(expires)

    def credentials(self, scope: Scope, ttl: int, session: str, api_url: str) -> Credentials:
        token, expires = self.tokens.storage(session, list(scope.rw), list(scope.ro), ttl)
        return Credentials({"OPENHTC_STORAGE_TOKEN": token, "OPENHTC_STORAGE_URL": api_url}, float(expires))
