"""Tokens and identity: /auth/token, /auth/whoami, /auth/token/whoami, JWKS, /oauth2/token."""

from __future__ import annotations

import base64
from typing import Any
from urllib.parse import parse_qs

from fastapi import APIRouter, Depends, Request

from openhtc.api.deps import app_services, credentials, services
from openhtc.api.responses import JSONResponse
from openhtc.auth.tokens import Principal
from openhtc.domain.errors import Unauthenticated, ValidationFailed
from openhtc.services.service_set import ServiceSet

router = APIRouter()


def principal_for_api_key(svc: ServiceSet, key: str) -> Principal:
    user = svc.accounts.user_for_api_key(key)
    if user is None:
        raise Unauthenticated("unknown or revoked API key")
    workspace = svc.accounts.workspace(user.workspace_id)
    return Principal(
        user_id=user.id,
        workspace_id=user.workspace_id,
        role=user.role,
        email=user.email,
        full_name=user.full_name,
        workspace_name=workspace.name if workspace else "",
    )


@router.get("/.well-known/jwks.json")
def jwks(svc: ServiceSet = Depends(services)) -> JSONResponse:
    return JSONResponse({"keys": [svc.tokens.key.jwk()]})


@router.get("/auth/token")
def token(request: Request, svc: ServiceSet = Depends(services)) -> JSONResponse:
    header = request.headers.get("authorization", "")
    kind, _, value = header.partition(" ")
    if kind.lower() == "token" and value.strip():
        who = principal_for_api_key(svc, value.strip())
    elif kind.lower() == "refresh" and value.strip():
        who = svc.tokens.verify(value.strip(), typ="refresh")
    else:
        raise Unauthenticated("expected 'Authorization: Token <apiKey>' or 'Refresh <refreshToken>'")
    bearer, ttl = svc.tokens.bearer(who)
    return JSONResponse({"tokenValue": bearer, "expiresIn": ttl})


@router.get("/auth/token/whoami")
def token_whoami(request: Request, svc: ServiceSet = Depends(services)) -> JSONResponse:
    claims = svc.tokens.decode(credentials(request, "Bearer"))
    return JSONResponse(claims)


@router.get("/auth/whoami")
def whoami(request: Request, svc: ServiceSet = Depends(services)) -> JSONResponse:
    who = principal_for_api_key(svc, credentials(request, "Token"))
    admin = who.role == "WORKSPACE_ADMIN"
    user: dict[str, Any] = {
        "userId": who.user_id,
        "email": who.email,
        "fullName": who.full_name,
        "isRescaleAdmin": False,
        "isOrganizationAdmin": False,
        "isWorkspaceAdmin": admin,
        "isSuperuser": False,
        "workspace": {"id": who.workspace_id, "name": who.workspace_name},
        "organization": {"code": "openhtc", "canViewOrganizationJobs": False},
        "rescaleAdmin": False,
        "organizationAdmin": False,
        "workspaceAdmin": admin,
        "superuser": False,
    }
    return JSONResponse({"user": user})


@router.post("/oauth2/token")
async def oauth2_token(request: Request) -> JSONResponse:
    """OAuth 2.0 client credentials: the API key is the client secret (in the form or HTTP Basic)."""
    svc = app_services(request)
    form = {k: v[0] for k, v in parse_qs((await request.body()).decode("utf-8", "replace")).items()}
    if form.get("grant_type") != "client_credentials":
        raise ValidationFailed("only 'client_credentials' is supported", field="grant_type")
    secret = form.get("client_secret") or _basic_secret(request.headers.get("authorization", ""))
    if not secret:
        raise ValidationFailed("the API key is required as client_secret", field="client_secret")
    bearer, ttl = svc.tokens.bearer(principal_for_api_key(svc, secret))
    return JSONResponse({"access_token": bearer, "token_type": "Bearer", "expires_in": ttl})


def _basic_secret(header: str) -> str | None:
    kind, _, value = header.partition(" ")
    if kind.lower() != "basic":
        return None
    try:
        return base64.b64decode(value.strip()).decode().partition(":")[2] or None
    except (ValueError, UnicodeDecodeError):
        return None
