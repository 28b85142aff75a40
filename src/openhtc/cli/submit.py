"""``htc submit``: build HTCJobSubmitRequests from a file and flags, submit, optionally wait."""

from __future__ import annotations

import copy
import enum
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from openhtc.cli._common import (
    ApiKeyOption,
    JsonOption,
    ProjectOption,
    TaskOption,
    UrlOption,
    err_console,
    fail,
    open_session,
    out_console,
    print_json,
    require,
)
from openhtc.cli.render import counts_line, summary_table
from openhtc.client import HtcError, JobBatch, StatusCounts, Task, normalize_priority

__all__ = ["SubmitOverrides", "build_requests", "load_request_file", "parse_envs", "submit"]


class PriorityChoice(enum.StrEnum):
    economy = "economy"
    priority = "priority"


@dataclass
class SubmitOverrides:
    """Flags of ``htc submit``; ``None`` means "keep the file's value, else the default"."""

    command: list[str] = field(default_factory=list)
    image: str | None = None
    batch_size: int | None = None
    group: str | None = None
    envs: list[dict[str, str]] = field(default_factory=list)
    vcpus: int | None = None
    memory: int | None = None
    timeout: int | None = None
    retries: int | None = None
    priority: str | None = None
    architecture: str | None = None
    job_name: str | None = None


def parse_envs(items: Sequence[str], environ: Mapping[str, str] | None = None) -> list[dict[str, str]]:
    """``K=V`` → ``{"name": K, "value": V}``; a bare ``K`` copies ``$K`` from the environment."""
    environ = os.environ if environ is None else environ
    pairs: list[dict[str, str]] = []
    for item in items:
        name, sep, value = item.partition("=")
        if not name:
            raise typer.BadParameter(f"{item!r}: expected NAME=VALUE", param_hint="--env")
        if not sep:
            if name not in environ:
                raise typer.BadParameter(f"{name} is not set; use NAME=VALUE", param_hint="--env")
            value = environ[name]
        pairs.append({"name": name, "value": value})
    return pairs


def load_request_file(path: str) -> list[dict[str, Any]]:
    """Read one HTCJobSubmitRequest or a list of them from a YAML or JSON file (``-``: stdin)."""
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
        data = yaml.safe_load(text)
    except OSError as exc:
        raise typer.BadParameter(f"cannot read {path}: {exc.strerror or exc}", param_hint="--file") from exc
    except yaml.YAMLError as exc:
        raise typer.BadParameter(f"{path} is not valid YAML/JSON: {exc}", param_hint="--file") from exc
    items = data if isinstance(data, list) else [data]
    if not items or not all(isinstance(item, dict) for item in items):
        raise typer.BadParameter(
            f"{path} must hold an HTCJobSubmitRequest object or a list of them", param_hint="--file"
        )
    return items


def _merge_envs(existing: Any, overrides: list[dict[str, str]]) -> list[dict[str, str]]:
    merged: dict[str, str] = {}
    if isinstance(existing, Mapping):
        merged.update({str(k): str(v) for k, v in existing.items()})
    elif isinstance(existing, list):
        merged.update({str(e["name"]): str(e.get("value", "")) for e in existing if isinstance(e, Mapping)})
    merged.update({e["name"]: e["value"] for e in overrides})
    return [{"name": k, "value": v} for k, v in merged.items()]


