"""The registry facade the rest of openhtc uses: ``ServiceSet.registry``.

It owns the token keys, the embedded registry process (or the URL of an external one), the
server's registry client and the repositories table, and it is the executors' ``ImageSource``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from openhtc.auth.tokens import Principal
from openhtc.config import Settings
from openhtc.domain.clock import Clock
from openhtc.domain.errors import ImageUnavailable, Unauthenticated, ValidationFailed
from openhtc.domain.submission import IMAGE_NAME_RE
from openhtc.registry.client import RegistryClient, RegistryUnavailable
from openhtc.registry.keys import load_or_create_registry_key
from openhtc.registry.supervisor import EmbeddedRegistry
from openhtc.registry.tokens import (
    JOB_ACTIONS,
    MAX_REPOSITORY_LENGTH,
    PUSH,
    REPO_NAME_RE,
    USER_ACTIONS,
    Access,
    IssuedToken,
    Permission,
    RegistryTokens,
    grant,
    in_project,
    project_of,
)
from openhtc.runtimes.base import ImagePull
from openhtc.store.db import Database
from openhtc.store.repositories import RepositoryStore

SERVICE = "openhtc-registry"
ISSUER = "openhtc-registry-token-issuer"
TOKEN_PATH = "/htc/registry/token"  # the token endpoint, under /api/v1 (and /)
REGISTRY_TOKEN_TTL = 300
PULL_TOKEN_TTL = 3600
SEEN_TTL = 5.0  # seconds a found manifest is taken to still exist
USERNAME = "AWS"  # what Rescale's ECR logins use; the token endpoint ignores the name


def token_realm(settings: Settings) -> str:
    """The absolute URL of the token endpoint, as the registry's clients reach this server."""
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "", "::") else settings.host
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{settings.port}/api/v1{TOKEN_PATH}"


def split_image(image_name: str) -> tuple[str, str]:
    """``repo[:tag]`` → (repo, tag); the tag defaults to ``latest``."""
    if not IMAGE_NAME_RE.fullmatch(image_name):
        raise ImageUnavailable(
            f"Image {image_name} is unavailable: not a valid image name (expected repo[:tag])"
        )
    repo, _, tag = image_name.partition(":")
    return repo, tag or "latest"


def unavailable_message(image_name: str) -> str:
    """Rescale's wording for a missing image."""
    return (
        f"Image {image_name} is unavailable. Please check the image name. If the image was pushed "
        "recently, try again at a later time"
    )


@dataclass(frozen=True)
class Caller:
    """Who asks the token endpoint, and what it may do per repository."""

    subject: str
    workspace_id: str
    allowed: Permission


