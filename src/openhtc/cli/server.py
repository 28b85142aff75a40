"""`htc server` and `htc admin`: run the control plane and manage users, keys and limits."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from openhtc.config import Settings
from openhtc.domain.enums import Role

DataDir = Annotated[
    Path | None,
    typer.Option("--data-dir", envvar="OPENHTC_DATA_DIR", help="State directory (DB, keys, logs)."),
]
DatabaseUrl = Annotated[
    str | None,
    typer.Option(
        "--database-url", envvar="OPENHTC_DATABASE_URL", help="postgresql://… (default: SQLite in DATA_DIR)."
    ),
]
ROLES = {"workspace-admin": Role.WORKSPACE_ADMIN, "project-admin": Role.PROJECT_ADMIN, "member": Role.MEMBER}


def _settings(**values: Any) -> Settings:
    """Settings from the environment, overridden by the flags that were given."""
    return Settings(**{k: v for k, v in values.items() if v is not None})


def server(
    data_dir: DataDir = None,
    host: Annotated[str | None, typer.Option(envvar="OPENHTC_HOST", help="Bind address [127.0.0.1].")] = None,
    port: Annotated[int | None, typer.Option(envvar="OPENHTC_PORT", help="Port [8080].")] = None,
    database_url: DatabaseUrl = None,
    runtime: Annotated[
        str | None,
        typer.Option(
            envvar="OPENHTC_RUNTIME",
            help="auto (bwrap, else podman), bwrap, podman, process (no isolation) or noop [auto].",
        ),
    ] = None,
    region: Annotated[str | None, typer.Option(envvar="OPENHTC_REGION", help="Local region name.")] = None,
    vcpus: Annotated[
        int | None, typer.Option(envvar="OPENHTC_EXECUTOR_VCPUS", help="Executor vCPUs.")
    ] = None,
    memory_mb: Annotated[
        int | None, typer.Option(envvar="OPENHTC_EXECUTOR_MEMORY_MB", help="Executor MiB.")
    ] = None,
    no_executor: Annotated[
        bool, typer.Option("--no-executor", help="Run the API and scheduler only.")
    ] = False,
    storage: Annotated[
        str | None,
        typer.Option(envvar="OPENHTC_STORAGE", help="local, s3, or seaweedfs (start one) [local]."),
    ] = None,
    s3_endpoint: Annotated[
        str | None, typer.Option(envvar="OPENHTC_S3_ENDPOINT", help="S3 endpoint URL [AWS].")
    ] = None,
    s3_bucket: Annotated[str | None, typer.Option(envvar="OPENHTC_S3_BUCKET", help="S3 bucket.")] = None,
    s3_access_key: Annotated[
        str | None, typer.Option(envvar="OPENHTC_S3_ACCESS_KEY", help="S3 access key.")
    ] = None,
    s3_secret_key: Annotated[
        str | None, typer.Option(envvar="OPENHTC_S3_SECRET_KEY", help="S3 secret key.")
    ] = None,
    s3_role_arn: Annotated[
        str | None, typer.Option(envvar="OPENHTC_S3_ROLE_ARN", help="Role for scoped STS tokens.")
    ] = None,
    registry_url: Annotated[
        str | None,
        typer.Option(envvar="OPENHTC_REGISTRY_URL", help="External registry URL [run docker-registry]."),
    ] = None,
    registry_port: Annotated[
        int | None, typer.Option(envvar="OPENHTC_REGISTRY_PORT", help="Embedded registry port [free].")
    ] = None,
    job_network: Annotated[
        str | None,
        typer.Option(
            envvar="OPENHTC_JOB_NETWORK",
            help="What container jobs reach: openhtc (the API and storage only), none, or full "
            "(the host's network); default: openhtc.",
        ),
    ] = None,
) -> None:
    """Run the API, the scheduler and the local executor."""
    from openhtc.wiring import serve

    settings = _settings(
        data_dir=data_dir,
        host=host,
        port=port,
        database_url=database_url,
        runtime=runtime,
        region=region,
        executor_vcpus=vcpus,
        executor_memory_mb=memory_mb,
        executor=False if no_executor else None,
        storage=storage,
        s3_endpoint=s3_endpoint,
        s3_bucket=s3_bucket,
        s3_access_key=s3_access_key,
        s3_secret_key=s3_secret_key,
        s3_role_arn=s3_role_arn,
        registry_url=registry_url,
        registry_port=registry_port,
        job_network=job_network,
    )
    from openhtc.runtimes import RuntimeUnavailable
    from openhtc.startup import StartupError
    from openhtc.storage.seaweedfs import SeaweedUnavailable

    try:
        serve(settings)
    except (RuntimeUnavailable, SeaweedUnavailable, StartupError) as exc:
        typer.echo(f"htc server: {exc}", err=True)
        raise typer.Exit(2) from None


admin = typer.Typer(help="Administer an installation directly through its database.", no_args_is_help=True)


def _services(data_dir: Path | None, database_url: str | None) -> Any:
    from openhtc.wiring import bootstrap, build_services

    services = build_services(_settings(data_dir=data_dir, database_url=database_url))
    bootstrap(services)
    return services


def _workspace(services: Any, workspace_id: str | None) -> str:
    if workspace_id:
        if services.accounts.workspace(workspace_id) is None:
            raise typer.BadParameter(f"no workspace {workspace_id}", param_hint="--workspace")
        return workspace_id
    return str(services.accounts.workspaces()[0].id)


@admin.command("create-user")
def create_user(
    email: str,
    role: Annotated[str, typer.Option(help="workspace-admin, project-admin or member.")] = "member",
    name: Annotated[str | None, typer.Option(help="Full name.")] = None,
    workspace: Annotated[str | None, typer.Option(help="Workspace id (default: the first).")] = None,
    data_dir: DataDir = None,
    database_url: DatabaseUrl = None,
) -> None:
    """Create a user and print a new API key for it."""
    if role not in ROLES:
        raise typer.BadParameter(f"choose one of {', '.join(ROLES)}", param_hint="--role")
    services = _services(data_dir, database_url)
    workspace_id = _workspace(services, workspace)
    if services.accounts.user_by_email(workspace_id, email):
        raise typer.BadParameter(f"{email} already exists in workspace {workspace_id}")
    now = services.clock.now()
    user_id = services.accounts.create_user(workspace_id, email, name or email, ROLES[role].value, now)
    typer.echo(services.accounts.create_api_key(user_id, now))


@admin.command("create-key")
def create_key(
    email: str,
    workspace: Annotated[str | None, typer.Option(help="Workspace id (default: the first).")] = None,
    data_dir: DataDir = None,
    database_url: DatabaseUrl = None,
) -> None:
    """Print a new API key for an existing user."""
    services = _services(data_dir, database_url)
    user = services.accounts.user_by_email(_workspace(services, workspace), email)
    if user is None:
        raise typer.BadParameter(f"no user {email}")
    typer.echo(services.accounts.create_api_key(user.id, services.clock.now()))


@admin.command("create-agent-token")
def create_agent_token(
    region: Annotated[str, typer.Option(help="The region its agents may register in ('*': any).")] = "*",
    name: Annotated[str, typer.Option(help="A name for the token (its subject).")] = "agent",
    days: Annotated[int, typer.Option(min=1, help="Days the token is valid.")] = 365,
    agents: Annotated[
        int,
        typer.Option(
            min=1,
            help="How many live agents may share it (a fleet); each agent id is bound to the token"
            " it first registers with.",
        ),
    ] = 1,
    data_dir: DataDir = None,
    database_url: DatabaseUrl = None,
) -> None:
    """Print a token for `htc agent --token`: it reaches only the agent routes (/openhtc/v1/agents)."""
    services = _services(data_dir, database_url)
    typer.echo(services.tokens.agent(name, region, days * 86400, agents))


@admin.command("create-workspace")
def create_workspace(
    name: str,
    admin_email: Annotated[
        str, typer.Option(help="Email of the workspace's first admin.")
    ] = "admin@localhost",
    data_dir: DataDir = None,
    database_url: DatabaseUrl = None,
) -> None:
    """Create a workspace with an admin user; print 'WORKSPACE_ID API_KEY'."""
    from openhtc.wiring import bootstrap

    services = _services(data_dir, database_url)
    now = services.clock.now()
    workspace_id = services.accounts.create_workspace(name, now)
    user_id = services.accounts.create_user(
        workspace_id, admin_email, admin_email, Role.WORKSPACE_ADMIN.value, now
    )
    bootstrap(services)  # gives the new workspace the local region
    typer.echo(f"{workspace_id} {services.accounts.create_api_key(user_id, now)}")


@admin.command("set-workspace-limit")
def set_workspace_limit(
    vcpus: Annotated[int, typer.Argument(help="vCPU limit; a negative value removes it.")],
    workspace: Annotated[str | None, typer.Option(help="Workspace id (default: the first).")] = None,
    data_dir: DataDir = None,
    database_url: DatabaseUrl = None,
) -> None:
    """Set or remove the workspace vCPU limit."""
    services = _services(data_dir, database_url)
    workspace_id = _workspace(services, workspace)
    now = services.clock.now()
    ws = services.accounts.workspace(workspace_id)
    if vcpus < 0:
        services.accounts.update_workspace(workspace_id, vcpu_limit=None, limit_updated_at=now)
    else:
        services.accounts.update_workspace(
            workspace_id,
            vcpu_limit=vcpus,
            limit_created_by=ws.limit_created_by or "admin",
            limit_created_at=ws.limit_created_at or now,
            limit_updated_by="admin",
            limit_updated_at=now,
        )
    typer.echo(f"workspace {workspace_id}: vCPU limit {'removed' if vcpus < 0 else vcpus}")


def register(app: typer.Typer) -> None:
    app.command("server")(server)
    app.add_typer(admin, name="admin")


@admin.command("registry-config")
def registry_config(
    realm: Annotated[
        str | None,
        typer.Option(help="The token endpoint as the registry's clients reach the API [this server's]."),
    ] = None,
    cert_out: Annotated[
        Path | None,
        typer.Option(help="Write the certificate the registry must trust here [DATA_DIR/keys/…]."),
    ] = None,
    data_dir: DataDir = None,
    database_url: DatabaseUrl = None,
) -> None:
    """Print the `auth:` section an external CNCF registry needs to trust this installation's
    registry tokens. With PostgreSQL every server on the database signs with one key, so one
    registry serves them all."""
    import yaml

    from openhtc.registry.keys import CERT_FILE
    from openhtc.registry.service import ISSUER, SERVICE, token_realm

    services = _services(data_dir, database_url)
    settings = services.settings
    cert = settings.data_dir / "keys" / CERT_FILE
    if services.registry is None or not cert.exists():
        raise typer.BadParameter("this installation has no registry token key")
    if cert_out is not None:
        cert_out.write_bytes(cert.read_bytes())
        cert = cert_out
    auth = {
        "token": {
            "realm": realm or token_realm(settings),
            "service": SERVICE,
            "issuer": ISSUER,
            "rootcertbundle": str(cert.resolve()),
        }
    }
    typer.echo("# openhtc token auth for docker-registry's config.yml (docs/containers.md)")
    typer.echo(yaml.safe_dump({"auth": auth}, sort_keys=False).rstrip())