def build_requests(
    base: Sequence[Mapping[str, Any]] | None, o: SubmitOverrides
) -> list[tuple[str | None, dict[str, Any]]]:
    """Apply flags over file requests (or over an empty one); return ``(group, request)`` pairs.

    A non-standard ``group`` key in a file request selects its group (the wire takes the group
    as a query parameter); ``--group`` overrides it.
    """
    result: list[tuple[str | None, dict[str, Any]]] = []
    for index, item in enumerate(base or [{}]):
        request = copy.deepcopy(dict(item))
        file_group = request.pop("group", None)
        group = o.group or (str(file_group) if file_group else None)
        definition = request.get("htcJobDefinition")
        if definition is None:
            definition = request["htcJobDefinition"] = {}
        elif not isinstance(definition, dict):
            raise typer.BadParameter(
                f"request {index}: htcJobDefinition must be an object", param_hint="--file"
            )

        if o.job_name is not None or "jobName" not in request:
            request["jobName"] = o.job_name or "htc-submit"
        if o.batch_size is not None or "batchSize" not in request:
            request["batchSize"] = o.batch_size or 1
        if o.image is not None:
            definition["imageName"] = o.image
        if not definition.get("imageName"):
            # No default: the container runtimes run only images in the project's registry.
            raise typer.BadParameter(
                "no image: give one with -i/--image REPO:TAG (an image of the project's registry: "
                "`htc image push`, `htc image ls`) or the file's htcJobDefinition.imageName",
                param_hint="--image",
            )
        if o.command:
            definition["commands"] = list(o.command)
        if not definition.get("commands"):
            raise typer.BadParameter(
                "no command: give one after `--` (htc submit ... -- CMD ARGS) or in the file's "
                "htcJobDefinition.commands"
            )
        if o.vcpus is not None or "maxVCpus" not in definition:
            definition["maxVCpus"] = o.vcpus or 1
        if o.memory is not None or "maxMemory" not in definition:
            definition["maxMemory"] = o.memory or 4000
        if o.envs or "envs" in definition:
            definition["envs"] = _merge_envs(definition.get("envs"), o.envs)
        if o.timeout is not None:
            definition["execTimeoutSeconds"] = o.timeout
        if o.priority is not None:
            definition["priority"] = normalize_priority(o.priority)
        if o.architecture is not None:
            definition["architecture"] = o.architecture.upper()
        if o.retries is not None:
            request["retryStrategy"] = {**(request.get("retryStrategy") or {}), "maxRetries": o.retries}
        result.append((group, request))
    return result


def _submit_all(task: Task, pairs: list[tuple[str | None, dict[str, Any]]], created: bool) -> list[JobBatch]:
    """Submit by group; if the first submission into a task made for it is refused (an unknown
    image, say), the task is deleted again: a failed ``htc submit`` leaves no empty task."""
    by_group: dict[str | None, list[dict[str, Any]]] = {}
    for group, request in pairs:
        by_group.setdefault(group, []).append(request)
    batches: list[JobBatch] = []
    for group, requests in by_group.items():
        try:
            batches.extend(task.submit_requests(requests, group=group))
        except HtcError:
            if created and not batches:
                task.delete()
            raise
    return batches


def _wait(
    task: Task, batches: list[JobBatch], poll: float, timeout: float | None, show: bool
) -> StatusCounts:
    groups = {b.group for b in batches}
    wait_groups: list[str] | None = None if None in groups else sorted(g for g in groups if g is not None)
    expected = sum(b.batch_size for b in batches)
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console(),
        disable=not show,
    )
    with progress:
        bar = progress.add_task("waiting", total=expected)

        def on_progress(counts: StatusCounts) -> None:
            progress.update(
                bar,
                completed=counts.finished,
                total=max(counts.total, expected),
                description=counts_line(counts),
            )

        return task.wait(wait_groups, timeout=timeout, poll=poll, on_progress=on_progress, expected=expected)


