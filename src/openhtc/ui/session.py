"""Dashboard sessions: sign-in with an API key, a signed cookie, CSRF tokens for forms.

The session cookie holds a bearer token minted for the key's user (an RS256 JWT signed with the
installation's key), so a page sees exactly what the API would show that user, and the session
ends when the token expires. The cookie is HttpOnly and SameSite=Strict. Every form POST also
carries a CSRF token: an HMAC of the session token under a key derived from the signing key, so
it needs no server-side state and survives restarts. Sign-in itself uses a double-submit token
(a random cookie repeated in the form), since there is no session yet.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from urllib.parse import parse_qs

from fastapi import Request
from starlette.responses import Response

from openhtc.auth.tokens import Principal
from openhtc.domain.errors import PermissionDenied, Unauthenticated
from openhtc.services.service_set import ServiceSet

SESSION_COOKIE = "openhtc_session"
LOGIN_CSRF_COOKIE = "openhtc_login_csrf"
MAX_FORM_BYTES = 16 * 1024


def _csrf_key(svc: ServiceSet) -> bytes:
    private = svc.tokens.key.private_key.private_numbers().d
    return hashlib.sha256(b"openhtc-ui-csrf:" + str(private).encode()).digest()


def csrf_token(svc: ServiceSet, session_token: str) -> str:
    return hmac.new(_csrf_key(svc), session_token.encode(), hashlib.sha256).hexdigest()


def session_token(request: Request) -> str:
    token = request.cookies.get(SESSION_COOKIE, "")
    if not token:
        raise Unauthenticated("sign in first")
    return token


def viewer(svc: ServiceSet, request: Request) -> Principal:
    """The signed-in user; Unauthenticated (a redirect to the sign-in page) otherwise."""
    return svc.tokens.verify(session_token(request))


async def form(request: Request) -> dict[str, str]:
    """A url-encoded form's fields (first value of each); bigger forms than ours are refused."""
    body = await request.body()
    if len(body) > MAX_FORM_BYTES:
        raise PermissionDenied("form too large")
    return {k: v[0] for k, v in parse_qs(body.decode("utf-8", "replace")).items()}


def check_csrf(svc: ServiceSet, request: Request, fields: dict[str, str]) -> None:
    expected = csrf_token(svc, session_token(request))
    if not hmac.compare_digest(fields.get("csrf", ""), expected):
        raise PermissionDenied("missing or wrong CSRF token: reload the page and try again")


def new_login_csrf() -> str:
    return secrets.token_urlsafe(24)


def check_login_csrf(request: Request, fields: dict[str, str]) -> None:
    cookie = request.cookies.get(LOGIN_CSRF_COOKIE, "")
    if not cookie or not hmac.compare_digest(fields.get("csrf", ""), cookie):
        raise PermissionDenied("missing or wrong CSRF token: reload the sign-in page and try again")


def _secure(request: Request) -> bool:
    return (request.headers.get("x-forwarded-proto") or request.url.scheme) == "https"


def set_cookie(response: Response, request: Request, name: str, value: str, max_age: int, path: str) -> None:
    response.set_cookie(
        name, value, max_age=max_age, path=path, httponly=True, samesite="strict", secure=_secure(request)
    )
