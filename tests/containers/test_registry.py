"""The per-project container registry: token service, embedded docker-registry, routes, CLI.

Everything runs against the real thing: ``htc server`` starts and supervises the Debian
``docker-registry`` with token auth pointing back at itself; images are built offline from the
host's static busybox and pushed and inspected with podman and skopeo.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography import x509
from rescalehtc import HtcSession, container_registry, htcjobs, htcprojects, htctasks
from rescalehtc import api as plumbing
from rescalehtc.exceptions import HtcException

from openhtc.config import Settings
from openhtc.domain.clock import Clock
from openhtc.domain.errors import Unauthenticated, ValidationFailed
from openhtc.registry import Registry
from openhtc.registry.keys import load_or_create_registry_key
from openhtc.registry.supervisor import EmbeddedRegistry
from openhtc.registry.tokens import (
    Access,
    RegistryTokens,
    grant,
    in_project,
    parse_scopes,
)
from openhtc.store.db import Database
from openhtc.testing.images import podman_push
from openhtc.testing.postgres import free_port

# Nothing here depends on the database: run on the first of --db only.
pytestmark = pytest.mark.one_db

P1 = "5e842126-96aa-4240-bd3d-ee40061676c1"
P2 = "0b3d8a52-1f3e-4c55-9d7e-2a64b0c1f001"
SHELL_SAFE = re.compile(r"[A-Za-z0-9._-]+")


class FixedClock(Clock):
    def __init__(self, now: float) -> None:
        self.t = now

    def now(self) -> float:
        return self.t


def token_url(server: Any) -> str:
    return f"{server.api_url}/htc/registry/token"


def registry_access(server: Any, password: str, *scopes: str) -> list[dict[str, Any]]:
    """What the token endpoint grants for ``scopes`` with Basic AWS:password."""
    resp = httpx.get(
        token_url(server),
        params=[("service", "openhtc-registry"), *(("scope", s) for s in scopes)],
        auth=("AWS", password),
    )
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert set(body) == {"token", "access_token", "expires_in", "issued_at"}, body
    claims = jwt.decode(body["token"], options={"verify_signature": False})
    return list(claims["access"])


# --------------------------------------------------------------------------------------------
# Pure logic: scopes, grants, keys, tokens
# --------------------------------------------------------------------------------------------


def test_scopes_parse_repeated_space_separated_and_classed_forms() -> None:
    scopes = parse_scopes(
        [f"repository:{P1}/app:pull,push", f"repository(plugin):{P1}/x:pull registry:catalog:*"]
    )
    assert scopes == [
        Access("repository", f"{P1}/app", ("pull", "push")),
        Access("repository", f"{P1}/x", ("pull",)),
        Access("registry", "catalog", ("*",)),
    ]
    for bad in ("repository", "repository:app", ":app:pull", "repository::pull"):
        with pytest.raises(ValidationFailed):
            parse_scopes([bad])


def test_grants_stay_inside_the_callers_project_namespace() -> None:
    requested = parse_scopes(
        [
            f"repository:{P1}/app:pull,push,delete",
            f"repository:{P1}/team/tool:pull",
            f"repository:{P2}/app:pull,push",
            "repository:app:pull",  # no namespace at all
            f"repository:{P1}/UPPER:pull",  # not a valid repository name
            "registry:catalog:*",  # would list every project's repositories
        ]
    )
    granted = grant(requested, in_project(P1, {"pull", "push"}))
    assert granted == [
        Access("repository", f"{P1}/app", ("pull", "push")),
        Access("repository", f"{P1}/team/tool", ("pull",)),
    ]
    assert grant(requested, in_project(P1, {"pull"}))[0].actions == ("pull",)
    assert grant(requested, in_project("other", {"pull", "push"})) == []


def test_key_files_kid_and_token_claims(tmp_path: Path) -> None:
    key = load_or_create_registry_key(tmp_path / "keys")
    again = load_or_create_registry_key(tmp_path / "keys")
    assert again.kid == key.kid  # kept across restarts
    for name in ("registry-token.pem", "registry-token.crt"):
        assert (tmp_path / "keys" / name).stat().st_mode & 0o777 == 0o600
    assert re.fullmatch(r"[A-Z2-7]{4}(:[A-Z2-7]{4}){11}", key.kid), key.kid
    cert = x509.load_pem_x509_certificate(key.cert_path.read_bytes())
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True

    clock = FixedClock(time.time())
    tokens = RegistryTokens(key, clock, "iss-x", "svc-x", 300)
    issued = tokens.registry_token("alice", [Access("repository", f"{P1}/app", ("pull",))])
    assert jwt.get_unverified_header(issued.token) == {"alg": "ES256", "typ": "JWT", "kid": key.kid}
    claims = jwt.decode(issued.token, cert.public_key(), algorithms=["ES256"], audience="svc-x")  # type: ignore[arg-type]
    assert claims["aud"] == "svc-x" and isinstance(claims["aud"], str)
    assert claims["iss"] == "iss-x" and claims["sub"] == "alice" and claims["jti"]
    assert claims["exp"] - claims["iat"] == 300 and claims["nbf"] <= claims["iat"]
    assert claims["access"] == [{"type": "repository", "name": f"{P1}/app", "actions": ["pull"]}]

    login = tokens.login_token("alice", "ws", P1, {"pull", "push"}, ttl=60)
    assert SHELL_SAFE.fullmatch(login)
    assert tokens.verify_login(login).project_id == P1
    with pytest.raises(Unauthenticated):
        tokens.verify_login(issued.token)  # a registry token is not a login password
    with pytest.raises(Unauthenticated):
        tokens.verify_registry_token(login)  # and a login token does not reach the registry
    clock.t += 61
    with pytest.raises(Unauthenticated, match="expired"):
        tokens.verify_login(login)


def test_a_registry_left_behind_is_replaced_on_the_kept_port(
    tmp_path: Path, require_tools: Callable[..., None]
) -> None:
    """Without ``setpriv`` a registry could outlive a killed server: the next start kills it
    (found through the pid file) and serves on the same port again."""
    require_tools("docker-registry")
    key = load_or_create_registry_key(tmp_path / "keys")

    def embedded() -> EmbeddedRegistry:
        return EmbeddedRegistry(
            binary="docker-registry", root=tmp_path / "registry", port=None,
            realm="http://127.0.0.1:9/token", service="s", issuer="i", cert_path=key.cert_path,
        )  # fmt: skip

    first = embedded()
    assert first.start()
    port = first.port
    first.stop()
    left = subprocess.Popen(
        ["docker-registry", "serve", str(first.config_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        first.pid_path.write_text(f"{left.pid}\n")
        wait_until(lambda: httpx_status(f"http://127.0.0.1:{port}/v2/") == 401, "the left-behind registry")
        second = embedded()
        assert second.start(), (tmp_path / "registry" / "registry.log").read_text()[-2000:]
        assert left.wait(timeout=10) == -signal.SIGKILL
        assert second.port == port and httpx_status(f"{second.url}/v2/") == 401
        second.stop()
        assert httpx_status(f"{second.url}/v2/") is None
    finally:
        if left.poll() is None:
            left.kill()
            left.wait()


# --------------------------------------------------------------------------------------------
# A real server with its embedded registry
# --------------------------------------------------------------------------------------------


def test_push_with_the_project_token_then_list_status_and_project_fields(
    registry_server: Callable[..., Any],
    registry_project: Callable[..., Any],
    busybox_image: str,
    require_tools: Callable[..., None],
) -> None:
    require_tools("skopeo")
    server = registry_server()
    proj = registry_project(server)
    resp = proj.api.request("GET", f"/htc/projects/{proj.project_id}/container-registry/token", expect=200)
    assert resp.headers["content-type"].startswith("text/plain")
    assert SHELL_SAFE.fullmatch(proj.token), "the token is echoed into `docker login` by clients"
    assert re.fullmatch(rf"127\.0\.0\.1:\d+/{proj.project_id}/", proj.registry), proj.registry

    proj.push(busybox_image, "app:1")
    proj.push(busybox_image, "team/tool:v2")

    images = proj.api.get(f"/htc/projects/{proj.project_id}/container-registry/images")
    assert images == {"containerRegistry": proj.registry, "images": ["app:1", "team/tool:v2"]}
    for image in ("app:1", "team/tool:v2"):
        for prefix in ("/api/v1", ""):
            client = server.client(prefix=prefix)
            got = client.get(f"/htc/projects/{proj.project_id}/container-registry/images/{image}")
            assert (got.status_code, got.json()) == (200, {"status": "READY"}), (prefix, got.text)
    for missing in ("app:2", "app", "nothing:1", "team/tool"):  # no tag means latest
        got = proj.status(missing)
        assert got.status_code == 404, (missing, got.text)
        assert got.json()["error"] == "IMAGE_UNAVAILABLE" and missing in got.json()["message"]
    proj.push(busybox_image, "app:latest")
    assert proj.status("app").json() == {"status": "READY"}

    project = proj.api.get(f"/htc/projects/{proj.project_id}")
    assert project["containerRegistry"] == proj.registry and project["containerRegistry"].endswith("/")
    assert project["repositories"] == ["app", "team/tool"], "pushed repositories are listed"
    listed = [p for p in proj.api.list_all("/htc/projects") if p["projectId"] == proj.project_id]
    assert listed[0]["repositories"] == ["app", "team/tool"]

    # The pushed image really is there: skopeo reads it back with the same credentials.
    out = subprocess.run(
        ["skopeo", "inspect", "--tls-verify=false", "--creds", f"AWS:{proj.token}",
         f"docker://{proj.reference('app:1')}"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert json.loads(out)["Digest"].startswith("sha256:")


def test_repository_creation_is_idempotent_and_validates_names(
    registry_server: Callable[..., Any], registry_project: Callable[..., Any]
) -> None:
    server = registry_server()
    proj = registry_project(server)
    path = f"/htc/projects/{proj.project_id}/container-registry/repo"
    first = proj.api.post(f"{path}/tools/my-app", {})
    assert first == {
        "repositoryName": "tools/my-app",
        "successfullyCreated": True,
        "projectId": proj.project_id,
        "createdBy": first["createdBy"],
        "workspaceId": first["workspaceId"],
        "registryURI": proj.registry,  # the prefix: the tutorial appends the repository
    }
    resp = server.client(prefix="").post(f"{path}/tools/my-app")  # no body, root prefix
    assert resp.status_code == 200 and resp.json()["successfullyCreated"] is False, resp.text
    for bad in ("Upper", "a//b", "-lead", "trail_", "a:b", "sp ace", "x" * 250):
        resp = proj.api.request("POST", f"{path}/{bad}", json={})
        assert resp.status_code == 400, (bad, resp.text)
        assert resp.json()["errorType"] == "VALIDATION_ERROR"
    assert proj.api.get(f"/htc/projects/{proj.project_id}")["repositories"] == ["tools/my-app"]
    other = proj.api.request("POST", f"/htc/projects/{P2}/container-registry/repo/app", json={})
    assert other.status_code == 404, "an unknown project"


def test_projects_cannot_reach_each_others_namespace(
    registry_server: Callable[..., Any],
    registry_project: Callable[..., Any],
    busybox_image: str,
    require_tools: Callable[..., None],
) -> None:
    require_tools("skopeo")
    server = registry_server()
    a, b = registry_project(server), registry_project(server)
    b.push(busybox_image, "secret:1")

    # Neither an anonymous push nor A's token reaches B's namespace.
    with pytest.raises(subprocess.CalledProcessError):
        subprocess.run(
            ["podman", "push", "--tls-verify=false", busybox_image, b.reference("evil:1")],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
    with pytest.raises(subprocess.CalledProcessError):
        subprocess.run(
            ["podman", "push", "--tls-verify=false", "--creds", f"AWS:{a.token}", busybox_image,
             b.reference("evil:1")],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
    # ... nor reads B's image.
    with pytest.raises(subprocess.CalledProcessError):
        subprocess.run(
            ["skopeo", "inspect", "--tls-verify=false", "--creds", f"AWS:{a.token}",
             f"docker://{b.reference('secret:1')}"],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
    assert b.api.get(f"/htc/projects/{b.project_id}/container-registry/images")["images"] == ["secret:1"]
    assert a.api.get(f"/htc/projects/{a.project_id}/container-registry/images")["images"] == []

    # The token endpoint grants A nothing in B, and no catalog; the registry then refuses.
    access = registry_access(
        server, a.token, f"repository:{b.project_id}/secret:pull,push", "registry:catalog:*",
        f"repository:{a.project_id}/mine:pull",
    )  # fmt: skip
    assert access == [{"type": "repository", "name": f"{a.project_id}/mine", "actions": ["pull"]}]
    body = httpx.get(
        token_url(server),
        params={"scope": f"repository:{b.project_id}/secret:pull"},
        auth=("AWS", a.token),
    ).json()
    registry_url = f"http://{a.host}"
    for path in (f"/v2/{b.project_id}/secret/manifests/1", "/v2/_catalog"):
        got = httpx.get(registry_url + path, headers={"Authorization": f"Bearer {body['token']}"})
        assert got.status_code == 401, (path, got.status_code)


@pytest.mark.one_db  # no database-specific behaviour
def test_token_endpoint_refuses_bad_credentials_with_a_json_401(
    registry_server: Callable[..., Any], registry_project: Callable[..., Any]
) -> None:
    server = registry_server()
    proj = registry_project(server)
    scope = {"service": "openhtc-registry", "scope": f"repository:{proj.project_id}/app:pull"}
    attempts: list[dict[str, Any]] = [
        {},
        {"auth": ("AWS", "not-a-token")},
        {"auth": ("AWS", proj.token[:-4] + "AAAA")},  # forged signature
        {"headers": {"Authorization": "Basic !!notbase64"}},
        {"headers": {"Authorization": "Token abc"}},
    ]
    for kwargs in attempts:
        for prefix in ("/api/v1", ""):
            resp = httpx.get(f"{server.url}{prefix}/htc/registry/token", params=scope, **kwargs)
            assert resp.status_code == 401, (kwargs, resp.text)
            assert resp.headers["content-type"].startswith("application/json")
            assert resp.json()["error"] == "UNAUTHORIZED" and resp.json()["message"], resp.text
    resp = httpx.get(token_url(server), params={"scope": "nonsense"}, auth=("AWS", proj.token))
    assert resp.status_code == 400 and "scope" in resp.json()["message"]

    # Any user name works; an API bearer token is also accepted as the password.
    for user, password in (("someone", proj.token), ("AWS", server.token())):
        got = httpx.get(token_url(server), params=scope, auth=(user, password))
        assert got.status_code == 200, got.text


def test_submission_needs_the_image_in_the_project(
    registry_server: Callable[..., Any], registry_project: Callable[..., Any], busybox_image: str
) -> None:
    server = registry_server()  # runtime bwrap: jobs run images, so they must exist
    a, b = registry_project(server), registry_project(server)
    a.push(busybox_image, "app:1")
    b.push(busybox_image, "only-in-b:1")
    task = a.api.create_task(a.project_id)["taskId"]
    ok = a.api.job_request(["true"], imageName="app:1")
    assert a.api.submit(a.project_id, task, ok, ok)[0]["batchSize"] == 1

    for image in ("missing:1", "app:2", "only-in-b:1"):
        resp = a.api.request(
            "POST", f"{a.api.task_path(a.project_id, task)}/jobs/batch",
            json=[ok, a.api.job_request(["true"], imageName=image)],
        )  # fmt: skip
        assert resp.status_code == 404, (image, resp.text)
        assert resp.json()["error"] == "IMAGE_UNAVAILABLE" and image in resp.json()["message"]
    assert len(a.api.jobs(a.project_id, task)) == 2, "a refused request stores nothing"


@pytest.mark.one_db  # no database-specific behaviour
def test_htc_image_push_and_ls(
    registry_server: Callable[..., Any],
    registry_project: Callable[..., Any],
    busybox_image: str,
    run_htc: Callable[..., subprocess.CompletedProcess[str]],
    require_tools: Callable[..., None],
) -> None:
    require_tools("skopeo")
    server = registry_server()
    proj = registry_project(server)
    out = run_htc(server, "image", "push", busybox_image, "--project", proj.project_id).stdout
    local_repo, local_tag = busybox_image.removeprefix("localhost/").rsplit(":", 1)
    assert f"{local_repo}:{local_tag}" in out and proj.reference(f"{local_repo}:{local_tag}") in out

    result = run_htc(
        server, "image", "push", busybox_image, "-p", proj.project_id, "--as", "tools/sk",
        "--tool", "skopeo", "--json",
    )  # fmt: skip
    assert json.loads(result.stdout) == {
        "imageName": "tools/sk:latest",
        "reference": proj.reference("tools/sk:latest"),
        "projectId": proj.project_id,
        "tool": "skopeo",
    }
    listed = json.loads(run_htc(server, "image", "ls", "-p", proj.project_id, "--json").stdout)
    assert listed == {
        "containerRegistry": proj.registry,
        "images": sorted([f"{local_repo}:{local_tag}", "tools/sk:latest"]),
    }
    assert proj.status("tools/sk").json() == {"status": "READY"}
    table = run_htc(server, "image", "ls", "-p", proj.project_id).stdout
    assert proj.reference("tools/sk:latest") in table

    bad = run_htc(server, "image", "push", busybox_image, "-p", proj.project_id, "--as", "Bad:1", check=False)
    assert bad.returncode != 0 and "--as" in bad.stderr


def test_rescalehtc_client_with_an_aws_com_host_alias(
    registry_server: Callable[..., Any],
    busybox_image: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """rescalehtc only accepts a registry whose name contains "aws.com": with such an alias as
    ``registry_public_host`` its registry object works, and create_job_batch submits once the
    image (pushed through the loopback address) is READY."""
    port = free_port()
    alias = f"registry.htc-aws.com.internal:{port}"
    server = registry_server(env={"OPENHTC_REGISTRY_PUBLIC_HOST": alias}, args=("--registry-port", str(port)))
    for name in ("RESCALE_HTC_REFRESH_TOKEN", "RESCALE_API_TOKEN", "RESCALE_HTC_BEARER_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(HtcSession, "get_config_folder", lambda override=None: str(tmp_path / "cfg"))
    monkeypatch.setattr(HtcSession, "get_rescale_api_base_url", lambda: server.api_url)
    session = HtcSession(api_key=server.api_key)
    project = htcprojects.HtcProject(
        plumbing.post_htc_projects(session, {"projectName": "rh", "regions": ["AWS_US_EAST_1"]})
    )
    pid = project.json["projectId"]
    registry = container_registry.get_container_registry(session, project)
    assert registry.registry_url == f"{alias}/{pid}/" and registry.username == "AWS"
    assert registry.create_repo(session, "app")["successfullyCreated"] is True
    assert registry.get_repos(session) == ["app"]

    podman_push(busybox_image, f"127.0.0.1:{port}/{pid}/app:1", registry.get_token(session))
    assert registry.get_images(session) == ["app:1"]
    assert registry.is_image_ready(session, "app:1")

    task = htctasks.create_task_with_name(session, project, "rh-task", "registry")
    common = {"priority": "ON_DEMAND_PRIORITY", "exec_timeout_seconds": 600, "architecture": "X86"}
    batch = htcjobs.create_job_batch(
        session, task, batch_size=2, image_name="app:1", commands=["true"], **common
    )
    assert batch.json["batchSize"] == 2
    with pytest.raises(HtcException, match="app:2"):
        htcjobs.create_job_batch(session, task, batch_size=1, image_name="app:2", commands=["true"], **common)


@pytest.mark.one_db  # no database-specific behaviour
def test_without_docker_registry_the_server_starts_and_says_what_to_install(
    registry_server: Callable[..., Any],
) -> None:
    server = registry_server(env={"OPENHTC_REGISTRY_BINARY": "docker-registry-not-installed"})
    api = server.api()
    pid, task = api.project_and_task()
    for path in ("images", "images/app:1"):
        resp = api.request("GET", f"/htc/projects/{pid}/container-registry/{path}")
        assert resp.status_code == 404 and "docker-registry" in resp.json()["message"], resp.text
    resp = api.request("POST", f"{api.task_path(pid, task)}/jobs/batch", json=[api.job_request(["true"])])
    assert resp.status_code == 404 and "docker-registry" in resp.json()["message"], resp.text
    assert "apt-get install docker-registry" in server.log_tail()


@pytest.mark.one_db  # no database-specific behaviour
def test_a_dead_registry_is_restarted_on_the_same_address_and_stops_with_the_server(
    registry_server: Callable[..., Any], registry_project: Callable[..., Any], busybox_image: str
) -> None:
    server = registry_server()
    proj = registry_project(server)
    proj.push(busybox_image, "app:1")
    pid_file = server.data_dir / "registry" / "registry.pid"
    first = pid_in(pid_file)
    assert first is not None
    os.kill(first, signal.SIGKILL)

    deadline = time.monotonic() + 30
    images = f"/htc/projects/{proj.project_id}/container-registry/images"
    while True:
        resp = proj.api.request("GET", images)  # a call that always reaches the registry
        restarted = pid_in(pid_file) not in (None, first)
        if restarted and resp.status_code == 200 and resp.json()["images"] == ["app:1"]:
            break
        assert time.monotonic() < deadline, f"the registry did not come back: {resp.text}"
        time.sleep(0.2)
    assert proj.api.get(f"/htc/projects/{proj.project_id}")["containerRegistry"] == proj.registry
    proj.push(busybox_image, "app:2")  # the same address and token still work

    # A server killed with SIGKILL takes its registry along; the next start serves the same images
    # at the same address.
    second = pid_in(pid_file)
    assert second is not None
    server.kill9()
    wait_until(lambda: not process_alive(second), "the registry to die with its killed server")
    server.restart()
    assert proj.status("app:2").json() == {"status": "READY"}
    assert proj.api.get(f"/htc/projects/{proj.project_id}")["containerRegistry"] == proj.registry

    third = pid_in(pid_file)
    assert third is not None and third != second
    server.stop()
    assert not process_alive(third), "the registry outlived its server"


@pytest.mark.one_db  # no database-specific behaviour
def test_image_source_gives_a_pull_only_token_for_one_repository(
    registry_server: Callable[..., Any],
    registry_project: Callable[..., Any],
    busybox_image: str,
    require_tools: Callable[..., None],
) -> None:
    require_tools("skopeo")
    server = registry_server()
    a, b = registry_project(server), registry_project(server)
    a.push(busybox_image, "app:1")
    b.push(busybox_image, "app:1")
    # The server's own facade, as an executor process builds it (same keys, same registry).
    settings = Settings(data_dir=server.data_dir, registry_url=f"http://{a.host}", port=server.port)
    source = Registry(settings, Clock(), Database(f"sqlite:///{server.data_dir / 'unused.db'}"))
    pull = source.pull_access(a.project_id, "app:1")
    assert pull.reference == a.reference("app:1") and pull.repository == f"{a.project_id}/app"
    assert (pull.registry_url, pull.tag, pull.username, pull.insecure) == (
        f"http://{a.host}",
        "1",
        "AWS",
        True,
    )
    assert source.pull_access(a.project_id, "app").tag == "latest"

    bearer = {"Authorization": f"Bearer {pull.password}"}
    accept = {"Accept": "application/vnd.oci.image.manifest.v1+json"}
    ok = httpx.get(f"{pull.registry_url}/v2/{pull.repository}/manifests/1", headers=bearer | accept)
    assert ok.status_code == 200, ok.text
    other = httpx.get(f"{pull.registry_url}/v2/{b.project_id}/app/manifests/1", headers=bearer | accept)
    assert other.status_code == 401
    upload = httpx.post(f"{pull.registry_url}/v2/{pull.repository}/blobs/uploads/", headers=bearer)
    assert upload.status_code == 401, "a pull token cannot push"
    # podman/skopeo send it as a Basic password to the token endpoint: still pull-only, one repo.
    subprocess.run(
        ["skopeo", "inspect", "--tls-verify=false", "--creds", f"AWS:{pull.password}",
         f"docker://{pull.reference}"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert registry_access(server, pull.password, f"repository:{pull.repository}:pull,push") == [
        {"type": "repository", "name": pull.repository, "actions": ["pull"]}
    ]
    assert registry_access(server, pull.password, f"repository:{b.project_id}/app:pull") == []
    source.stop()


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def pid_in(path: Path) -> int | None:
    try:
        return int(path.read_text())
    except (OSError, ValueError):
        return None


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def httpx_status(url: str) -> int | None:
    try:
        return httpx.get(url, timeout=2).status_code
    except httpx.HTTPError:
        return None


def process_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"