def submit(
    command: Annotated[
        list[str] | None,
        typer.Argument(help="The command and its arguments, after `--`.", show_default=False),
    ] = None,
    project: ProjectOption = None,
    task_id: TaskOption = None,
    task_name: Annotated[
        str | None, typer.Option("--task-name", help="Name of the task created when --task is omitted.")
    ] = None,
    file: Annotated[
        str | None,
        typer.Option(
            "--file",
            "-f",
            help="YAML or JSON file holding one HTCJobSubmitRequest or a list of them ('-' reads stdin). "
            "Flags override its fields.",
            show_default=False,
        ),
    ] = None,
    image: Annotated[
        str | None,
        typer.Option(
            "--image",
            "-i",
            help="Image: REPO:TAG in the project's registry (htc image ls).",
            show_default=False,
        ),
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", "-n", min=1, max=1000, help="Jobs in the batch (default 1).")
    ] = None,
    group: Annotated[str | None, typer.Option("--group", "-g", help="Group of the submitted jobs.")] = None,
    env: Annotated[
        list[str] | None,
        typer.Option(
            "--env", "-e", help="NAME=VALUE, repeatable; a bare NAME copies $NAME.", show_default=False
        ),
    ] = None,
    vcpus: Annotated[int | None, typer.Option("--vcpus", min=1, help="maxVCpus per job (default 1).")] = None,
    memory: Annotated[
        int | None, typer.Option("--memory", min=4, help="maxMemory in MiB (default 4000).")
    ] = None,
    timeout: Annotated[
        int | None,
        typer.Option("--timeout", min=60, max=1209600, help="execTimeoutSeconds per job (60 to 1209600)."),
    ] = None,
    retries: Annotated[
        int | None, typer.Option("--retries", min=0, max=10, help="retryStrategy.maxRetries.")
    ] = None,
    priority: Annotated[
        PriorityChoice | None, typer.Option("--priority", case_sensitive=False, help="Scheduling priority.")
    ] = None,
    architecture: Annotated[
        str | None, typer.Option("--architecture", help="AARCH64, X86 or A100.", show_default=False)
    ] = None,
    job_name: Annotated[
        str | None, typer.Option("--name", help="jobName of the batch.", show_default=False)
    ] = None,
    wait: Annotated[
        bool,
        typer.Option("--wait", "-w", help="Show progress until every job finished; exit 1 if any failed."),
    ] = False,
    poll: Annotated[
        float,
        typer.Option(
            "--poll", min=0.05, help="Seconds between polls with --wait (servers without pushed waits)."
        ),
    ] = 1.0,
    wait_timeout: Annotated[
        float | None, typer.Option("--wait-timeout", help="Give up waiting after this many seconds (exit 2).")
    ] = None,
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
    json_out: JsonOption = False,
) -> None:
    """Submit a batch of jobs.

    Example: htc submit -p PROJECT -t TASK -n 10 -- sh -c 'echo $AWS_BATCH_JOB_ARRAY_INDEX'.
    Options go before the command. Without --task a new task is created. With --wait, exits 0
    when every job succeeded, 1 otherwise.
    """
    project_id = require(project, "--project")
    overrides = SubmitOverrides(
        command=list(command or []),
        image=image,
        batch_size=batch_size,
        group=group,
        envs=parse_envs(env or []),
        vcpus=vcpus,
        memory=memory,
        timeout=timeout,
        retries=retries,
        priority=priority.value if priority is not None else None,
        architecture=architecture,
        job_name=job_name,
    )
    pairs = build_requests(load_request_file(file) if file else None, overrides)
    out = out_console()
    with open_session(url, api_key) as session:
        if task_id:
            task = session.task(project_id, task_id)
            batches = _submit_all(task, pairs, created=False)
        else:
            name = task_name or time.strftime("htc-submit-%Y%m%d-%H%M%S")
            task = session.project(project_id).create_task(name, "created by htc submit")
            batches = _submit_all(task, pairs, created=True)
            if not json_out:
                out.print(f"Created task [bold]{task.id}[/] ({name})", highlight=False)
        result: dict[str, Any] = {
            "projectId": task.project_id,
            "taskId": task.id,
            "batches": [b.data for b in batches],
        }
        if not json_out:
            total = sum(b.batch_size for b in batches)
            out.print(f"Submitted {total} job(s) in {len(batches)} batch(es) to task [bold]{task.id}[/]")
            for b in batches:
                out.print(
                    f"  batch {b.parent_job_id}  group {b.group or '-'}  jobs {b.batch_size}", highlight=False
                )
        if not wait:
            if json_out:
                print_json(result)
            return
        try:
            counts = _wait(task, batches, poll, wait_timeout, show=not json_out)
        except TimeoutError:
            raise fail(f"gave up waiting after {wait_timeout} s; the jobs keep running", code=2) from None
        except KeyboardInterrupt:
            raise fail(
                "interrupted; the jobs keep running "
                f"(htc cancel -p {task.project_id} -t {task.id} stops them)",
                code=130,
            ) from None
    if json_out:
        print_json({**result, "summary": dict(counts)})
    else:
        out.print(summary_table(counts))
        if counts.failed:
            out.print(f"[red]{counts.failed} of {counts.total} job(s) failed[/]")
        else:
            out.print(f"[green]All {counts.total} job(s) succeeded[/]")
    if counts.failed:
        raise typer.Exit(1)
