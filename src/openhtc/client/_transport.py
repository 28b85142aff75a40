"""Connection to an HTC server: base URL, credentials, bearer tokens, JSON requests, pagination."""

from __future__ import annotations

import base64
import binascii
import json
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import quote

import httpx

from openhtc import __version__
from openhtc.client._config import load_credentials
from openhtc.client._errors import CredentialsError, HtcConnectionError, HtcError, error_from_response

__all__ = [
    "API_PREFIX",
    "DEFAULT_URL",
    "ENV_API_KEY",
    "ENV_API_URL",
    "ENV_BEARER_TOKEN",
    "ENV_REFRESH_TOKEN",
    "ENV_URL",
    "REAUTH_MARGIN_SECONDS",
    "Closeable",
    "Connection",
    "Credentials",
    "jwt_claims",
    "normalize_base_url",
    "resolve_credentials",
    "segment",
]

DEFAULT_URL = "http://127.0.0.1:8080"
API_PREFIX = "/api/v1"
REAUTH_MARGIN_SECONDS = 600.0
"""Get a new bearer token when less than this remains (or half the token's lifetime, if shorter)."""

ENV_URL = "OPENHTC_URL"
ENV_API_KEY = "OPENHTC_API_KEY"
ENV_API_URL = "OPENHTC_API_URL"  # injected into jobs by the executor
ENV_BEARER_TOKEN = "RESCALE_HTC_BEARER_TOKEN"  # injected into jobs
ENV_REFRESH_TOKEN = "RESCALE_HTC_REFRESH_TOKEN"  # injected into jobs

ParamValue = str | int | float | bool | Sequence[str] | None
Params = Mapping[str, ParamValue]


def normalize_base_url(url: str) -> str:
    """``host:8080``, ``http://host:8080/`` and ``http://host:8080/api/v1`` all become
    ``http://host:8080/api/v1`` (the server answers under both; Rescale only under ``/api/v1``)."""
    url = url.strip().rstrip("/")
    if not url:
        raise ValueError("empty server URL")
    if "://" not in url:
        url = f"http://{url}"
    if not url.endswith(API_PREFIX):
        url += API_PREFIX
    return url


def segment(value: str | int) -> str:
    """Quote one path segment (job IDs keep their ``:``)."""
    return quote(str(value), safe=":@")


def jwt_claims(token: str) -> dict[str, Any]:
    """The payload of a JWT, decoded without verifying the signature; {} if it is not a JWT."""
    parts = token.split(".")
    if len(parts) != 3:
        return {}
    payload = parts[1] + "=" * (-len(parts[1]) % 4)
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload))
    except (ValueError, binascii.Error):
        return {}
    return claims if isinstance(claims, dict) else {}


@dataclass(frozen=True)
class Credentials:
    """Where to connect and how to authenticate. ``source`` says where the secret came from."""

    url: str
    api_key: str | None = None
    refresh_token: str | None = None
    bearer_token: str | None = None
    source: str = "none"


def resolve_credentials(
    url: str | None = None,
    api_key: str | None = None,
    *,
    refresh_token: str | None = None,
    bearer_token: str | None = None,
    env: Mapping[str, str] | None = None,
    config_path: Path | None = None,
    use_config: bool = True,
) -> Credentials:
    """Resolve the server URL and credentials.

    URL: ``url`` > ``$OPENHTC_URL`` > ``$OPENHTC_API_URL`` > the ``htc login`` file > ``DEFAULT_URL``.

    Secret: explicit arguments > ``$OPENHTC_API_KEY`` > in-job ``$RESCALE_HTC_REFRESH_TOKEN`` /
    ``$RESCALE_HTC_BEARER_TOKEN`` > the ``htc login`` file. The file's key is only used for the
    server it was stored for, so pointing the client at another server never leaks it.
    """
    env = os.environ if env is None else env
    chosen_url = url or env.get(ENV_URL) or env.get(ENV_API_URL) or None
    stored = load_credentials(config_path) if use_config else None

    if api_key or refresh_token or bearer_token:
        secret = Credentials("", api_key, refresh_token, bearer_token, source="explicit")
    elif env.get(ENV_API_KEY):
        secret = Credentials("", api_key=env[ENV_API_KEY], source=f"${ENV_API_KEY}")
    elif env.get(ENV_REFRESH_TOKEN) or env.get(ENV_BEARER_TOKEN):
        secret = Credentials(
            "",
            refresh_token=env.get(ENV_REFRESH_TOKEN) or None,
            bearer_token=env.get(ENV_BEARER_TOKEN) or None,
            source="job environment",
        )
    elif stored is not None and (
        chosen_url is None or normalize_base_url(chosen_url) == normalize_base_url(stored.url)
    ):
        secret = Credentials("", api_key=stored.api_key, source="credentials file")
    else:
        secret = Credentials("")

    final_url = chosen_url or (stored.url if stored is not None else None) or DEFAULT_URL
    return Credentials(
        url=normalize_base_url(final_url),
        api_key=secret.api_key,
        refresh_token=secret.refresh_token,
        bearer_token=secret.bearer_token,
        source=secret.source,
    )


