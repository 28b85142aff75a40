"""``htc map``: run a Lambda-style handler over the events of a JSON Lines file, collect the results."""

from __future__ import annotations

import json
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import IO, Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from openhtc.cli._common import (
    ApiKeyOption,
    ProjectOption,
    TaskOption,
    UrlOption,
    err_console,
    fail,
    open_session,
    require,
)
from openhtc.client import FunctionBatch, FunctionCall, FunctionError, HtcError, Task

__all__ = ["map_events", "read_events"]

SHOWN_FAILURES = 5  # failures listed one per line; the first one's traceback is printed too


def read_events(path: str) -> list[Any]:
    """The JSON values of a JSON Lines file ('-': stdin), one event per non-blank line."""
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise typer.BadParameter(f"cannot read {path}: {exc.strerror or exc}", param_hint="--events") from exc
    events: list[Any] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            events.append(json.loads(line))
        except ValueError as exc:
            raise typer.BadParameter(
                f"{path} line {number} is not JSON: {exc}", param_hint="--events"
            ) from exc
    if not events:
        raise typer.BadParameter(f"{path} holds no events (one JSON value per line)", param_hint="--events")
    return events


def _line(call: FunctionCall) -> str:
    record = {
        "index": call.index,
        "status": call.status,
        "result": call.result,
        "error": call.error,
        "attempt": call.attempt,
        "failureCode": call.failure_code,
    }
    return json.dumps(record, separators=(",", ":")) + "\n"


def _collect(batch: FunctionBatch, out: IO[str], show: bool) -> list[FunctionCall]:
    """Write every call's line in index order as it ends; return the failed calls."""
    failures: list[FunctionCall] = []
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console(),
        disable=not show,
    )
    with progress:
        bar = progress.add_task("calls", total=batch.count)
        last = 0.0
        for call in batch.calls():
            out.write(_line(call))
            if not call.ok:
                failures.append(call)
            now = time.monotonic()
            if now - last > 0.1 or call.index == batch.count - 1:  # redraws cost more than calls
                counts = batch.counts
                progress.update(
                    bar,
                    completed=counts.done,
                    description=f"[green]succeeded {counts.succeeded}[/] · [red]failed {counts.failed}[/]",
                )
                last = now
    return failures


def _report_failures(failures: list[FunctionCall], total: int) -> None:
    console = err_console()
    console.print(f"[bold red]{len(failures)} of {total} call(s) failed[/]", highlight=False)
    for call in failures[:SHOWN_FAILURES]:
        error = FunctionError.from_call(call)
        line = f"  call {error.index}: {error.type}: {error.message}"
        console.print(line, markup=False, highlight=False, soft_wrap=True)
    if len(failures) > SHOWN_FAILURES:
        console.print(f"  … and {len(failures) - SHOWN_FAILURES} more", highlight=False)
    first = FunctionError.from_call(failures[0])
    if first.traceback:
        console.print(f"remote traceback of call {first.index}:", highlight=False)
        console.print(first.traceback.rstrip(), markup=False, highlight=False, soft_wrap=True)


def map_events(
    image: Annotated[str, typer.Argument(help="Image the handler runs in: REPO:TAG (htc image ls).")],
    handler: Annotated[
        str, typer.Argument(help="The handler: package.module.function, called as handler(event, context).")
    ],
    events: Annotated[
        str,
        typer.Option(
            "--events",
            "-e",
            help="JSON Lines file: one event per line ('-' reads stdin).",
            show_default=False,
        ),
    ],
    code: Annotated[
        str | None,
        typer.Option(
            "--code", help="A zip of handler code in the project's shared storage.", show_default=False
        ),
    ] = None,
    out: Annotated[
        str | None,
        typer.Option(
            "--out",
            "-o",
            help="Write the results here as JSON Lines (index, status, result, error, attempt, failureCode), "
            "in event order. Default: stdout.",
            show_default=False,
        ),
    ] = None,
    project: ProjectOption = None,
    task_id: TaskOption = None,
    task_name: Annotated[
        str | None, typer.Option("--task-name", help="Name of the task created when --task is omitted.")
    ] = None,
    vcpus: Annotated[int, typer.Option("--vcpus", min=1, help="maxVCpus of each worker.")] = 1,
    memory: Annotated[int, typer.Option("--memory", min=4, help="maxMemory of each worker in MiB.")] = 512,
    timeout: Annotated[int, typer.Option("--timeout", min=1, help="Seconds each call may run.")] = 60,
    retries: Annotated[
        int, typer.Option("--retries", min=0, max=10, help="Retries of a call whose worker died.")
    ] = 0,
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
) -> None:
    """Call HANDLER once per event in warm workers of IMAGE and collect the results in order.

    Example: htc map -p PROJECT py:1 handlers.double --events events.jsonl --out results.jsonl.
    Exits 0 when every call succeeded, 1 when any failed (each failure is listed, with the
    first one's remote traceback). Ctrl-C cancels the calls still running.
    """
    project_id = require(project, "--project")
    payload = read_events(events)
    show = sys.stderr.isatty()
    console = err_console()
    with open_session(url, api_key) as session:
        created = task_id is None
        if task_id:
            task: Task = session.task(project_id, task_id)
        else:
            name = task_name or time.strftime("htc-map-%Y%m%d-%H%M%S")
            task = session.project(project_id).create_task(name, "created by htc map")
        try:
            batch = task.submit_functions(
                image, handler, payload, code=code, max_vcpus=vcpus, max_memory=memory,
                timeout=timeout, retries=retries,
            )  # fmt: skip
        except HtcError:
            if created:
                task.delete()  # a refused map leaves no empty task behind
            raise
        console.print(
            f"Submitted {batch.count} call(s) to task [bold]{task.id}[/] "
            f"(project {task.project_id}, batch {', '.join(batch.batch_ids)})",
            highlight=False,
            soft_wrap=True,
        )
        target = open(out, "w", encoding="utf-8") if out else nullcontext(sys.stdout)  # noqa: SIM115
        try:
            with target as sink:
                failures = _collect(batch, sink, show)
        except KeyboardInterrupt:
            cancelled = batch.cancel()
            raise fail(f"interrupted; cancelled {cancelled} call(s) still to finish", code=130) from None
    if failures:
        _report_failures(failures, batch.count)
        raise typer.Exit(1)
    console.print(
        f"[green]All {batch.count} call(s) succeeded[/]" + (f"; results in {out}" if out else ""),
        highlight=False,
    )
