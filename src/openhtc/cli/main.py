"""The ``htc`` command line: client commands here, ``server``/``admin`` from ``openhtc.cli.server``."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from openhtc.cli._common import (
    ApiKeyOption,
    CommonOptions,
    HtcGroup,
    JsonOption,
    ProjectOption,
    TaskOption,
    UrlOption,
    inherited,
    open_session,
    out_console,
    print_json,
    require,
)
from openhtc.cli.agent import register as register_agent
from openhtc.cli.alloc import register as register_alloc
from openhtc.cli.bundle import htcctl_bundle
from openhtc.cli.cluster import register as register_cluster
from openhtc.cli.image import image_app
from openhtc.cli.map import map_events
from openhtc.cli.render import jobs_table, projects_table, summary_table, tasks_table
from openhtc.cli.server import register
from openhtc.cli.storage import app as storage_app
from openhtc.cli.submit import submit
from openhtc.cli.top import register as register_top
from openhtc.client import (
    DEFAULT_URL,
    JOB_STATUSES,
    Connection,
    api,
    live,
    load_credentials,
    normalize_base_url,
    save_credentials,
)

__all__ = ["app", "main"]

app = typer.Typer(
    name="htc",
    help="openhtc: High Throughput Computing, compatible with the Rescale HTC API.",
    cls=HtcGroup,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
projects_app = typer.Typer(help="List and create projects (`htc projects` lists them).")
tasks_app = typer.Typer(help="List, create, archive and delete tasks (`htc tasks -p P` lists them).")
app.add_typer(projects_app, name="projects")
app.add_typer(tasks_app, name="tasks")
app.add_typer(image_app, name="image")
app.add_typer(storage_app, name="storage")


def _merge(
    ctx: typer.Context, url: str | None, api_key: str | None, json_out: bool, project: str | None = None
) -> CommonOptions:
    parent = inherited(ctx)
    return CommonOptions(
        url=url or parent.url,
        api_key=api_key or parent.api_key,
        json=json_out or parent.json,
        project=project or parent.project,
    )


# -- login / whoami --------------------------------------------------------------------------


@app.command()
def login(url: UrlOption = None, api_key: ApiKeyOption = None, json_out: JsonOption = False) -> None:
    """Verify an API key against the server and store it for later commands (mode 0600)."""
    stored = load_credentials()
    try:
        base = normalize_base_url(url or (stored.url if stored else DEFAULT_URL))
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--url") from exc
    key = api_key or typer.prompt(f"API key for {base}", hide_input=True).strip()
    with Connection(base, api_key=key) as conn:
        conn.bearer_token()  # GET /auth/token: fails with Unauthorized on a bad key
        claims = api.get_auth_token_whoami(conn)
    path = save_credentials(base, key)
    if json_out:
        print_json({"url": base, "credentialsPath": str(path), "whoami": claims})
        return
    who = claims.get("userEmail") or claims.get("sub") or "?"
    out_console().print(
        f"Logged in to {base} as [bold]{who}[/]. Credentials saved to {path}.", highlight=False
    )


_WHOAMI_FIELDS = (
    ("user", "userFullName"),
    ("email", "userEmail"),
    ("user ID", "sub"),
    ("workspace", "workspaceName"),
    ("workspace ID", "workspaceId"),
    ("organization", "organizationCode"),
    ("roles", "groups"),
)


@app.command()
def whoami(url: UrlOption = None, api_key: ApiKeyOption = None, json_out: JsonOption = False) -> None:
    """Show who the credentials belong to (the bearer token's claims)."""
    with open_session(url, api_key) as session:
        claims = session.whoami()
        server = session.url
    if json_out:
        print_json(claims)
        return
    table = Table(box=None, show_header=False)
    table.add_row("server", Text(server))
    for label, key in _WHOAMI_FIELDS:
        value = claims.get(key)
        if value not in (None, "", []):
            table.add_row(label, Text(", ".join(map(str, value)) if isinstance(value, list) else str(value)))
    exp = claims.get("exp")
    if isinstance(exp, int | float):
        table.add_row("token expires", datetime.fromtimestamp(exp, UTC).strftime("%Y-%m-%d %H:%M:%S UTC"))
    out_console().print(table)


app.command("submit", context_settings={"allow_interspersed_args": False})(submit)
app.command("htcctl-bundle")(htcctl_bundle)
app.command("map")(map_events)


# -- projects --------------------------------------------------------------------------------


def _list_projects(opts: CommonOptions) -> None:
    with open_session(opts.url, opts.api_key) as session:
        projects = list(api.iter_htc_projects(session.connection))
    if opts.json:
        print_json(projects)
    else:
        out_console().print(projects_table(projects))


@projects_app.callback(invoke_without_command=True)
def projects_main(
    ctx: typer.Context, url: UrlOption = None, api_key: ApiKeyOption = None, json_out: JsonOption = False
) -> None:
    ctx.obj = CommonOptions(url, api_key, json_out)
    if ctx.invoked_subcommand is None:
        _list_projects(ctx.obj)


@projects_app.command("ls")
def projects_ls(
    ctx: typer.Context, url: UrlOption = None, api_key: ApiKeyOption = None, json_out: JsonOption = False
) -> None:
    """List the projects you can see."""
    _list_projects(_merge(ctx, url, api_key, json_out))


@projects_app.command("create")
def projects_create(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Project name.")],
    description: Annotated[str, typer.Option("--description", "-d", help="Project description.")] = "",
    region: Annotated[
        list[str] | None, typer.Option("--region", help="Region, repeatable (default: the server's).")
    ] = None,
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
    json_out: JsonOption = False,
) -> None:
    """Create a project and print its ID."""
    opts = _merge(ctx, url, api_key, json_out)
    with open_session(opts.url, opts.api_key) as session:
        project = session.create_project(name, description, region)
    if opts.json:
        print_json(project.data)
    else:
        out_console().print(f"Created project [bold]{project.id}[/] ({project.name})", highlight=False)


# -- tasks -----------------------------------------------------------------------------------


def _list_tasks(opts: CommonOptions, include_deleted: bool) -> None:
    project_id = require(opts.project, "--project")
    with open_session(opts.url, opts.api_key) as session:
        tasks = [
            t
            for t in api.iter_htc_projects_tasks(session.connection, project_id)
            if include_deleted or t.get("lifecycleStatus") != "DELETED"
        ]
    if opts.json:
        print_json(tasks)
    else:
        out_console().print(tasks_table(tasks))


AllOption = Annotated[bool, typer.Option("--all", "-a", help="Include DELETED tasks.")]


@tasks_app.callback(invoke_without_command=True)
def tasks_main(
    ctx: typer.Context,
    project: ProjectOption = None,
    include_deleted: AllOption = False,
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
    json_out: JsonOption = False,
) -> None:
    ctx.obj = CommonOptions(url, api_key, json_out, project)
    if ctx.invoked_subcommand is None:
        _list_tasks(ctx.obj, include_deleted)


@tasks_app.command("ls")
def tasks_ls(
    ctx: typer.Context,
    project: ProjectOption = None,
    include_deleted: AllOption = False,
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
    json_out: JsonOption = False,
) -> None:
    """List a project's tasks (DELETED ones only with --all)."""
    _list_tasks(_merge(ctx, url, api_key, json_out, project), include_deleted)


@tasks_app.command("create")
def tasks_create(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Task name.")],
    description: Annotated[str, typer.Option("--description", "-d", help="Task description.")] = "",
    project: ProjectOption = None,
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
    json_out: JsonOption = False,
) -> None:
    """Create a task and print its ID."""
    opts = _merge(ctx, url, api_key, json_out, project)
    project_id = require(opts.project, "--project")
    with open_session(opts.url, opts.api_key) as session:
        data = api.post_htc_projects_tasks(
            session.connection, project_id, {"taskName": name, "taskDescription": description}
        )
    if opts.json:
        print_json(data)
    else:
        out_console().print(f"Created task [bold]{data.get('taskId')}[/] ({name})", highlight=False)


TaskArgument = Annotated[str, typer.Argument(help="Task ID.")]


def _change_task(opts: CommonOptions, task_id: str, action: str) -> None:
    project_id = require(opts.project, "--project")
    with open_session(opts.url, opts.api_key) as session:
        conn = session.connection
        if action == "delete":
            data = api.delete_htc_projects_tasks(conn, project_id, task_id)
        else:
            status = "ARCHIVED" if action == "archive" else "ACTIVE"
            data = api.patch_htc_projects_tasks(conn, project_id, task_id, {"lifecycleStatus": status})
    if opts.json:
        print_json(data)
    else:
        out_console().print(f"Task {task_id}: {data.get('lifecycleStatus', action)}", highlight=False)


def _task_lifecycle_command(action: str, help_text: str) -> Callable[..., None]:
    """Register ``htc tasks <action>``: archive and unarchive differ only in the action they ask for."""

    def command(
        ctx: typer.Context,
        task_id: TaskArgument,
        project: ProjectOption = None,
        url: UrlOption = None,
        api_key: ApiKeyOption = None,
        json_out: JsonOption = False,
    ) -> None:
        _change_task(_merge(ctx, url, api_key, json_out, project), task_id, action)

    command.__name__ = command.__qualname__ = f"tasks_{action}"
    command.__doc__ = help_text
    return tasks_app.command(action)(command)


tasks_archive = _task_lifecycle_command("archive", "Archive a task (it must have no running jobs).")
tasks_unarchive = _task_lifecycle_command("unarchive", "Make an archived task ACTIVE again.")


@tasks_app.command("delete")
def tasks_delete(
    ctx: typer.Context,
    task_id: TaskArgument,
    project: ProjectOption = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
    json_out: JsonOption = False,
) -> None:
    """Delete a task and free its storage (cannot be undone; asks first on a terminal)."""
    if not yes and sys.stdin.isatty():
        typer.confirm(f"Delete task {task_id}?", abort=True)
    _change_task(_merge(ctx, url, api_key, json_out, project), task_id, "delete")


# -- jobs, logs, cancel, summary -------------------------------------------------------------


GroupOption = Annotated[str | None, typer.Option("--group", "-g", help="Only jobs of this group.")]


def _status_filter(status: str | None) -> str | None:
    if status is None:
        return None
    upper = status.strip().upper()
    if upper not in JOB_STATUSES:
        raise typer.BadParameter(f"{status!r} is not one of {', '.join(JOB_STATUSES)}", param_hint="--status")
    return upper


@app.command()
def jobs(
    project: ProjectOption = None,
    task: TaskOption = None,
    status: Annotated[str | None, typer.Option("--status", "-s", help="Only jobs in this status.")] = None,
    group: GroupOption = None,
    limit: Annotated[int, typer.Option("--limit", "-l", min=0, help="Show at most N jobs (0: all).")] = 100,
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
    json_out: JsonOption = False,
) -> None:
    """List a task's jobs."""
    project_id, task_id = require(project, "--project"), require(task, "--task")
    status_filter = _status_filter(status)
    with open_session(url, api_key) as session:
        items = list(
            api.iter_htc_projects_tasks_jobs(
                session.connection,
                project_id,
                task_id,
                group=group,
                status=status_filter,
                max_items=limit or None,
            )
        )
    if json_out:
        print_json(items)
        return
    out = out_console()
    out.print(jobs_table(items))
    if limit and len(items) >= limit:
        out.print(f"[dim]first {limit} jobs shown; --limit 0 shows all[/]")


def _emit_logs(entries: list[dict[str, Any]], *, as_json: bool, timestamps: bool) -> None:
    for entry in entries:
        if as_json:
            line = json.dumps(entry)
        elif timestamps:
            line = f"{entry.get('timestamp', '')} {entry.get('message', '')}"
        else:
            line = str(entry.get("message", ""))
        sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _follow_pushed(
    conn: Connection,
    project_id: str,
    task_id: str,
    job_id: str,
    tail: int | None,
    as_json: bool,
    timestamps: bool,
) -> bool:
    """Follow the log through the server's event stream (openhtc's /openhtc/v1); False if the
    server has none (then the caller polls the logs route)."""
    try:
        for event in live.follow_log(conn, project_id, task_id, job_id, tail=tail):
            if event.name == "line":
                _emit_logs([event.data], as_json=as_json, timestamps=timestamps)
    except live.Unsupported:
        return False
    return True


@app.command()
def logs(
    job_id: Annotated[str, typer.Argument(help="Job ID: PARENT_JOB_ID:INDEX.")],
    project: ProjectOption = None,
    task: TaskOption = None,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new lines until the job ends.")
    ] = False,
    tail: Annotated[int | None, typer.Option("--tail", "-n", min=0, help="Only the last N lines.")] = None,
    timestamps: Annotated[
        bool, typer.Option("--timestamps", "-T", help="Prefix each line with its time.")
    ] = False,
    poll: Annotated[
        float,
        typer.Option(
            "--poll",
            min=0.05,
            help="Seconds between polls with --follow (servers without openhtc's log stream).",
        ),
    ] = 1.0,
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
    json_out: JsonOption = False,
) -> None:
    """Print a job's log, oldest line first.

    With --json: a list of {timestamp, message} objects, or one object per line with --follow.
    """
    project_id, task_id = require(project, "--project"), require(task, "--task")
    with open_session(url, api_key) as session:
        conn = session.connection
        job = session.task(project_id, task_id).job(job_id)
        if not follow:
            if tail is not None:
                entries = api.get_htc_projects_tasks_jobs_logs(
                    conn, project_id, task_id, job_id, sort="desc", max_items=tail
                )[::-1]
            else:
                entries = job.log_entries("asc")
            if json_out:
                print_json(entries)
            else:
                _emit_logs(entries, as_json=False, timestamps=timestamps)
            return
        try:
            if _follow_pushed(conn, project_id, task_id, job_id, tail, json_out, timestamps):
                return
        except KeyboardInterrupt:
            raise typer.Exit(130) from None
        seen = 0
        first = True
        try:
            while True:
                finished = job.refresh().done
                entries = job.log_entries("asc")
                new = entries[seen:]
                if first and tail is not None:
                    new = new[len(new) - tail :] if tail else []
                first = False
                _emit_logs(new, as_json=json_out, timestamps=timestamps)
                seen = len(entries)
                if finished:
                    return
                time.sleep(poll)
        except KeyboardInterrupt:
            raise typer.Exit(130) from None


