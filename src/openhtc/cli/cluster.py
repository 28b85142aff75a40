"""``htc cluster up|status|down``: cluster mode on this machine (docs/cluster.md). Needs root."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated

import typer

from openhtc.cli._common import JsonOption, out_console, print_json
from openhtc.cluster.local import ClusterSpec, LocalCluster
from openhtc.cluster.netns import ClusterNetError

app = typer.Typer(
    help="A local cluster: PostgreSQL, API servers and agents in network namespaces (root).",
    no_args_is_help=True,
)

DirOption = Annotated[
    Path,
    typer.Option("--dir", envvar="OPENHTC_CLUSTER_DIR", help="The cluster's directory (state, logs)."),
]
DEFAULT_DIR = Path(".htc-cluster")


def _fail(exc: Exception) -> None:
    typer.echo(f"htc cluster: {exc}", err=True)
    raise typer.Exit(1)


@app.command()
def up(
    agents: Annotated[int, typer.Option(help="Agents, each in its own network namespace.")] = 3,
    servers: Annotated[int, typer.Option(help="API servers on the one PostgreSQL.")] = 2,
    runtime: Annotated[str, typer.Option(help="The agents' runtime: process, bwrap or podman.")] = "process",
    vcpus: Annotated[int | None, typer.Option(help="vCPUs each agent offers [its machine's].")] = None,
    memory_mb: Annotated[int | None, typer.Option(help="MiB each agent offers [its machine's].")] = None,
    directory: DirOption = DEFAULT_DIR,
) -> None:
    """Start PostgreSQL, the servers and the agents; print how to point the client at them."""
    spec = ClusterSpec(
        directory=directory, agents=agents, servers=servers, runtime=runtime,
        agent_vcpus=vcpus, agent_memory_mb=memory_mb,
    )  # fmt: skip
    cluster = LocalCluster(spec)
    try:
        cluster.up()
    except (ClusterNetError, RuntimeError) as exc:
        _fail(exc)
    out = out_console()
    out.print(f"cluster up in {cluster.dir}: {servers} servers, {agents} agents", highlight=False)
    for url in cluster.urls:
        out.print(f"  server {url}", highlight=False)
    key_file = cluster.server_dir(0) / "admin-api-key"
    out.print("Point the client at it:", highlight=False)
    out.print(f"  export OPENHTC_URL={cluster.url}", highlight=False)
    out.print(f"  export OPENHTC_API_KEY=$(cat {shlex.quote(str(key_file))})", highlight=False)
    out.print(f"Stop it: htc cluster down --dir {shlex.quote(str(directory))}", highlight=False)


@app.command()
def status(directory: DirOption = DEFAULT_DIR, json_out: JsonOption = False) -> None:
    """Show the servers and agents: alive, healthy, link up."""
    try:
        report = LocalCluster.load(directory).status()
    except ClusterNetError as exc:
        _fail(exc)
    if json_out:
        print_json(report)
        return
    out = out_console()
    out.print(f"{report['directory']}: bridge {report['bridge']} {report['address']}", highlight=False)
    for s in report["servers"]:
        state = "healthy" if s["healthy"] else ("alive" if s["alive"] else "DOWN")
        out.print(f"  server {s['index']} {s['url']} pid {s['pid']}: {state}", highlight=False)
    for a in report["agents"]:
        state = "running" if a["alive"] else "DOWN"
        link = "link up" if a["link_up"] else "LINK DOWN"
        out.print(
            f"  agent {a['index']} {a['namespace']} {a['address']} -> {a['server']} pid {a['pid']}: "
            f"{state}, {link}, {a['processes']} processes",
            highlight=False,
        )


@app.command()
def down(directory: DirOption = DEFAULT_DIR) -> None:
    """Stop the agents, servers and PostgreSQL; remove the namespaces, veths and bridge."""
    try:
        cluster = LocalCluster.load(directory)
        cluster.down()
    except ClusterNetError as exc:
        _fail(exc)
    out_console().print(f"cluster in {directory} stopped (logs kept there)", highlight=False)


def register(parent: typer.Typer) -> None:
    parent.add_typer(app, name="cluster")
