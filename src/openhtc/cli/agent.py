"""`htc agent`: run jobs of an openhtc server on this machine (the executor protocol over HTTP)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer


def agent(
    server: Annotated[str | None, typer.Option(help="The server's URL [OPENHTC_AGENT_SERVER].")] = None,
    token: Annotated[
        str | None, typer.Option(help="Agent token: htc admin create-agent-token [OPENHTC_AGENT_TOKEN].")
    ] = None,
    region: Annotated[str | None, typer.Option(help="Region to run jobs of [AWS_US_EAST_1].")] = None,
    vcpus: Annotated[int | None, typer.Option(help="vCPUs to offer [CPUs].")] = None,
    memory_mb: Annotated[int | None, typer.Option(help="MiB to offer [RAM].")] = None,
    runtime: Annotated[str | None, typer.Option(help="bwrap, podman or process (default: auto).")] = None,
    work_dir: Annotated[Path | None, typer.Option(help="Journal, report buffer, logs, scratch.")] = None,
    labels: Annotated[str | None, typer.Option(help="Labels to advertise: k=v,k2=v2.")] = None,
    drain_seconds: Annotated[
        float | None, typer.Option(help="At SIGTERM, how long running jobs may finish [1 day].")
    ] = None,
) -> None:
    """Run jobs of an openhtc server on this machine. Every flag is also OPENHTC_AGENT_<FLAG>.

    SIGTERM drains (no new jobs; running ones finish, then it exits); a second SIGTERM kills them."""
    from pydantic import ValidationError

    from openhtc.agent.run import run_agent
    from openhtc.agent.settings import AgentSettings
    from openhtc.agent.workdir import WorkDirTaken
    from openhtc.runtimes import RuntimeUnavailable

    given: dict[str, Any] = {
        k: v
        for k, v in {
            "server": server,
            "token": token,
            "region": region,
            "vcpus": vcpus,
            "memory_mb": memory_mb,
            "runtime": runtime,
            "work_dir": work_dir,
            "labels": labels,
            "drain_seconds": drain_seconds,
        }.items()
        if v is not None
    }
    try:
        settings = AgentSettings(**given)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        typer.echo(f"htc agent: {problems}", err=True)
        raise typer.Exit(2) from None
    try:
        run_agent(settings)
    except (RuntimeUnavailable, WorkDirTaken) as exc:
        typer.echo(f"htc agent: {exc}", err=True)
        raise typer.Exit(2) from None


def register(app: typer.Typer) -> None:
    app.command("agent")(agent)
