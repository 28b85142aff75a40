"""Bearer and refresh tokens: RS256 JWTs signed with the installation's key."""

from __future__ import annotations

import secrets
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import jwt

from openhtc.auth.keys import SigningKey
from openhtc.domain.clock import Clock
from openhtc.domain.errors import PermissionDenied, Unauthenticated

ISSUER = "openhtc"
AUDIENCE = "openhtc-api"
AGENT = "agent"  # the typ and scope of agent tokens
# A verified agent token is trusted this long without checking its signature again (never past its
# expiry). Every exchange carries one: the RS256 check was a tenth of an idle exchange's cost.
# What a token may do beyond that (bound to which agent, lost or not) is the agent row's, read
# by the exchange itself, so this cache relaxes no rule.
AGENT_VERIFIED_SECONDS = 300.0
AGENT_CACHE_ENTRIES = 16384


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: a user, or a job acting within its own task."""

    user_id: str
    workspace_id: str
    role: str
    email: str = ""
    full_name: str = ""
    workspace_name: str = ""
    scope: str = "user"  # "user" or "job"
    project_id: str | None = None  # set for job tokens
    task_id: str | None = None  # set for job tokens
    claims: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def is_job(self) -> bool:
        return self.scope == "job"


class TokenService:
    """Mints and verifies tokens. Verified tokens are cached, since every request carries one."""

    def __init__(self, key: SigningKey, clock: Clock, ttl_seconds: int, refresh_ttl_seconds: int) -> None:
        self.key = key
        self.clock = clock
        self.ttl_seconds = ttl_seconds
        self.refresh_ttl_seconds = refresh_ttl_seconds
        self._cache: OrderedDict[str, Principal] = OrderedDict()
        # agent token -> (its claims, trusted until)
        self._agents: OrderedDict[str, tuple[dict[str, Any], float]] = OrderedDict()
        self._lock = threading.Lock()

    def _encode(self, payload: dict[str, Any]) -> str:
        return jwt.encode(payload, self.key.private_key, algorithm="RS256", headers={"kid": self.key.kid})

    def _base_claims(self, principal: Principal, ttl: int, typ: str) -> dict[str, Any]:
        now = int(self.clock.now())
        claims: dict[str, Any] = {
            "iss": ISSUER,
            "aud": AUDIENCE,
            "sub": principal.user_id,
            "iat": now,
            "exp": now + ttl,
            "typ": typ,
            "scope": principal.scope,
            "userFullName": principal.full_name,
            "userEmail": principal.email,
            "workspaceId": principal.workspace_id,
            "workspaceName": principal.workspace_name,
            "organizationCode": None,
            "groups": [principal.role],
            "role": principal.role,
        }
        if principal.is_job:
            claims["projectId"] = principal.project_id
            claims["taskId"] = principal.task_id
        for name, value in principal.claims.items():
            if not name.startswith("__"):
                claims[f"userDefined_{name}"] = value
        return claims

    def bearer(self, principal: Principal) -> tuple[str, int]:
        return self._encode(self._base_claims(principal, self.ttl_seconds, "bearer")), self.ttl_seconds

    def refresh(self, principal: Principal) -> str:
        return self._encode(self._base_claims(principal, self.refresh_ttl_seconds, "refresh"))

    def storage(self, subject: str, rw: list[str], ro: list[str], ttl: int) -> tuple[str, int]:
        """A local-storage token: reaches the key prefixes ``rw`` (read-write) and ``ro``
        (read-only) through openhtc's object API, and nothing else. Returns it and its expiry."""
        now = int(self.clock.now())
        claims = {
            "iss": ISSUER,
            "aud": AUDIENCE,
            "sub": subject,
            "iat": now,
            "exp": now + ttl,
            "typ": "storage",
            "rw": rw,
            "ro": ro,
        }
        return self._encode(claims), now + ttl

    def agent(self, name: str, region: str, ttl: int, agents: int = 1) -> str:
        """An agent token: authenticates ``htc agent`` on /openhtc/v1/agents/... and nothing else.
        ``region`` is the one region its agents may register in ("*": any); ``agents``: how many
        live agents it may speak for at once (each bound to it at its first register)."""
        now = int(self.clock.now())
        claims = {
            "iss": ISSUER,
            "aud": AUDIENCE,
            "sub": name,
            "iat": now,
            "exp": now + ttl,
            "typ": AGENT,
            "scope": AGENT,
            "region": region,
            "agents": agents,
            # two tokens minted in one second are still two: an agent is bound to its token's hash
            "jti": secrets.token_hex(8),
        }
        return self._encode(claims)

    def verify_agent(self, token: str) -> dict[str, Any]:
        """The claims of an agent token; any other credential is refused (403). A token verified
        once is trusted for AGENT_VERIFIED_SECONDS, never past its expiry."""
        now = self.clock.now()
        with self._lock:
            cached = self._agents.get(token)
        if cached is not None and now < cached[1]:
            return cached[0]
        claims = self._verify_agent(token)
        until = min(float(claims["exp"]), now + AGENT_VERIFIED_SECONDS)
        with self._lock:
            self._agents[token] = (claims, until)
            self._agents.move_to_end(token)
            while len(self._agents) > AGENT_CACHE_ENTRIES:
                self._agents.popitem(last=False)
        return claims

    def _verify_agent(self, token: str) -> dict[str, Any]:
        try:
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise Unauthenticated("invalid token") from None
        if unverified.get("typ") != AGENT:
            raise PermissionDenied(
                "only an agent token (htc admin create-agent-token) reaches the agent routes"
            )
        return self.decode(token, AGENT)

    def decode(self, token: str, typ: str = "bearer") -> dict[str, Any]:
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                self.key.public_key,
                algorithms=["RS256"],
                audience=AUDIENCE,
                issuer=ISSUER,
                options={"require": ["exp", "iat", "sub"], "verify_exp": False},
            )
        except jwt.PyJWTError as exc:
            raise Unauthenticated(f"invalid token: {exc}") from None
        if claims.get("exp", 0) <= self.clock.now():
            raise Unauthenticated("token expired")
        if claims.get("typ") == AGENT and typ != AGENT:
            raise PermissionDenied("an agent token reaches only the agent routes (/openhtc/v1/agents/...)")
        if claims.get("typ") != typ:
            raise Unauthenticated(f"a {claims.get('typ')} token cannot be used here")
        return claims

    def verify(self, token: str, typ: str = "bearer") -> Principal:
        cache_key = f"{typ}:{token}"
        with self._lock:
            cached = self._cache.get(cache_key)
        if cached is not None and cached.claims.get("__exp", 0) > self.clock.now():
            return cached
        claims = self.decode(token, typ)
        principal = principal_from_claims(claims)
        with self._lock:
            self._cache[cache_key] = principal
            if len(self._cache) > 4096:
                self._cache.popitem(last=False)
        return principal


def principal_from_claims(claims: dict[str, Any]) -> Principal:
    user_claims = {
        k.removeprefix("userDefined_"): v for k, v in claims.items() if k.startswith("userDefined_")
    }
    user_claims["__exp"] = claims["exp"]
    return Principal(
        user_id=claims["sub"],
        workspace_id=claims["workspaceId"],
        role=claims.get("role", "MEMBER"),
        email=claims.get("userEmail", ""),
        full_name=claims.get("userFullName", ""),
        workspace_name=claims.get("workspaceName", ""),
        scope=claims.get("scope", "user"),
        project_id=claims.get("projectId"),
        task_id=claims.get("taskId"),
        claims=user_claims,
    )
