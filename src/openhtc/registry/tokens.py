"""The Docker registry token service, as pure functions plus one small issuing class.

A registry client asks ``GET <realm>?service=…&scope=repository:NAME:pull,push`` (``scope`` may
repeat) with HTTP Basic credentials; we answer with an ES256 JWT whose ``access`` claim holds the
*granted subset* of what was asked. Project namespaces are the first path segment of a
repository name: ``{projectId}/repo``. Nothing outside the caller's projects is ever granted, and
``registry:catalog:*`` (which would list every project's repositories) only to the server itself.

The same key also signs the *login tokens* users get from ``…/container-registry/token``: the
password for ``podman login -u AWS``. A login token names one project and the actions allowed in
it; it has its own audience, so it is not a registry token nor an API bearer.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import jwt

from openhtc.domain.clock import Clock
from openhtc.domain.errors import Unauthenticated, ValidationFailed
from openhtc.registry.keys import RegistryKey

# The repository-name grammar of the Rescale API (and of the distribution spec, without a host).
REPO_NAME_RE = re.compile(r"(?:[a-z0-9]+(?:[._-][a-z0-9]+)*/)*[a-z0-9]+(?:[._-][a-z0-9]+)*")
MAX_REPOSITORY_LENGTH = 255  # distribution's limit on a whole repository name
PULL, PUSH = "pull", "push"
USER_ACTIONS = frozenset({PULL, PUSH})
JOB_ACTIONS = frozenset({PULL})
LOGIN_AUDIENCE = "openhtc-registry-login"


@dataclass(frozen=True, slots=True)
class Access:
    """One entry of a token's ``access`` claim (and of a parsed ``scope``)."""

    type: str
    name: str
    actions: tuple[str, ...]

    def claim(self) -> dict[str, Any]:
        return {"type": self.type, "name": self.name, "actions": list(self.actions)}


def parse_scopes(scopes: Iterable[str]) -> list[Access]:
    """``["repository:p/app:pull,push", "registry:catalog:*"]`` → Access values.

    A parameter may also hold several scopes separated by spaces (OAuth2 style). A resource
    class such as ``repository(plugin)`` is dropped. Malformed scopes are a 400.
    """
    out: list[Access] = []
    for param in scopes:
        for scope in param.split():
            kind, sep, rest = scope.partition(":")
            name, sep2, actions = rest.rpartition(":")
            if not (sep and sep2 and kind and name):
                raise ValidationFailed(
                    f"malformed scope {scope!r} (expected TYPE:NAME:ACTIONS)", field="scope"
                )
            kind = kind.split("(", 1)[0]
            out.append(Access(kind, name, tuple(a for a in actions.split(",") if a)))
    return out


def project_of(repository: str) -> str | None:
    """The project namespace of ``{projectId}/repo``; None when the name has no namespace."""
    namespace, sep, rest = repository.partition("/")
    if not sep or not rest or len(repository) > MAX_REPOSITORY_LENGTH:
        return None
    if not REPO_NAME_RE.fullmatch(repository):
        return None
    return namespace


Permission = Callable[[str], Collection[str]]  # repository name -> the actions allowed on it


def in_project(project_id: str, actions: Collection[str]) -> Permission:
    """``actions`` on every repository of one project's namespace, nothing elsewhere."""
    return lambda repository: actions if project_of(repository) == project_id else ()


def grant(requested: Sequence[Access], allowed: Permission) -> list[Access]:
    """The subset of ``requested`` to grant. ``allowed(repository)`` gives the actions the caller
    may take on a namespaced repository. Only repository scopes can be granted; an entry whose
    actions are all refused is left out, so the registry answers 401 "insufficient scope"."""
    granted: dict[str, list[str]] = {}
    for access in requested:
        if access.type != "repository" or project_of(access.name) is None:
            continue
        permitted = allowed(access.name)
        actions = granted.setdefault(access.name, [])
        actions.extend(a for a in access.actions if a in permitted and a not in actions)
    return [Access("repository", name, tuple(actions)) for name, actions in granted.items() if actions]


