"""``htc storage``: list, copy and delete project and task storage; print storage credentials.

Remote paths are written ``htc:PATH`` (relative to the storage root: the task's storage with
``--task``, else the project's shared storage) or as a URI of that storage (``s3://…``,
``openhtc://…``). Inside a job no set-up is needed: the job's token, API URL, project and task
come from its environment.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table
from rich.text import Text

from openhtc.cli._common import (
    ApiKeyOption,
    JsonOption,
    UrlOption,
    err_console,
    fail,
    open_session,
    out_console,
    print_json,
    short_time,
)
from openhtc.cli.aws_config import LOCAL_STORAGE_NOTE, write_profile
from openhtc.client import NotFound
from openhtc.client.storage import REMOTE_PREFIX, StorageClient, StorageEntry
from openhtc.client.storage import Progress as OnBytes
from openhtc.domain.clock import iso

__all__ = ["StorageTarget", "app", "download_keys", "open_storage", "upload_files"]

app = typer.Typer(help="Project and task storage: ls, cp, rm, and credentials for aws/boto3 (token).")

LARGE_TRANSFER = 8 << 20  # bytes: from this size on, a progress bar is drawn

# Inside a job the project and task default to the job's own.
ProjectOpt = Annotated[
    str | None,
    typer.Option(
        "--project", "-p", envvar=["OPENHTC_PROJECT", "RESCALE_HTC_PROJECT_ID"], help="Project ID.",
        show_default=False,
    ),
]  # fmt: skip
TaskOpt = Annotated[
    str | None,
    typer.Option(
        "--task", "-t", envvar=["OPENHTC_TASK", "RESCALE_HTC_TASK_ID"],
        help="Task ID: its storage is the root of htc: paths.", show_default=False,
    ),
]  # fmt: skip
SharedOpt = Annotated[
    bool, typer.Option("--shared", "-s", help="Use the project's shared storage even when a task is set.")
]
RecursiveOpt = Annotated[bool, typer.Option("--recursive", "-r", help="Every object under the path.")]


@dataclass(frozen=True)
class StorageTarget:
    project: str | None
    task: str | None
    shared: bool


@contextmanager
def open_storage(target: StorageTarget, url: str | None, api_key: str | None) -> Iterator[StorageClient]:
    """A StorageClient for the target's task storage, or its project's shared storage."""
    if not target.project:
        raise typer.BadParameter("required (or set OPENHTC_PROJECT)", param_hint="--project")
    with open_session(url, api_key) as session:
        if target.task and not target.shared:
            client = StorageClient.for_task(session.connection, target.project, target.task)
        else:
            client = StorageClient.for_project(session.connection, target.project)
        with client:
            yield client


def _is_remote(path: str) -> bool:
    return path.startswith(REMOTE_PREFIX) or "://" in path


def _as_folder(client: StorageClient, key: str) -> str:
    return key if key == client.root_key or key.endswith("/") else key + "/"


def _stat(client: StorageClient, key: str) -> StorageEntry | None:
    """The object at exactly ``key``, if there is one (the first key listed under it)."""
    first = next(iter(client.list(key)), None)
    return first if first is not None and first.key == key else None


@contextmanager
def _progress(total: int, description: str) -> Iterator[OnBytes | None]:
    """For a large transfer, a byte progress bar on stderr and the callback that advances it."""
    if total < LARGE_TRANSFER:
        yield None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
    with Progress(*columns, TimeRemainingColumn(), console=err_console(), transient=True) as progress:
        task_id = progress.add_task(description, total=total)
        yield lambda n: progress.advance(task_id, n)


def upload_files(client: StorageClient, pairs: list[tuple[Path, str]]) -> None:
    """Upload (local file, key) pairs, one line each."""
    with _progress(sum(path.stat().st_size for path, _ in pairs), "upload") as on_bytes:
        for path, key in pairs:
            client.upload(path, key, on_bytes)
            _report(f"upload: {path} to {client.url(key)}")


def download_keys(client: StorageClient, pairs: list[tuple[StorageEntry, Path]]) -> None:
    """Download (object, local file) pairs, one line each."""
    with _progress(sum(entry.size for entry, _ in pairs), "download") as on_bytes:
        for entry, path in pairs:
            client.download(entry.key, path, on_bytes)
            _report(f"download: {client.url(entry.key)} to {path}")


def _report(line: str) -> None:
    """One line per object on stdout (above the progress bar: Rich redirects stdout while it draws)."""
    out_console().print(Text(line), soft_wrap=True)


def local_target(base: Path, relative: str) -> Path:
    """``base/relative``, refusing object names that would land outside ``base``."""
    target = (base / relative).resolve()
    root = base.resolve()
    if relative.startswith("/") or (target != root and root not in target.parents):
        raise fail(f"refusing to write {relative!r} outside {base}")
    return target


# -- commands -------------------------------------------------------------------------------------


@app.command("ls")
def ls(
    path: Annotated[str, typer.Argument(help="htc:PATH, PATH or a storage URI (default: the root).")] = "",
    project: ProjectOpt = None,
    task: TaskOpt = None,
    shared: SharedOpt = False,
    recursive: RecursiveOpt = False,
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
    json_out: JsonOption = False,
) -> None:
    """List objects and folders; paths are shown relative to the storage root."""
    with open_storage(StorageTarget(project, task, shared), url, api_key) as client:
        key = client.resolve(path)
        entries = list(client.list(_as_folder(client, key), recursive=recursive))
        if not entries and path and not key.endswith("/"):
            found = _stat(client, key)
            entries = [found] if found else []
            if not entries:
                raise fail(f"{path}: no such object or folder")
        if json_out:
            print_json(
                [
                    {
                        "key": e.key,
                        "url": client.url(e.key),
                        "path": client.relative(e.key),
                        "size": e.size,
                        "lastModified": iso(e.last_modified),
                    }
                    for e in entries
                ]
            )
            return
        table = Table(box=None, show_header=False, pad_edge=False)
        for e in entries:
            size = Text("DIR", style="bold") if e.is_dir else Text(str(e.size))
            when = Text(short_time(iso(e.last_modified)) if e.last_modified else "")
            table.add_row(when, size, Text(client.relative(e.key)))
        out_console().print(table)


@app.command("cp")
def cp(
    src: Annotated[str, typer.Argument(help="A local path, or htc:PATH / a storage URI.")],
    dst: Annotated[str, typer.Argument(help="A local path, or htc:PATH / a storage URI.")],
    project: ProjectOpt = None,
    task: TaskOpt = None,
    shared: SharedOpt = False,
    recursive: RecursiveOpt = False,
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
) -> None:
    """Copy files to or from storage; exactly one side is remote. With -r, a folder's contents."""
    if _is_remote(src) == _is_remote(dst):
        raise typer.BadParameter("exactly one of SRC and DST must be remote (htc:PATH or a storage URI)")
    with open_storage(StorageTarget(project, task, shared), url, api_key) as client:
        if _is_remote(dst):
            _upload(client, Path(src), dst, recursive)
        else:
            _download(client, src, Path(dst), recursive)