def _clean_params(params: Params | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in (params or {}).items():
        if value is None:
            continue
        if isinstance(value, bool):
            out[key] = "true" if value else "false"
        elif isinstance(value, str | int | float):
            out[key] = value
        else:
            out[key] = list(value)
    return out


def _decode(response: httpx.Response) -> Any:
    if not response.content:
        return None
    try:
        return response.json()
    except ValueError as exc:
        raise HtcError(
            f"expected JSON from {response.request.method} {response.request.url}, "
            f"got {response.headers.get('content-type', 'no content type')}",
            status_code=response.status_code,
            response=response,
        ) from exc


class Closeable:
    """A context manager for an object holding connections: ``with`` closes it on the way out."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class Connection(Closeable):
    """An authenticated link to one HTC server.

    Holds an ``httpx.Client`` and one credential: an API key or a refresh token (exchanged at
    ``GET /auth/token`` for a bearer JWT, renewed when less than ``REAUTH_MARGIN_SECONDS``
    remain), or a bearer token used as given. Use :meth:`from_env` to resolve credentials from
    the arguments, the environment and the ``htc login`` file. Close it, or use it as a
    context manager.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        api_key: str | None = None,
        refresh_token: str | None = None,
        bearer_token: str | None = None,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
        verify: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.base_url = normalize_base_url(url or DEFAULT_URL)
        self.timeout = timeout  # a request's, unless it says otherwise
        self.api_key = api_key or None
        self.refresh_token = refresh_token or None
        self._clock = clock
        self._lock = threading.Lock()
        self._token: str | None = None
        self._renew_at: float | None = None
        if bearer_token:
            self._set_token(bearer_token, None)
        self._client = httpx.Client(
            timeout=timeout,
            transport=transport,
            verify=verify,
            headers={"User-Agent": f"openhtc-client/{__version__}", "Accept": "application/json"},
        )
        origin = httpx.URL(self.base_url)
        self._origin = (origin.scheme, origin.host, origin.port)
        # False once the server answered that it has no /openhtc/v1 routes (client/live.py)
        self.live_supported = True

    @classmethod
    def from_env(
        cls,
        url: str | None = None,
        api_key: str | None = None,
        *,
        refresh_token: str | None = None,
        bearer_token: str | None = None,
        env: Mapping[str, str] | None = None,
        config_path: Path | None = None,
        **kwargs: Any,
    ) -> Connection:
        """Connect with credentials resolved by :func:`resolve_credentials`."""
        creds = resolve_credentials(
            url,
            api_key,
            refresh_token=refresh_token,
            bearer_token=bearer_token,
            env=env,
            config_path=config_path,
        )
        return cls.from_credentials(creds, **kwargs)

    @classmethod
    def from_credentials(cls, creds: Credentials, **kwargs: Any) -> Connection:
        return cls(
            creds.url,
            api_key=creds.api_key,
            refresh_token=creds.refresh_token,
            bearer_token=creds.bearer_token,
            **kwargs,
        )

    # -- lifecycle -------------------------------------------------------------------------

    def close(self) -> None:
        self._client.close()

    def __repr__(self) -> str:
        return f"Connection({self.base_url!r})"

    # -- tokens ----------------------------------------------------------------------------

    @property
    def can_renew(self) -> bool:
        """True when a new bearer token can be obtained (an API key or refresh token is held)."""
        return self.api_key is not None or self.refresh_token is not None

    def token_auth_header(self) -> str:
        """The ``Authorization`` value for ``GET /auth/token``: ``Token <key>`` or ``Refresh <token>``."""
        if self.api_key:
            return f"Token {self.api_key}"
        if self.refresh_token:
            return f"Refresh {self.refresh_token}"
        raise CredentialsError()

    def _set_token(self, token: str, expires_in: float | None) -> None:
        now = self._clock()
        if expires_in is None:
            claims = jwt_claims(token)
            exp, iat = claims.get("exp"), claims.get("iat")
            if isinstance(exp, int | float):
                expires_in = exp - now
                lifetime = exp - iat if isinstance(iat, int | float) else expires_in
            else:
                lifetime = None
        else:
            lifetime = expires_in
        self._token = token
        if expires_in is None or lifetime is None:
            self._renew_at = None
        else:
            margin = min(REAUTH_MARGIN_SECONDS, max(lifetime, 0.0) / 2)
            self._renew_at = now + expires_in - margin

    def _needs_renewal(self) -> bool:
        return self._token is None or (self._renew_at is not None and self._clock() >= self._renew_at)

    def fetch_token(self, authorization: str | None = None) -> dict[str, Any]:
        """``GET /auth/token`` with ``Token``/``Refresh`` auth; returns ``{tokenValue, expiresIn}``."""
        header = authorization or self.token_auth_header()
        body = _decode(self.request("GET", "/auth/token", headers={"Authorization": header}, auth=False))
        if not isinstance(body, dict) or not isinstance(body.get("tokenValue"), str):
            raise HtcError("malformed /auth/token response: no tokenValue")
        return body

    def bearer_token(self, *, force: bool = False) -> str:
        """A valid bearer token, obtaining or renewing one as needed."""
        with self._lock:
            if (force or self._needs_renewal()) and self.can_renew:
                body = self.fetch_token()
                expires_in = body.get("expiresIn")
                self._set_token(
                    body["tokenValue"], float(expires_in) if isinstance(expires_in, int | float) else None
                )
            if self._token is None:
                raise CredentialsError(
                    f"no credentials for {self.base_url}: pass an API key, set {ENV_API_KEY}, "
                    "or run `htc login`"
                )
            return self._token

    # -- requests --------------------------------------------------------------------------

    def url_for(self, path: str) -> str:
        """Absolute URL for a path relative to the base URL (absolute URLs pass through)."""
        if path.startswith(("http://", "https://")):
            return path
        return f"{self.base_url}/{path.lstrip('/')}"

    @property
    def http(self) -> httpx.Client:
        """The underlying httpx client (streams use it directly)."""
        return self._client

    def _send(
        self,
        method: str,
        url: str,
        params: dict[str, Any] | None,
        json_body: Any,
        headers: dict[str, str],
        timeout: float | None = None,
    ) -> httpx.Response:
        try:
            return self._client.request(
                method,
                url,
                params=params or None,
                json=json_body,
                headers=headers,
                timeout=timeout if timeout is not None else httpx.USE_CLIENT_DEFAULT,
            )
        except (httpx.TransportError, httpx.InvalidURL) as exc:
            raise HtcConnectionError(f"cannot reach {self.base_url}: {exc or type(exc).__name__}") from exc

    def request(
        self,
        method: str,
        path: str,
        *,
        params: Params | None = None,
        json: Any = None,
        headers: Mapping[str, str] | None = None,
        auth: bool = True,
        timeout: float | None = None,
    ) -> httpx.Response:
        """Send a request; raise :class:`HtcError` (or a subclass) on any status >= 400.

        With ``auth`` the bearer token is attached; a 401 is retried once with a fresh token
        when one can be obtained. ``timeout``: this request's, instead of the connection's.
        """
        url = self.url_for(path)
        query = _clean_params(params)
        hdrs = dict(headers or {})
        if auth and "Authorization" not in hdrs:
            hdrs["Authorization"] = f"Bearer {self.bearer_token()}"
        response = self._send(method, url, query, json, hdrs, timeout)
        if response.status_code == 401 and auth and "Authorization" not in (headers or {}) and self.can_renew:
            hdrs["Authorization"] = f"Bearer {self.bearer_token(force=True)}"
            response = self._send(method, url, query, json, hdrs, timeout)
        if response.status_code >= 400:
            raise error_from_response(response)
        return response

    def call(
        self, method: str, path: str, json: Any = None, params: Params | None = None, **kwargs: Any
    ) -> Any:
        """Send a request (see :meth:`request`) and decode the JSON body (None when it is empty)."""
        return _decode(self.request(method, path, params=params, json=json, **kwargs))

    def get(self, path: str, params: Params | None = None, **kwargs: Any) -> Any:
        """GET and decode the JSON body (None when the body is empty)."""
        return self.call("GET", path, None, params, **kwargs)

    def get_text(self, path: str, params: Params | None = None, **kwargs: Any) -> str:
        return self.request("GET", path, params=params, **kwargs).text

    def post(self, path: str, json: Any = None, params: Params | None = None, **kwargs: Any) -> Any:
        return self.call("POST", path, json, params, **kwargs)

    def put(self, path: str, json: Any = None, params: Params | None = None, **kwargs: Any) -> Any:
        return self.call("PUT", path, json, params, **kwargs)

    def patch(self, path: str, json: Any = None, params: Params | None = None, **kwargs: Any) -> Any:
        return self.call("PATCH", path, json, params, **kwargs)

    def delete(self, path: str, params: Params | None = None, **kwargs: Any) -> Any:
        return self.call("DELETE", path, None, params, **kwargs)

    # -- pagination ------------------------------------------------------------------------

    def _next_url(self, first_url: str, next_url: str) -> str:
        """Follow ``next`` verbatim on our own origin. A ``next`` naming another origin (a server
        behind a proxy that does not know its public address) is rebased: its query string
        (which carries ``pageIndex``) is applied to the URL we started from, so credentials
        never travel to a host we were not given."""
        target = httpx.URL(first_url).join(next_url)
        if (target.scheme, target.host, target.port) == self._origin:
            return str(target)
        return str(httpx.URL(first_url).copy_with(query=target.query))

    def iter_items(
        self, path: str, params: Params | None = None, *, max_items: int | None = None
    ) -> Iterator[Any]:
        """Yield the items of a list endpoint, following ``next`` until it is absent.

        Accepts the ``{items, next}`` envelope and bare JSON arrays. Stops after ``max_items``
        items, at a page without ``next``, or at an empty page.
        """
        if max_items is not None and max_items <= 0:
            return
        first_url = self.url_for(path)
        url, query = first_url, params
        seen: set[str] = set()
        count = 0
        while True:
            body = self.get(url, query)
            if isinstance(body, list):
                items, next_url = body, None
            elif isinstance(body, dict) and isinstance(body.get("items"), list):
                items, next_url = body["items"], body.get("next")
            else:
                raise HtcError(f"expected a list or an {{items, next}} page from {url}")
            for item in items:
                yield item
                count += 1
                if max_items is not None and count >= max_items:
                    return
            if not next_url or not items:
                return
            if not isinstance(next_url, str):
                raise HtcError(f"malformed 'next' in page from {url}: {next_url!r}")
            url, query = self._next_url(first_url, next_url), None
            if url in seen:
                raise HtcError(f"pagination loop: {url} returned twice as 'next'")
            seen.add(url)

    def get_list(self, path: str, params: Params | None = None, *, max_items: int | None = None) -> list[Any]:
        """All items of a list endpoint (see :meth:`iter_items`)."""
        return list(self.iter_items(path, params, max_items=max_items))
