"""Rich renderings of API objects. Pure: they build renderables, callers print them."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from rich.table import Column, Table
from rich.text import Text

from openhtc.cli._common import short_time
from openhtc.client import JOB_STATUSES, StatusCounts

__all__ = [
    "STATUS_STYLES",
    "counts_line",
    "jobs_table",
    "projects_table",
    "status_text",
    "summary_table",
    "tasks_table",
]

STATUS_STYLES = {
    "SUBMITTED_TO_RESCALE": "dim",
    "SUBMITTED_TO_PROVIDER": "dim",
    "RUNNABLE": "cyan",
    "STARTING": "yellow",
    "RUNNING": "blue",
    "SUCCEEDED": "green",
    "FAILED": "red",
    "ACTIVE": "green",
    "ARCHIVED": "yellow",
    "DELETED": "red",
}


def status_text(status: Any) -> Text:
    text = str(status or "-")
    return Text(text, style=STATUS_STYLES.get(text, ""))


def _id(header: str) -> Column:
    """An ID or time column: other columns give way first; folded, never cut with an ellipsis."""
    return Column(header, no_wrap=True, overflow="fold")


def _table(*columns: str | Column) -> Table:
    """A borderless table with bold headers, the look of every listing."""
    return Table(*columns, box=None, header_style="bold")


def _cell(value: Any) -> Text:
    """Plain text cell; never interpreted as Rich markup."""
    return Text("-" if value is None or value == "" else str(value))


def _time_cell(value: Any) -> Text:
    """A timestamp cell: ``2024-05-01 10:00:00``."""
    return _cell(short_time(value))


def projects_table(projects: Iterable[Mapping[str, Any]]) -> Table:
    table = _table(_id("project ID"), "name", "description", "regions", _id("created"))
    for p in projects:
        table.add_row(
            _cell(p.get("projectId")),
            _cell(p.get("projectName")),
            _cell(p.get("projectDescription")),
            _cell(", ".join(p.get("regions") or [])),
            _time_cell(p.get("createdAt")),
        )
    return table


def tasks_table(tasks: Iterable[Mapping[str, Any]]) -> Table:
    table = _table(_id("task ID"), "name", _id("status"), _id("created"), _id("last active"))
    for t in tasks:
        table.add_row(
            _cell(t.get("taskId")),
            _cell(t.get("taskName")),
            status_text(t.get("lifecycleStatus")),
            _time_cell(t.get("createdAt")),
            _time_cell(t.get("lastActiveAt")),
        )
    return table


def jobs_table(jobs: Iterable[Mapping[str, Any]]) -> Table:
    table = _table("job UUID", "status", "exit code", "failure code", "started", "completed")
    for j in jobs:
        container = j.get("container") or {}
        table.add_row(
            _cell(j.get("jobUUID")),
            status_text(j.get("status")),
            _cell(container.get("exitCode")),
            _cell(j.get("failureCode")),
            _time_cell(j.get("startedAt")),
            _time_cell(j.get("completedAt")),
        )
    return table


def summary_table(counts: Mapping[str, int]) -> Table:
    table = _table("status", "jobs")
    for status in (*JOB_STATUSES, *(s for s in counts if s not in JOB_STATUSES)):
        table.add_row(status_text(status), _cell(counts.get(status, 0)))
    table.add_row(Text("total", style="bold"), Text(str(sum(counts.values())), style="bold"))
    return table


def counts_line(counts: StatusCounts) -> str:
    """One line of Rich markup: ``queued 3 · starting 1 · running 5 · succeeded 90 · failed 1``."""
    queued = sum(counts.get(s, 0) for s in ("SUBMITTED_TO_RESCALE", "SUBMITTED_TO_PROVIDER", "RUNNABLE"))
    parts = [
        f"[dim]queued {queued}[/]",
        f"[yellow]starting {counts.get('STARTING', 0)}[/]",
        f"[blue]running {counts.get('RUNNING', 0)}[/]",
        f"[green]succeeded {counts.succeeded}[/]",
        f"[red]failed {counts.failed}[/]",
    ]
    return " · ".join(parts)
