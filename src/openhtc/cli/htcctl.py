"""``htcctl``: Rescale's storage tool, as jobs and the HTC tutorial call it.

    htcctl [--project-shared|-s] [--project-id P] [--task-id T] upload FILES...
    htcctl [-s] [--project-id P] [--task-id T] download KEYS... [-d DIR]
    htcctl [-s] [--project-id P] [--task-id T] list

Without ``-s`` the storage is the task's, with it the project's shared storage. Object keys keep
the local relative path (``upload data/in.txt`` -> ``data/in.txt``) and ``download`` writes each
key at that relative path under DIR.

This module needs nothing but Python's standard library (3.7 or later) and imports nothing from
openhtc, so ``htc htcctl-bundle OUT`` can pack it into one file that runs in any image with a
``python3``. It speaks openhtc's object API (``/htc/storage/objects``, ``/htc/storage/list``),
which serves every storage backend, so no S3 library is needed and a call costs one or two HTTP
requests.

Where things come from (first found wins):

- the API: ``--api-url``, ``$OPENHTC_API_URL`` (set in jobs), ``$RESCALE_API_URL``,
  ``$OPENHTC_URL``, the ``htc login`` file;
- the secret: ``$RESCALE_API_TOKEN`` or ``$OPENHTC_API_KEY`` (an API key), a job's
  ``$RESCALE_HTC_BEARER_TOKEN`` / ``$RESCALE_HTC_REFRESH_TOKEN``, the ``htc login`` file's key;
- project and task: ``--project-id``/``--task-id``, ``$RESCALE_HTC_PROJECT_ID``/``$RESCALE_HTC_TASK_ID``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlencode, urlsplit

if TYPE_CHECKING:
    import http.client

__all__ = ["HtcctlError", "main"]

API_PREFIX = "/api/v1"
PAGE = 1000
CHUNK = 1 << 20
TIMEOUT = 300.0
JOB_MARKERS = ("RESCALE_HTC_BEARER_TOKEN", "AWS_BATCH_JOB_ID")  # set in every job's environment


class HtcctlError(Exception):
    """A failure to report on one line; the exit status is 1."""


def normalize_url(url: str) -> str:
    """``host:8080``, ``http://host:8080/`` and ``…/api/v1`` all become ``http://host:8080/api/v1``."""
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    return url if url.endswith(API_PREFIX) else url + API_PREFIX


def _login_file(env: Mapping[str, str]) -> dict[str, str]:
    """``htc login``'s credentials file (``{"url", "api_key"}``), or {}."""
    base = env.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    try:
        with open(os.path.join(base, "openhtc", "credentials.json"), encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: v for k, v in data.items() if isinstance(v, str) and v}


def in_job(env: Mapping[str, str]) -> bool:
    return any(env.get(name) for name in JOB_MARKERS)