@dataclass(frozen=True, slots=True)
class IssuedToken:
    token: str
    expires_in: int
    issued_at: float

    def response(self) -> dict[str, Any]:
        """The token endpoint's JSON (both names: docker reads ``token``, OAuth2 clients the other)."""
        issued = datetime.fromtimestamp(self.issued_at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return {
            "token": self.token,
            "access_token": self.token,
            "expires_in": self.expires_in,
            "issued_at": issued,
        }


@dataclass(frozen=True, slots=True)
class Login:
    """Who a verified login token speaks for."""

    user_id: str
    workspace_id: str
    project_id: str
    actions: frozenset[str]


class RegistryTokens:
    """Signs registry tokens (for the registry) and login tokens (the users' registry password)."""

    def __init__(self, key: RegistryKey, clock: Clock, issuer: str, service: str, ttl_seconds: int) -> None:
        self.key = key
        self.clock = clock
        self.issuer = issuer
        self.service = service
        self.ttl_seconds = ttl_seconds

    def _sign(self, claims: dict[str, Any]) -> str:
        return jwt.encode(claims, self.key.private_key, algorithm="ES256", headers={"kid": self.key.kid})

    def registry_token(self, subject: str, access: Sequence[Access], ttl: int | None = None) -> IssuedToken:
        """A token the registry accepts: ``aud`` is a string equal to the registry's service."""
        now = int(self.clock.now())
        ttl = ttl or self.ttl_seconds
        claims = {
            "iss": self.issuer,
            "sub": subject,
            "aud": self.service,
            "iat": now,
            "nbf": now - 5,  # tolerate a little clock skew between us and the registry
            "exp": now + ttl,
            "jti": uuid.uuid4().hex,
            "access": [a.claim() for a in access],
        }
        return IssuedToken(self._sign(claims), ttl, now)

    def login_token(
        self, user_id: str, workspace_id: str, project_id: str, actions: Collection[str], ttl: int
    ) -> str:
        now = int(self.clock.now())
        claims = {
            "iss": self.issuer,
            "aud": LOGIN_AUDIENCE,
            "sub": user_id,
            "iat": now,
            "exp": now + ttl,
            "workspaceId": workspace_id,
            "projectId": project_id,
            "actions": sorted(actions),
        }
        return self._sign(claims)

    def verify_registry_token(self, token: str) -> tuple[str, dict[str, frozenset[str]]]:
        """(subject, repository -> actions) of a registry token we issued and that is still valid.

        Executors get registry tokens as pull passwords (ImagePull); podman sends them to the
        token endpoint as Basic passwords, which then re-issues at most the same access."""
        try:
            claims = jwt.decode(
                token,
                self.key.private_key.public_key(),
                algorithms=["ES256"],
                audience=self.service,
                issuer=self.issuer,
                leeway=30,  # clock skew between replicas (exp is checked against our clock)
                options={"require": ["exp", "sub", "aud"], "verify_exp": False, "verify_nbf": False},
            )
        except jwt.PyJWTError as exc:
            raise Unauthenticated(f"invalid registry token: {exc}") from None
        if claims["exp"] <= self.clock.now():
            raise Unauthenticated("registry token expired")
        access: dict[str, frozenset[str]] = {}
        for entry in claims.get("access") or []:
            if isinstance(entry, dict) and entry.get("type") == "repository":
                access[str(entry.get("name"))] = frozenset(map(str, entry.get("actions") or []))
        return str(claims["sub"]), access

    def verify_login(self, token: str) -> Login:
        try:
            claims = jwt.decode(
                token,
                self.key.private_key.public_key(),
                algorithms=["ES256"],
                audience=LOGIN_AUDIENCE,
                issuer=self.issuer,
                leeway=30,  # clock skew between replicas (exp is checked against our clock)
                options={"require": ["exp", "sub", "aud"], "verify_exp": False},
            )
        except jwt.PyJWTError as exc:
            raise Unauthenticated(f"invalid registry token: {exc}") from None
        if claims["exp"] <= self.clock.now():
            raise Unauthenticated("registry token expired: get a new one from …/container-registry/token")
        try:
            return Login(
                claims["sub"], claims["workspaceId"], claims["projectId"], frozenset(claims["actions"])
            )
        except (KeyError, TypeError):
            raise Unauthenticated("invalid registry token: claims missing") from None
