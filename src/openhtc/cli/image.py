"""``htc image push|ls``: put local images into a project's container registry and list them.

``push`` creates the repository, gets the project's registry token, logs in with it (user name
``AWS``, into a throw-away auth file for podman and skopeo) and pushes with podman, else docker,
else skopeo. It prints the ``imageName`` jobs use: ``repo:tag``, relative to the project.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from openhtc.cli._common import (
    ApiKeyOption,
    JsonOption,
    ProjectOption,
    UrlOption,
    fail,
    open_session,
    out_console,
    print_json,
    require,
)
from openhtc.cli.registry_trust import default_dropin, write_entry
from openhtc.client._transport import segment
from openhtc.domain.submission import IMAGE_NAME_RE

image_app = typer.Typer(
    help="Push images to a project's container registry and list them.", no_args_is_help=True
)

TOOLS = ("podman", "docker", "skopeo")
SKOPEO_TRANSPORTS = (
    "containers-storage:",
    "docker-daemon:",
    "docker-archive:",
    "oci:",
    "oci-archive:",
    "dir:",
)
USERNAME = "AWS"


def remote_name(local: str, as_name: str | None) -> tuple[str, str]:
    """(repo, tag) to push ``local`` as: ``--as`` if given, else the local name without its
    registry host (``localhost/app:1`` → ``app``, ``1``); the tag defaults to ``latest``."""
    name = as_name
    if name is None:
        if local.startswith(SKOPEO_TRANSPORTS) or "@" in local:
            raise typer.BadParameter("give the remote name with --as REPO[:TAG]", param_hint="--as")
        first, sep, rest = local.partition("/")
        name = rest if sep and ("." in first or ":" in first or first == "localhost") else local
    slash = name.rfind("/")
    colon = name.rfind(":")
    repo, tag = (name[:colon], name[colon + 1 :]) if colon > slash else (name, "latest")
    if not IMAGE_NAME_RE.fullmatch(f"{repo}:{tag}"):
        raise typer.BadParameter(
            f"{repo}:{tag} is not a valid image name (lower-case repo[:tag]); choose one with --as",
            param_hint="--as",
        )
    return repo, tag


def is_loopback(host: str) -> bool:
    """True for 127.x, ::1 and localhost (the embedded registry speaks plain HTTP there)."""
    hostname = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    hostname = hostname.strip("[]")
    if hostname == "localhost":
        return True
    try:
        return ipaddress.ip_address(hostname).is_loopback
    except ValueError:
        return False


def pick_tool(requested: str | None, local: str) -> str:
    if requested:
        if requested not in TOOLS:
            raise typer.BadParameter(f"choose one of {', '.join(TOOLS)}", param_hint="--tool")
        if shutil.which(requested) is None:
            raise fail(f"{requested} is not installed")
        return requested
    candidates = ("skopeo",) if local.startswith(SKOPEO_TRANSPORTS) else TOOLS
    for tool in candidates:
        if shutil.which(tool):
            return tool
    raise fail(f"none of {', '.join(candidates)} is installed: install podman (apt-get install podman)")


def _run(cmd: list[str], stdin: str | None = None) -> None:
    result = subprocess.run(cmd, input=stdin, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()[-5:]
        raise fail(f"`{' '.join(cmd[:2])}` failed ({result.returncode}): " + " / ".join(detail))


def push_with(tool: str, local: str, remote: str, host: str, token: str, tls_verify: bool) -> None:
    """Log in with the token and push ``local`` to ``remote`` (host/{projectId}/repo:tag)."""
    tls = f"--tls-verify={'true' if tls_verify else 'false'}"
    if tool == "docker":
        # docker treats 127.0.0.0/8 as insecure on its own; other hosts need daemon configuration.
        _run(["docker", "tag", local, remote])
        _run(["docker", "login", "--username", USERNAME, "--password-stdin", host], stdin=token)
        _run(["docker", "push", remote])
        return
    with tempfile.TemporaryDirectory(prefix="htc-image-") as tmp:
        authfile = str(Path(tmp) / "auth.json")  # the token never lands in the user's auth file
        login = [tool, "login", "--authfile", authfile, tls, "--username", USERNAME, "--password-stdin", host]
        _run(login, stdin=token)
        if tool == "podman":
            _run(["podman", "push", "--authfile", authfile, tls, local, remote])
        else:
            source = local if local.startswith(SKOPEO_TRANSPORTS) else f"containers-storage:{local}"
            dest_tls = f"--dest-tls-verify={'true' if tls_verify else 'false'}"
            _run(["skopeo", "copy", "--dest-authfile", authfile, dest_tls, source, f"docker://{remote}"])


@image_app.command("push")
def push(
    local: Annotated[
        str,
        typer.Argument(
            help="Local image (app:1, localhost/app:1), or for skopeo a transport reference "
            "(oci-archive:app.tar, docker-archive:app.tar, containers-storage:app:1)."
        ),
    ],
    project: ProjectOption = None,
    as_name: Annotated[
        str | None, typer.Option("--as", help="Remote REPO[:TAG] [the local name; tag latest].")
    ] = None,
    tool: Annotated[
        str | None, typer.Option("--tool", help="podman, docker or skopeo [the first installed].")
    ] = None,
    tls_verify: Annotated[
        bool | None,
        typer.Option("--tls-verify/--no-tls-verify", help="Require HTTPS [off for a loopback registry]."),
    ] = None,
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
    json_out: JsonOption = False,
) -> None:
    """Push a local image to the project's registry and print the imageName jobs use."""
    project_id = require(project, "--project")
    repo, tag = remote_name(local, as_name)
    chosen = pick_tool(tool, local)
    base = f"/htc/projects/{segment(project_id)}"
    with open_session(url, api_key) as session:
        conn = session.connection
        registry = str(conn.get(base)["containerRegistry"])
        conn.post(f"{base}/container-registry/repo/{repo}", {})
        token = conn.get_text(f"{base}/container-registry/token").strip()
    host = registry.split("/", 1)[0]
    remote = f"{registry}{repo}:{tag}"
    push_with(
        chosen, local, remote, host, token, is_loopback(host) is False if tls_verify is None else tls_verify
    )
    image_name = f"{repo}:{tag}"
    if json_out:
        print_json({"imageName": image_name, "reference": remote, "projectId": project_id, "tool": chosen})
        return
    out = out_console()
    out.print(f"Pushed {local} to {remote} (with {chosen}).", highlight=False)
    out.print(f"Jobs use it as imageName [bold]{image_name}[/]", highlight=False)