class Registry:
    """One project namespace ``{projectId}/`` per project in one CNCF distribution registry."""

    def __init__(self, settings: Settings, clock: Clock, db: Database) -> None:
        key = load_or_create_registry_key(settings.data_dir / "keys")
        self.tokens = RegistryTokens(key, clock, ISSUER, SERVICE, REGISTRY_TOKEN_TTL)
        self.repositories = RepositoryStore(db)
        self.clock = clock
        self.login_ttl = settings.token_ttl_seconds
        self._public_host = settings.registry_public_host
        self.embedded: EmbeddedRegistry | None = None
        self._external_url = settings.registry_url.rstrip("/") if settings.registry_url else None
        if self._external_url is None:
            self.embedded = EmbeddedRegistry(
                binary=settings.registry_binary,
                root=settings.data_dir / "registry",
                port=settings.registry_port,
                realm=token_realm(settings),
                service=SERVICE,
                issuer=ISSUER,
                cert_path=key.cert_path,
            )
        self.client = RegistryClient(lambda: self.url, self._server_token)
        self._pull_tokens: dict[str, IssuedToken] = {}
        self._seen: dict[str, float] = {}  # "{pid}/repo:tag" -> until when it is known to exist
        self._lock = threading.Lock()

    # -- lifecycle and addresses ------------------------------------------------------------------

    def start(self) -> None:
        # httpx logs every request at INFO, and image lookups make one each: keep the log useful.
        logging.getLogger("httpx").setLevel(logging.WARNING)
        if self.embedded is not None:
            self.embedded.start()

    def stop(self) -> None:
        if self.embedded is not None:
            self.embedded.stop()
        self.client.close()

    @property
    def url(self) -> str:
        """The registry's HTTP API as this server and its executors reach it."""
        if self._external_url is not None:
            return self._external_url
        assert self.embedded is not None
        return self.embedded.url

    @property
    def available(self) -> bool:
        return self._external_url is not None or (self.embedded is not None and self.embedded.started)

    @property
    def host(self) -> str:
        """host:port users tag images with."""
        return self._public_host or urlsplit(self.url).netloc

    def container_registry(self, project_id: str) -> str:
        return f"{self.host}/{project_id}/"

    def require_available(self) -> None:
        if not self.available:
            raise RegistryUnavailable(
                "the container registry is not available on this server: install docker-registry "
                "(apt-get install docker-registry) and restart it, or start it with --registry-url"
            )

    # -- tokens -----------------------------------------------------------------------------------

    def _server_token(self, access: Sequence[Access]) -> IssuedToken:
        return self.tokens.registry_token("openhtc-server", access, ttl=60)

    def login_token(self, user_id: str, workspace_id: str, project_id: str, actions: Collection[str]) -> str:
        """The registry password of one project (``podman login -u AWS -p <this>``)."""
        return self.tokens.login_token(user_id, workspace_id, project_id, actions, self.login_ttl)

    def authenticate(
        self,
        password: str,
        verify_bearer: Callable[[str], Principal],
        project_exists: Callable[[str, str], bool],
    ) -> Caller:
        """The token endpoint's Basic password is one of: a project login token (its project, its
        actions), a registry token we issued (an executor's pull password: what it already grants),
        or an API bearer (a user: the workspace's projects; a job: pull in its own project)."""
        try:
            login = self.tokens.verify_login(password)
        except Unauthenticated as login_error:
            try:
                subject, access = self.tokens.verify_registry_token(password)
            except Unauthenticated:
                pass
            else:
                return Caller(subject, "", lambda repository: access.get(repository, ()))
            try:
                who = verify_bearer(password)
            except Unauthenticated:
                raise login_error from None
            if who.is_job:
                assert who.project_id is not None
                return Caller(who.user_id, who.workspace_id, in_project(who.project_id, JOB_ACTIONS))

            def allowed(repository: str) -> Collection[str]:
                project_id = project_of(repository)
                exists = project_id is not None and project_exists(who.workspace_id, project_id)
                return USER_ACTIONS if exists else ()

            return Caller(who.user_id, who.workspace_id, allowed)
        return Caller(login.user_id, login.workspace_id, in_project(login.project_id, login.actions))

    def issue(self, caller: Caller, requested: Sequence[Access]) -> IssuedToken:
        """The token endpoint: grant what the caller may, and record repositories granted push
        (so they appear in the project's ``repositories`` even without a POST …/repo)."""
        granted = grant(requested, caller.allowed)
        now = self.clock.now()
        for access in granted:
            if PUSH in access.actions:
                project_id, _, repo = access.name.partition("/")
                self.repositories.ensure(project_id, caller.workspace_id, [repo], caller.subject, now)
        return self.tokens.registry_token(caller.subject, granted)

    # -- lookups ----------------------------------------------------------------------------------

    def validate_repository(self, project_id: str, name: str) -> None:
        if not REPO_NAME_RE.fullmatch(name):
            raise ValidationFailed(
                f"must be lower-case letters and digits, separated by '.', '_', '-' or '/' (got {name!r})",
                field="repoName",
            )
        if len(project_id) + 1 + len(name) > MAX_REPOSITORY_LENGTH:
            raise ValidationFailed(f"is too long (at most {MAX_REPOSITORY_LENGTH} characters with "
                                   "the project ID)", field="repoName")  # fmt: skip

    def repository_names(self, project_ids: Sequence[str]) -> dict[str, list[str]]:
        """The repositories of each project (one query for a page of the project list)."""
        return self.repositories.names(project_ids)

    def images(self, project_id: str) -> list[str]:
        """``repo:tag`` for every tag in the project's namespace."""
        self.require_available()
        prefix = f"{project_id}/"
        out: list[str] = []
        for repository in self.client.repositories(prefix):
            repo = repository[len(prefix) :]
            out.extend(f"{repo}:{tag}" for tag in self.client.tags(repository))
        return out

    def image_ready(self, project_id: str, image_name: str) -> bool:
        """Whether the manifest exists. A found one is remembered a few seconds, so a burst of
        submissions naming one image costs one registry round trip; a missing one never is."""
        repo, tag = split_image(image_name)
        self.require_available()
        key = f"{project_id}/{repo}:{tag}"
        now = time.monotonic()
        if self._seen.get(key, 0.0) > now:
            return True
        found = self.client.manifest_exists(f"{project_id}/{repo}", tag)
        if found:
            if len(self._seen) > 10000:
                self._seen.clear()
            self._seen[key] = now + SEEN_TTL
        return found

    def require_image(self, project_id: str, image_name: str) -> None:
        if not self.image_ready(project_id, image_name):
            raise ImageUnavailable(unavailable_message(image_name))

    # -- ImageSource ------------------------------------------------------------------------------

    def pull_access(self, project_id: str, image_name: str) -> ImagePull:
        """How an executor pulls a job's image: a token allowed to pull exactly that repository."""
        repo, tag = split_image(image_name)
        self.require_available()
        repository = f"{project_id}/{repo}"
        if project_of(repository) != project_id:
            raise ImageUnavailable(unavailable_message(image_name))
        now = self.clock.now()
        with self._lock:
            token = self._pull_tokens.get(repository)
            if token is None or token.issued_at + token.expires_in - now < PULL_TOKEN_TTL / 2:
                token = self.tokens.registry_token(
                    "openhtc-executor", [Access("repository", repository, ("pull",))], PULL_TOKEN_TTL
                )
                if len(self._pull_tokens) > 10000:
                    self._pull_tokens.clear()
                self._pull_tokens[repository] = token
        parts = urlsplit(self.url)
        return ImagePull(
            registry_url=f"{parts.scheme}://{parts.netloc}",
            reference=f"{parts.netloc}/{repository}:{tag}",
            repository=repository,
            tag=tag,
            username=USERNAME,
            password=token.token,
            insecure=parts.scheme == "http",
        )
