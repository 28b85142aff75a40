"""``htc alloc``: allocation queues that grow and shrink agents through Slurm (docs/allocation.md).

``htc alloc add slurm --region R --time-limit 1h [--max-pilots N] [--backlog B] [--pilot-vcpus C]
[--idle-timeout 300s] -- <extra sbatch args>``, and ``ls``, ``pause``, ``resume``, ``rm``: the
admin API's /openhtc/v1/alloc/queues: listing with a workspace administrator's API key, changes
with an installation administrator's (docs/allocation.md).
"""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from openhtc.cli._common import ApiKeyOption, JsonOption, UrlOption, open_session, out_console, print_json
from openhtc.domain import allocation as rules

PATH = "/openhtc/v1/alloc/queues"
alloc_app = typer.Typer(help="Allocation queues: Slurm pilot jobs running `htc agent` (admins).")


def _seconds(value: str, option: str) -> int:
    try:
        return rules.parse_duration(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint=option) from None


@alloc_app.command("add")
def add(
    kind: Annotated[str, typer.Argument(help="The batch system: slurm.")],
    region: Annotated[str, typer.Option("--region", help="The region its pilots' agents serve.")],
    time_limit: Annotated[str, typer.Option("--time-limit", help="Each pilot's walltime: 30m, 1h, 2d.")],
    sbatch_args: Annotated[
        list[str] | None, typer.Argument(help="Extra sbatch arguments, after `--`.", show_default=False)
    ] = None,
    max_pilots: Annotated[int, typer.Option("--max-pilots", min=1, help="Pilots alive at once.")] = (
        rules.DEFAULT_MAX_PILOTS
    ),
    backlog: Annotated[int, typer.Option("--backlog", min=1, help="Pilots waiting in Slurm at once.")] = (
        rules.DEFAULT_BACKLOG
    ),
    pilot_vcpus: Annotated[int, typer.Option("--pilot-vcpus", min=1, help="vCPUs of each pilot.")] = 1,
    idle_timeout: Annotated[
        str, typer.Option("--idle-timeout", help="A pilot with nothing to run this long exits.")
    ] = "300s",
    no_dry_run: Annotated[
        bool, typer.Option("--no-dry-run", help="Skip the `sbatch --test-only` check.")
    ] = False,
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
    json_out: JsonOption = False,
) -> None:
    """Add an allocation queue (checked first with `sbatch --test-only`)."""
    body = {
        "kind": kind,
        "region": region,
        "timeLimitSeconds": _seconds(time_limit, "--time-limit"),
        "maxPilots": max_pilots,
        "backlog": backlog,
        "pilotVcpus": pilot_vcpus,
        "idleTimeoutSeconds": _seconds(idle_timeout, "--idle-timeout"),
        "sbatchArgs": list(sbatch_args or []),
        "dryRun": not no_dry_run,
    }
    with open_session(url, api_key) as session:
        queue = session.connection.post(PATH, json=body)
    if json_out:
        print_json(queue)
    else:
        out_console().print(f"Allocation queue {queue['id']} added.", highlight=False)


@alloc_app.command("ls")
def ls(url: UrlOption = None, api_key: ApiKeyOption = None, json_out: JsonOption = False) -> None:
    """Each queue's state (and why it paused), and its pilots: Slurm job id, state, agent."""
    with open_session(url, api_key) as session:
        queues = session.connection.get(PATH)["queues"]
    if json_out:
        print_json(queues)
        return
    console = out_console()
    if not queues:
        console.print("No allocation queues.")
        return
    for q in queues:
        state = q["state"] + (f": {q['pauseReason']}" if q.get("pauseReason") else "")
        console.print(
            f"[bold]{q['id']}[/] {q['kind']} region={q['region']} time-limit={q['timeLimitSeconds']}s "
            f"max-pilots={q['maxPilots']} backlog={q['backlog']} pilot-vcpus={q['pilotVcpus']} "
            f"idle-timeout={q['idleTimeoutSeconds']}s  [{_style(q['state'])}]{state}[/]",
            highlight=False,
        )
        alive = [p for p in q.get("pilots", []) if p["state"] != "ended"]
        ended = len(q.get("pilots", [])) - len(alive)
        if alive:
            console.print(_pilots(alive))
        console.print(f"  {len(alive)} pilots alive, {ended} ended", highlight=False)


def _style(state: str) -> str:
    return "green" if state == "active" else "yellow"


def _pilots(pilots: list[dict[str, Any]]) -> Table:
    table = Table("PILOT", "SLURM JOB", "STATE", "AGENT", "ENDS", "DETAIL", box=None, pad_edge=False)
    for p in pilots:
        table.add_row(
            p["id"],
            p["slurmJobId"] or "-",
            p["state"],
            p["agentId"] or "-",
            p["endsAt"] or "-",
            p["detail"] or "",
        )
    return table


def _action(queue_id: str, action: str, url: str | None, api_key: str | None) -> dict[str, Any]:
    with open_session(url, api_key) as session:
        result: dict[str, Any] = session.connection.post(f"{PATH}/{queue_id}/{action}")
    return result


@alloc_app.command("pause")
def pause(queue_id: str, url: UrlOption = None, api_key: ApiKeyOption = None) -> None:
    """Stop submitting pilots (those alive keep running)."""
    _action(queue_id, "pause", url, api_key)
    out_console().print(f"Allocation queue {queue_id} paused.", highlight=False)


@alloc_app.command("resume")
def resume(queue_id: str, url: UrlOption = None, api_key: ApiKeyOption = None) -> None:
    """Submit pilots again (and forget the failures that paused it)."""
    _action(queue_id, "resume", url, api_key)
    out_console().print(f"Allocation queue {queue_id} resumed.", highlight=False)


@alloc_app.command("rm")
def rm(queue_id: str, url: UrlOption = None, api_key: ApiKeyOption = None) -> None:
    """Remove a queue and cancel its pilots (their jobs are recovered and run elsewhere)."""
    with open_session(url, api_key) as session:
        session.connection.delete(f"{PATH}/{queue_id}")
    out_console().print(f"Allocation queue {queue_id} removed.", highlight=False)


def register(app: typer.Typer) -> None:
    app.add_typer(alloc_app, name="alloc")
