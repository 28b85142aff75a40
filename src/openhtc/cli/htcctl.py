"""``htcctl``: Rescale's storage tool, as jobs and the HTC tutorial call it.

    htcctl [--project-shared|-s] [--project-id P] [--task-id T] upload FILES...
    htcctl [-s] [--project-id P] [--task-id T] download KEYS... [-d DIR]
    htcctl [-s] [--project-id P] [--task-id T] list

Without ``-s`` the storage is the task's, with it the project's shared storage. Object keys keep
the local relative path (``upload data/in.txt`` -> ``data/in.txt``) and ``download`` writes each
key at that relative path under DIR. Inside a job everything comes from its environment
(``RESCALE_HTC_BEARER_TOKEN``/``RESCALE_HTC_REFRESH_TOKEN``, ``RESCALE_HTC_PROJECT_ID``,
``RESCALE_HTC_TASK_ID``, ``OPENHTC_API_URL``); elsewhere ``RESCALE_API_TOKEN`` holds an API key.
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

from openhtc.cli._common import HtcGroup, fail
from openhtc.cli.storage import StorageTarget, download_keys, local_target, open_storage, upload_files
from openhtc.client.storage import StorageClient, StorageEntry

__all__ = ["app", "main"]

DEFAULT_API_URL = "http://127.0.0.1:8080/api/v1"

app = typer.Typer(
    name="htcctl",
    help="Upload, download and list project and task storage (Rescale htcctl compatible).",
    cls=HtcGroup,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


@dataclass(frozen=True)
class _Context:
    target: StorageTarget
    url: str | None
    api_key: str | None


@app.callback()
def options(
    ctx: typer.Context,
    project_shared: Annotated[
        bool, typer.Option("--project-shared", "-s", help="Use the project's shared storage.")
    ] = False,
    project_id: Annotated[
        str | None, typer.Option("--project-id", envvar="RESCALE_HTC_PROJECT_ID", help="Project ID.")
    ] = None,
    task_id: Annotated[
        str | None, typer.Option("--task-id", envvar="RESCALE_HTC_TASK_ID", help="Task ID.")
    ] = None,
    api_url: Annotated[
        str | None,
        typer.Option(
            "--api-url",
            envvar=["OPENHTC_API_URL", "RESCALE_API_URL"],
            help=f"API base URL (default: {DEFAULT_API_URL}, or the `htc login` server).",
        ),
    ] = None,
) -> None:
    # An API key in RESCALE_API_TOKEN, else what every openhtc client reads (job tokens, htc login).
    api_key = os.environ.get("RESCALE_API_TOKEN") or None
    ctx.obj = _Context(StorageTarget(project_id, task_id, project_shared), api_url, api_key)


def _key_path(path: Path) -> str:
    """The key of a local file: its path relative to the working directory when it lies
    under it (``data/in.txt``), else its name."""
    absolute = Path(os.path.abspath(path))  # normalised: no ".." in keys
    try:
        return absolute.relative_to(Path.cwd()).as_posix()
    except ValueError:
        return path.name


@app.command()
def upload(
    ctx: typer.Context, files: Annotated[list[Path], typer.Argument(help="Files or directories.")]
) -> None:
    """Upload files (directories: every file in them), keeping their relative paths as keys."""
    pairs: list[tuple[Path, str]] = []
    for path in files:
        if path.is_dir():
            pairs += [(p, _key_path(p)) for p in sorted(path.rglob("*")) if p.is_file()]
        elif path.is_file():
            pairs.append((path, _key_path(path)))
        else:
            raise fail(f"{path}: no such file or directory")
    with _open(ctx) as client:
        upload_files(client, [(p, client.root_key + key) for p, key in pairs])


@app.command()
def download(
    ctx: typer.Context,
    keys: Annotated[list[str], typer.Argument(help="Object keys (or folders) relative to the storage.")],
    directory: Annotated[Path, typer.Option("--directory", "-d", help="Where to write them.")] = Path(),
) -> None:
    """Download objects to DIR/KEY (a folder key: every object under it)."""
    with _open(ctx) as client:
        pairs: list[tuple[StorageEntry, Path]] = []
        for rel in keys:
            key = client.resolve(rel)
            entries = [e for e in client.list(key) if e.key == key or e.key.startswith(key.rstrip("/") + "/")]
            if not entries:
                raise fail(f"{rel}: no such object in {client.url(client.root_key)}")
            pairs += [(e, local_target(directory, e.key[len(client.root_key) :])) for e in entries]
        download_keys(client, pairs)


@app.command("list")
def list_(ctx: typer.Context) -> None:
    """Print every key of the storage, relative to it, one per line."""
    with _open(ctx) as client:
        for entry in client.list(client.root_key):
            print(client.relative(entry.key))


def _open(ctx: typer.Context) -> AbstractContextManager[StorageClient]:
    opts: _Context = ctx.obj
    project_id, task_id, project_shared = opts.target.project, opts.target.task, opts.target.shared
    if not project_id:
        raise typer.BadParameter("required (or set RESCALE_HTC_PROJECT_ID)", param_hint="--project-id")
    if not project_shared and not task_id:
        raise typer.BadParameter(
            "required for task storage (or set RESCALE_HTC_TASK_ID; -s selects project storage)",
            param_hint="--task-id",
        )
    return open_storage(opts.target, opts.url, opts.api_key)


def main() -> None:
    app()