class Api:
    """The API's base URL and one credential, turned into a bearer token when first needed."""

    def __init__(self, url: str | None, env: Mapping[str, str]) -> None:
        self.env = env
        self._conns: dict[tuple[str, str], http.client.HTTPConnection] = {}
        login = _login_file(env)
        chosen = url or env.get("OPENHTC_API_URL") or env.get("RESCALE_API_URL") or env.get("OPENHTC_URL")
        if not chosen and not login.get("url"):
            raise HtcctlError("no API URL: pass --api-url URL or set RESCALE_API_URL (or run `htc login`)")
        self.base = normalize_url(chosen or login["url"])
        self.api_key = env.get("RESCALE_API_TOKEN") or env.get("OPENHTC_API_KEY") or None
        self.refresh = env.get("RESCALE_HTC_REFRESH_TOKEN") or None
        self.bearer = None if self.api_key else env.get("RESCALE_HTC_BEARER_TOKEN") or None
        # the login file's key, only for the server it was stored for
        same_server = login.get("url") and normalize_url(login["url"]) == self.base
        if not (self.api_key or self.refresh or self.bearer) and same_server:
            self.api_key = login.get("api_key")
        if not (self.api_key or self.refresh or self.bearer):
            raise HtcctlError("no credentials: set RESCALE_API_TOKEN to an API key (or run `htc login`)")

    def _renew(self) -> None:
        auth = f"Token {self.api_key}" if self.api_key else f"Refresh {self.refresh}"
        what = "RESCALE_API_TOKEN's API key" if self.api_key else "the job's refresh token"
        try:
            with self._open("GET", self.base + "/auth/token", {"Authorization": auth}) as response:
                self.bearer = str(json.loads(response.read())["tokenValue"])
        except _Status as exc:
            raise HtcctlError(f"{what} was refused: {exc.message}") from None
        except (ValueError, KeyError):
            raise HtcctlError(
                f"{self.base}/auth/token did not answer a token: is this an openhtc API?"
            ) from None

    def request(self, method: str, url: str, body: Any = None, headers: dict[str, str] | None = None) -> Any:
        """One authenticated request; on 401 once more with a new bearer token if one can be had."""
        if self.bearer is None:
            self._renew()
        try:
            return self._open(method, url, self._headers(headers), body)
        except _Status as exc:
            if exc.code != 401 or not (self.api_key or self.refresh):
                raise HtcctlError(exc.message) from None
        self._renew()  # the bearer token expired: a new one, and the request again
        if hasattr(body, "seek"):
            body.seek(0)
        try:
            return self._open(method, url, self._headers(headers), body)
        except _Status as exc:
            raise HtcctlError(exc.message) from None

    def _headers(self, extra: dict[str, str] | None) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.bearer}", **(extra or {})}

    def _open(self, method: str, url: str, headers: dict[str, str], body: Any = None) -> Any:
        """One request on a kept-alive connection; the response, to be read (or closed) before
        the next request."""
        from http.client import RemoteDisconnected  # here: main() may keep ssl out first

        parts = urlsplit(url)
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        for attempt in (0, 1):
            conn = self._connection(parts.scheme, parts.netloc)
            try:
                conn.request(method, target, body=body, headers=headers)
                response = conn.getresponse()
                break
            except (RemoteDisconnected, BrokenPipeError, ConnectionResetError) as exc:
                self._conns.pop((parts.scheme, parts.netloc), None)  # a kept-alive connection closed
                if attempt or hasattr(body, "read"):
                    raise HtcctlError(f"cannot reach {self.base}: {exc}. {self.hint()}") from None
            except OSError as exc:
                self._conns.pop((parts.scheme, parts.netloc), None)
                reason = exc.strerror or exc
                raise HtcctlError(f"cannot reach {self.base}: {reason}. {self.hint()}") from None
        if response.status >= 400:
            raise _Status(response.status, f"{method} {parts.path}: {response.status} {_reason(response)}")
        return response

    def _connection(self, scheme: str, netloc: str) -> http.client.HTTPConnection:
        import http.client

        conn = self._conns.get((scheme, netloc))
        if conn is None:
            cls = http.client.HTTPSConnection if scheme == "https" else http.client.HTTPConnection
            conn = self._conns[(scheme, netloc)] = cls(netloc, timeout=TIMEOUT)
        return conn

    def hint(self) -> str:
        if in_job(self.env):
            return (
                "This job may have no network access to the openhtc API "
                "(see the server's job network setting); the job's storage is also in "
                "$PROJECT_SHARED_FOLDER and $TASK_SHARED_FOLDER."
            )
        return "Is the server running there? Set the URL with --api-url or RESCALE_API_URL."


