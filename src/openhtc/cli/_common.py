"""Shared CLI plumbing: common options, session creation, error reporting, output."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Annotated, Any

import click
import typer
from rich.console import Console
from typer.core import TyperGroup

from openhtc.client import HtcConnectionError, HtcError, Session

__all__ = [
    "ApiKeyOption",
    "CommonOptions",
    "HtcGroup",
    "JsonOption",
    "ProjectOption",
    "TaskOption",
    "UrlOption",
    "err_console",
    "fail",
    "open_session",
    "out_console",
    "print_json",
    "short_time",
]

UrlOption = Annotated[
    str | None,
    typer.Option(
        "--url",
        envvar="OPENHTC_URL",
        help="Server URL, e.g. http://127.0.0.1:8080 (/api/v1 is optional). Default: the `htc login` URL.",
        show_default=False,
    ),
]
ApiKeyOption = Annotated[
    str | None,
    typer.Option(
        "--api-key",
        envvar="OPENHTC_API_KEY",
        help="API key. Default: the key stored by `htc login`, or in-job tokens.",
        show_default=False,
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]
ProjectOption = Annotated[
    str | None,
    typer.Option("--project", "-p", envvar="OPENHTC_PROJECT", help="Project ID.", show_default=False),
]
TaskOption = Annotated[
    str | None, typer.Option("--task", "-t", envvar="OPENHTC_TASK", help="Task ID.", show_default=False)
]


def out_console() -> Console:
    """Console for results. Not a terminal: wide, so piped tables never fold or cut IDs."""
    return Console(highlight=False, width=None if sys.stdout.isatty() else 240)


def err_console() -> Console:
    return Console(stderr=True, highlight=False)


def print_json(value: Any) -> None:
    """Write JSON to stdout, bypassing Rich (no markup, no wrapping)."""
    sys.stdout.write(json.dumps(value, indent=2, default=str) + "\n")
    sys.stdout.flush()


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print a one-line error to stderr and return the ``typer.Exit`` to raise."""
    err_console().print(f"[bold red]error:[/] {message}", markup=True, highlight=False, soft_wrap=True)
    return typer.Exit(code)


def short_time(value: Any) -> str:
    """``2024-05-01T10:00:00.123Z`` → ``2024-05-01 10:00:00``; ``None`` → ``-``."""
    if not value:
        return "-"
    text = str(value).replace("T", " ")
    text = text.split(".", 1)[0].removesuffix("Z")
    return text


@dataclass(frozen=True)
class CommonOptions:
    """Options given on a command group (``htc tasks -p P ls``) and inherited by its commands."""

    url: str | None = None
    api_key: str | None = None
    json: bool = False
    project: str | None = None


def inherited(ctx: typer.Context) -> CommonOptions:
    obj = ctx.find_object(CommonOptions)
    return obj if obj is not None else CommonOptions()


_ENVVARS = {"--project": "OPENHTC_PROJECT", "--task": "OPENHTC_TASK"}


def require(value: str | None, option: str) -> str:
    if not value:
        envvar = _ENVVARS.get(option)
        hint = f" (or set {envvar})" if envvar else ""
        raise typer.BadParameter(f"required{hint}", param_hint=option)
    return value


def open_session(url: str | None, api_key: str | None) -> Session:
    """A Session for the given URL/key, else the environment, else the `htc login` file."""
    try:
        return Session(url, api_key)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--url") from exc


def plain_metavars(command: Any) -> None:
    """Help without Typer's ``<bool>``/``<str>`` type placeholders: flags show nothing, other
    options their name (``--data-dir DATA_DIR``), arguments their name only; explicit metavars
    stay."""
    help_option = command.get_help_option(click.Context(command, info_name=command.name))
    for param in [*command.params, *([help_option] if help_option else [])]:
        if param.param_type_name == "option" and param.metavar is None:
            param.metavar = "" if getattr(param, "is_flag", False) else (param.name or "value").upper()
        elif param.param_type_name == "argument":
            param.display_type_rich = lambda ctx: None  # its name column says it already
    for sub in getattr(command, "commands", {}).values():
        plain_metavars(sub)


class HtcGroup(TyperGroup):
    """The root command group: turns client errors into one-line messages and exit code 1."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        plain_metavars(self)  # here: Typer adds the commands after __init__
        return super().main(*args, **kwargs)

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except HtcConnectionError as exc:
            raise fail(f"{exc.message} (is the server running? set --url or OPENHTC_URL)") from None
        except HtcError as exc:
            raise fail(str(exc)) from None