@image_app.command("ls")
def ls(
    project: ProjectOption = None,
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
    json_out: JsonOption = False,
) -> None:
    """List the images (repo:tag) in the project's registry."""
    project_id = require(project, "--project")
    with open_session(url, api_key) as session:
        body: dict[str, Any] = session.connection.get(
            f"/htc/projects/{segment(project_id)}/container-registry/images"
        )
    if json_out:
        print_json(body)
        return
    registry = body.get("containerRegistry", "")
    table = Table(box=None)
    table.add_column("IMAGE")
    table.add_column("REFERENCE")
    for image in body.get("images", []):
        table.add_row(image, f"{registry}{image}")
    out = out_console()
    out.print(table)
    if not body.get("images"):
        out.print(f"[dim]no images yet in {registry}; push one with `htc image push`[/]")


@image_app.command("trust")
def trust(
    project: ProjectOption = None,
    file: Annotated[
        Path | None,
        typer.Option(
            "--file",
            help="registries.conf file to add the entry to [a drop-in in /etc/containers/registries.conf.d "
            "as root, else ~/.config/containers/registries.conf.d].",
        ),
    ] = None,
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
) -> None:
    """Mark the server's registry insecure (plain HTTP) for podman, buildah and skopeo, once:
    afterwards `podman login`/`podman push` need no --tls-verify=false."""
    with open_session(url, api_key) as session:
        if project:
            body = session.connection.get(f"/htc/projects/{segment(project)}")
        else:
            first = next(iter(session.projects()), None)
            if first is None:
                raise fail("no project yet: create one (htc projects create NAME) or give --project")
            body = first.data
    host = str(body.get("containerRegistry") or "").split("/", 1)[0]
    if not host:
        raise fail("this server has no container registry")
    path = file or default_dropin(host, Path.home(), os.geteuid() == 0)
    added = write_entry(path, host)
    out_console().print(
        f"{path}: {host} {'marked' if added else 'already marked'} insecure (plain HTTP) for podman, "
        "buildah and skopeo",
        highlight=False,
    )