def _upload(client: StorageClient, src: Path, dst: str, recursive: bool) -> None:
    key = client.resolve(dst)
    if src.is_dir():
        if not recursive:
            raise fail(f"{src} is a directory (use -r to copy its contents)")
        folder = _as_folder(client, key)
        files = sorted(p for p in src.rglob("*") if p.is_file())
        pairs = [(p, folder + p.relative_to(src).as_posix()) for p in files]
    elif src.is_file():
        if dst.endswith("/") or key == client.root_key:
            key = _as_folder(client, key) + src.name
        pairs = [(src, key)]
    else:
        raise fail(f"{src}: no such file or directory")
    upload_files(client, pairs)


def _download(client: StorageClient, src: str, dst: Path, recursive: bool) -> None:
    key = client.resolve(src)
    if recursive:
        folder = _as_folder(client, key)
        entries = [e for e in client.list(folder) if not e.is_dir]
        if not entries:
            raise fail(f"{src}: nothing to download")
        pairs = [(e, local_target(dst, e.key[len(folder) :])) for e in entries]
    else:
        entry = _stat(client, key)
        if entry is None:
            raise fail(f"{src}: no such object (use -r for a folder)")
        name = key.rsplit("/", 1)[-1]
        target = dst / name if dst.is_dir() or str(dst).endswith(os.sep) else dst
        pairs = [(entry, target)]
    download_keys(client, pairs)


