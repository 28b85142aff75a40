"""``htc top`` (the dashboard's overview, live in a terminal) and ``htc explain JOB``.

Both read openhtc extension routes (docs/extensions.md): ``GET /openhtc/v1/overview`` and
``GET /openhtc/v1/projects/{p}/tasks/{t}/jobs/{j}/explain``.
"""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer
from rich.console import Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from openhtc.cli._common import (
    ApiKeyOption,
    JsonOption,
    ProjectOption,
    TaskOption,
    UrlOption,
    open_session,
    out_console,
    print_json,
    require,
)
from openhtc.client import JOB_STATUSES as STATUSES
from openhtc.client import Connection

SHORT = {"SUBMITTED_TO_RESCALE": "held", "SUBMITTED_TO_PROVIDER": "queued"}
SPARK = " ▁▂▃▄▅▆▇█"


def extension_url(conn: Connection, path: str) -> str:
    """The extensions live beside the Rescale routes, not under /api/v1."""
    root = conn.base_url.removesuffix("/api/v1")
    return f"{root}/openhtc/v1/{path.lstrip('/')}"


def sparkline(values: list[int]) -> str:
    peak = max(values, default=0)
    if not peak:
        return SPARK[0] * len(values)
    return "".join(SPARK[min(len(SPARK) - 1, -(-v * (len(SPARK) - 1) // peak))] for v in values)


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f} s" if value < 120 else f"{value / 60:.1f} min"


def render(view: dict[str, Any]) -> RenderableType:
    ws = view["workspace"]
    limit = ws["vcpuLimit"] if ws["vcpuLimit"] is not None else "unlimited"
    head = Text.assemble(
        ("openhtc top", "bold"), f" · workspace {ws['name']} · vCPUs {ws['vcpusInUse']} / {limit}"
    )
    hour = view["lastHour"]
    ok, failed = hour["succeededPerMinute"], hour["failedPerMinute"]
    throughput = Table.grid(padding=(0, 1))
    throughput.add_row("succeeded/min", Text(sparkline(ok), style="green"), f"{sum(ok)} in the last hour")
    throughput.add_row("failed/min", Text(sparkline(failed), style="red"), f"{sum(failed)} in the last hour")
    throughput.add_row(
        "queue wait", f"p50 {_seconds(hour['queueWaitP50'])}  p95 {_seconds(hour['queueWaitP95'])}",
        f"{hour['started']} started",
    )  # fmt: skip
    projects = Table(title="Projects", title_justify="left", expand=False)
    projects.add_column("project")
    for status in STATUSES:
        projects.add_column(SHORT.get(status, status.lower()), justify="right")
    projects.add_column("vCPUs / limit", justify="right")
    for p in view["projects"]:
        plimit = p["vcpuLimit"] if p["vcpuLimit"] is not None else "∞"
        projects.add_row(
            p["name"], *(str(p["jobs"].get(s, 0)) for s in STATUSES), f"{p['vcpusInUse']} / {plimit}"
        )
    executors = Table(title="Executors", title_justify="left")
    for column in ("executor", "state", "region", "capacity", "leases"):
        executors.add_column(column)
    for e in view["executors"]:
        state = Text("online", style="green") if e["online"] else Text("lost", style="bold red")
        leases = "" if e["leases"] is None else str(e["leases"])
        executors.add_row(
            e["id"], state, f"{e['region']} {','.join(e['architectures'])}",
            f"{e['vcpus']} vCPUs {e['memoryMb'] / 1024:.1f} GiB", leases,
        )  # fmt: skip
    return Group(head, throughput, projects, executors)


def top(
    interval: Annotated[
        float, typer.Option("--interval", "-i", min=0.2, help="Seconds between refreshes.")
    ] = 2.0,
    once: Annotated[bool, typer.Option("--once", help="Print one frame and exit (no live view).")] = False,
    frames: Annotated[
        int, typer.Option("--frames", min=0, help="Stop after N refreshes (0: until Ctrl-C).")
    ] = 0,
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
    json_out: JsonOption = False,
) -> None:
    """A live view of the overview: jobs by project, the last hour's throughput, executors."""
    with open_session(url, api_key) as session:
        conn = session.connection
        fetch = lambda: conn.get(extension_url(conn, "overview"))  # noqa: E731
        if once or json_out:
            view = fetch()
            if json_out:
                print_json(view)
            else:
                out_console().print(render(view))
            return
        shown = 0
        try:
            with Live(render(fetch()), console=out_console(), auto_refresh=False) as live:
                shown = 1
                while not frames or shown < frames:
                    time.sleep(interval)
                    live.update(render(fetch()), refresh=True)
                    shown += 1
        except KeyboardInterrupt:
            raise typer.Exit(130) from None


def explain(
    job_id: Annotated[str, typer.Argument(help="Job ID: PARENT_JOB_ID:INDEX.")],
    project: ProjectOption = None,
    task: TaskOption = None,
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
    json_out: JsonOption = False,
) -> None:
    """Why is a job pending? Its vCPU limits, executors, place in the queue."""
    project_id, task_id = require(project, "--project"), require(task, "--task")
    with open_session(url, api_key) as session:
        conn = session.connection
        answer = conn.get(extension_url(conn, f"projects/{project_id}/tasks/{task_id}/jobs/{job_id}/explain"))
    if json_out:
        print_json(answer)
        return
    out = out_console()
    out.print(f"Job {answer['jobUUID']}: {answer['status']}", highlight=False)
    for reason in answer["reasons"]:
        out.print(f"- {reason['code']}: {reason['message']}", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("top")(top)
    app.command("explain")(explain)