@app.command()
def cancel(
    project: ProjectOption = None,
    task: TaskOption = None,
    group: GroupOption = None,
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
    json_out: JsonOption = False,
) -> None:
    """Cancel every unfinished job of a task (or of one group); cancelled jobs end FAILED."""
    project_id, task_id = require(project, "--project"), require(task, "--task")
    with open_session(url, api_key) as session:
        api.post_htc_projects_tasks_jobs_cancel(session.connection, project_id, task_id, group)
    if json_out:
        print_json({"projectId": project_id, "taskId": task_id, "group": group, "cancelRequested": True})
    else:
        scope = f"group {group} of task {task_id}" if group else f"task {task_id}"
        out_console().print(f"Cancellation requested for {scope}.", highlight=False)


@app.command()
def summary(
    project: ProjectOption = None,
    task: TaskOption = None,
    group: GroupOption = None,
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
    json_out: JsonOption = False,
) -> None:
    """Count a task's jobs by status."""
    project_id, task_id = require(project, "--project"), require(task, "--task")
    with open_session(url, api_key) as session:
        counts = session.task(project_id, task_id).summary(group)
    if json_out:
        print_json(dict(counts))
    else:
        out_console().print(summary_table(counts))


register(app)
register_top(app)
register_alloc(app)
register_agent(app)
register_cluster(app)


def main() -> None:
    app()