@app.command("rm")
def rm(
    path: Annotated[str, typer.Argument(help="htc:PATH, PATH or a storage URI.")],
    project: ProjectOpt = None,
    task: TaskOpt = None,
    shared: SharedOpt = False,
    recursive: RecursiveOpt = False,
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
) -> None:
    """Delete an object, or with -r every object under a folder."""
    with open_storage(StorageTarget(project, task, shared), url, api_key) as client:
        key = client.resolve(path)
        if recursive:
            keys = [e.key for e in client.list(_as_folder(client, key))]
        else:
            if _stat(client, key) is None:
                raise fail(f"{path}: no such object (use -r for a folder)")
            keys = [key]
        for k in keys:
            with suppress(NotFound):  # deleted meanwhile: the outcome asked for
                client.delete(k)
            _report(f"delete: {client.url(k)}")
        if recursive:
            out_console().print(f"{len(keys)} objects deleted.", highlight=False)


@app.command("token")
def token(
    project: ProjectOpt = None,
    task: TaskOpt = None,
    shared: SharedOpt = False,
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
    json_out: JsonOption = False,
) -> None:
    """Print storage credentials as shell exports: eval "$(htc storage token -p P -t T)"."""
    with open_storage(StorageTarget(project, task, shared), url, api_key) as client:
        current = client.token
    if current.is_local:
        err_console().print(f"note: {LOCAL_STORAGE_NOTE}", highlight=False, soft_wrap=True)
    if json_out:
        print_json(current.raw)
        return
    for name, value in current.environment().items():
        print(f"export {name}={shlex.quote(value)}")


@app.command("configure-aws")
def configure_aws(
    project: ProjectOpt = None,
    profile: Annotated[
        str, typer.Option("--profile", help="AWS CLI profile to write (default: default).")
    ] = "default",
    config_file: Annotated[
        Path,
        typer.Option(
            "--config-file", envvar="AWS_CONFIG_FILE", help="AWS config file (default: ~/.aws/config)."
        ),
    ] = Path("~/.aws/config"),
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
) -> None:
    """Write the S3 endpoint and region into an AWS CLI profile, once: afterwards the three
    AWS_* keys of a storage token suffice for `aws s3` (as in Rescale's tutorial)."""
    if not project:
        with open_session(url, api_key) as session:
            first = next(iter(session.projects()), None)
        if first is None:
            raise fail("no project yet: create one (htc projects create NAME) or give --project")
        project = first.id
    with open_storage(StorageTarget(project, None, True), url, api_key) as client:
        current = client.token
    if current.is_local:
        raise fail(LOCAL_STORAGE_NOTE)
    endpoint = current.credentials.get("AWS_ENDPOINT_URL")
    if not endpoint:
        raise fail("this server's storage is AWS S3 itself: the AWS CLI needs no endpoint")
    region = (
        current.credentials.get("AWS_DEFAULT_REGION") or current.credentials.get("AWS_REGION") or "us-east-1"
    )
    path = config_file.expanduser()
    write_profile(path, profile, endpoint, region)
    out_console().print(
        f"{path}: profile {profile} now sends S3 requests to {endpoint} (region {region})", highlight=False
    )
    if profile != "default":
        out_console().print(f"use it with: export AWS_PROFILE={profile}", highlight=False)