class _Status(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _reason(response: http.client.HTTPResponse) -> str:
    try:
        body = json.loads(response.read() or b"{}")
    except ValueError:
        body = {}
    message = body.get("message") or body.get("errorDescription") if isinstance(body, dict) else None
    return str(message or response.reason)


class Storage:
    """One project's shared storage, or one task's storage, through the object API."""

    def __init__(self, api: Api, project: str, task: str | None) -> None:
        self.api = api
        self.project = project
        quoted = quote(project, safe="")
        self.root = (
            f"projects/{quoted}/tasks/{quote(task, safe='')}/" if task else (f"projects/{quoted}/shared/")
        )

    def _object_url(self, key: str) -> str:
        return f"{self.api.base}/htc/storage/objects/{quote(key)}"

    def keys(self, prefix: str) -> Iterator[tuple[str, int]]:
        """(key, size) of every object under ``prefix``, in key order."""
        query = urlencode({"prefix": prefix, "pageSize": PAGE})
        url: str | None = f"{self.api.base}/htc/storage/list?{query}"
        while url:
            with self.api.request("GET", url) as response:
                body = json.loads(response.read())
            for item in body.get("items", []):
                yield str(item["key"]), int(item.get("size", 0))
            url = body.get("next") if body.get("items") else None

    def upload(self, path: Path, key: str) -> None:
        size = path.stat().st_size
        headers = {"Content-Length": str(size), "Content-Type": "application/octet-stream"}
        with open(path, "rb") as fh, self.api.request("PUT", self._object_url(key), fh, headers) as response:
            response.read()  # all of it: the connection is kept for the next request

    def download(self, key: str, target: Path) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = str(target.parent / f".{target.name}.{os.getpid()}.part")
        try:
            with open(tmp, "wb") as out, self.api.request("GET", self._object_url(key)) as response:
                while True:
                    data = response.read(CHUNK)
                    if not data:
                        break
                    out.write(data)
            os.replace(tmp, target)
        except BaseException:
            os.unlink(tmp)
            raise


def _key_of(path: Path) -> str:
    """The key of a local file: its path relative to the working directory when it lies under
    it (``data/in.txt``), else its name."""
    absolute = Path(os.path.abspath(str(path)))  # normalised: no ".." in keys
    try:
        return absolute.relative_to(Path.cwd()).as_posix()
    except ValueError:
        return path.name


def _inside(base: Path, relative: str) -> Path:
    """``base/relative``, refusing object names that would land outside ``base``."""
    target = (base / relative).resolve()
    root = base.resolve()
    if relative.startswith("/") or (target != root and root not in target.parents):
        raise HtcctlError(f"refusing to write {relative!r} outside {base}")
    return target


def upload(store: Storage, files: list[str]) -> None:
    pairs: list[tuple[Path, str]] = []
    for name in files:
        path = Path(name)
        if path.is_dir():
            pairs += [(p, _key_of(p)) for p in sorted(path.rglob("*")) if p.is_file()]
        elif path.is_file():
            pairs.append((path, _key_of(path)))
        else:
            raise HtcctlError(f"{name}: no such file or directory")
    for path, key in pairs:
        store.upload(path, store.root + key)
        print(f"upload: {path} to {key}", flush=True)


def download(store: Storage, keys: list[str], directory: Path) -> None:
    pairs: list[tuple[str, Path]] = []
    for rel in keys:
        parts = rel.strip("/").split("/")
        if not rel.strip("/") or any(part in (".", "..") for part in parts):
            raise HtcctlError(f"{rel}: not an object key")
        key = store.root + rel.strip("/")
        found = [k for k, _ in store.keys(key) if k == key or k.startswith(key + "/")]
        if not found:
            raise HtcctlError(f"{rel}: no such object in {store.root}")
        pairs += [(k, _inside(directory, k[len(store.root) :])) for k in found]
    for key, target in pairs:
        store.download(key, target)
        print(f"download: {key[len(store.root) :]} to {target}", flush=True)


def list_(store: Storage) -> None:
    for key, _ in store.keys(store.root):
        print(key[len(store.root) :])


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="htcctl",
        description="Upload, download and list project and task storage (Rescale htcctl compatible).",
    )
    p.add_argument("-s", "--project-shared", action="store_true", help="use the project's shared storage")
    p.add_argument("--project-id", help="project ID (default: $RESCALE_HTC_PROJECT_ID)")
    p.add_argument("--task-id", help="task ID (default: $RESCALE_HTC_TASK_ID)")
    p.add_argument(
        "--api-url",
        help="API base URL (default: $OPENHTC_API_URL, $RESCALE_API_URL, $OPENHTC_URL, or `htc login`'s)",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    up = sub.add_parser(
        "upload", help="upload files (directories: every file in them), keys = relative paths"
    )
    up.add_argument("files", nargs="+", metavar="FILE")
    down = sub.add_parser("download", help="download objects (a folder key: every object under it)")
    down.add_argument("keys", nargs="+", metavar="KEY")
    down.add_argument("-d", "--directory", default=".", help="where to write them (default: .)")
    sub.add_parser("list", help="print every key of the storage, relative to it")
    return p


def run(argv: list[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    env = os.environ if env is None else env
    p = parser()
    args = p.parse_args(argv)
    if args.command is None:
        p.print_help()
        return 2
    project = args.project_id or env.get("RESCALE_HTC_PROJECT_ID")
    task = args.task_id or env.get("RESCALE_HTC_TASK_ID")
    if not project:
        p.error("--project-id is required (or set RESCALE_HTC_PROJECT_ID)")
    if not args.project_shared and not task:
        p.error(
            "--task-id is required for task storage (or set RESCALE_HTC_TASK_ID; -s selects project storage)"
        )
    try:
        store = Storage(Api(args.api_url, env), project, None if args.project_shared else task)
        if args.command == "upload":
            upload(store, args.files)
        elif args.command == "download":
            download(store, args.keys, Path(args.directory))
        else:
            list_(store)
    except HtcctlError as exc:
        print(f"htcctl: error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # a local file, a broken response: still one line, and its kind
        print(f"htcctl: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


def main() -> None:
    """The process entry point (the console script and the bundle's ``__main__``)."""
    # Plain HTTP needs no ssl: not loading OpenSSL saves a good part of a call's start-up.
    if not any(v.startswith("https:") for v in sys.argv + list(os.environ.values())):
        sys.modules.setdefault("ssl", None)  # type: ignore[arg-type]
    sys.exit(run())


if __name__ == "__main__":
    main()
