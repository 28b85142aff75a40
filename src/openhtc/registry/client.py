"""The server's own HTTP client for the registry API (catalog, tags, manifests).

Each call carries a token the server mints for itself with exactly the access it needs: the
registry matches ``access`` entries by exact repository name, so there is no wildcard token.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from urllib.parse import parse_qs, urlsplit

import httpx

from openhtc.domain.errors import NotFound
from openhtc.registry.tokens import Access, IssuedToken

PAGE = 1000
MANIFEST_TYPES = ", ".join(
    (
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    )
)
CATALOG = Access("registry", "catalog", ("*",))


class RegistryUnavailable(NotFound):
    """The container registry is not available."""

    error = "REGISTRY_UNAVAILABLE"


class RegistryClient:
    def __init__(self, base_url: Callable[[], str], mint: Callable[[Sequence[Access]], IssuedToken]) -> None:
        self._base_url = base_url
        self._mint = mint
        self._http = httpx.Client(timeout=httpx.Timeout(10.0, connect=2.0))

    def close(self) -> None:
        self._http.close()

    def _request(
        self,
        method: str,
        path: str,
        access: Sequence[Access],
        params: dict[str, str] | None = None,
        accept: str | None = None,
    ) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self._mint(access).token}"}
        if accept:
            headers["Accept"] = accept
        try:
            resp = self._http.request(method, self._base_url() + path, headers=headers, params=params)
        except httpx.HTTPError as exc:
            raise RegistryUnavailable(f"the container registry does not answer ({exc})") from None
        if resp.status_code >= 500 or resp.status_code in (401, 403):
            raise RegistryUnavailable(
                f"the container registry refused {method} {path}: HTTP {resp.status_code} {resp.text[:200]}"
            )
        return resp

    def _pages(self, path: str, key: str, access: Sequence[Access], last: str | None) -> Iterator[str]:
        """Follow the registry's ``n``/``last`` pagination (the ``Link`` header carries ``last``)."""
        while True:
            params = {"n": str(PAGE)}
            if last:
                params["last"] = last
            resp = self._request("GET", path, access, params=params)
            if resp.status_code == 404:
                return
            if resp.status_code != 200:
                raise RegistryUnavailable(f"GET {path}: HTTP {resp.status_code} {resp.text[:200]}")
            items = resp.json().get(key) or []
            yield from items
            link = resp.headers.get("link", "")
            if not items or not link:
                return
            target = link.split(";", 1)[0].strip().strip("<>")
            last = (parse_qs(urlsplit(target).query).get("last") or [items[-1]])[0]

    def repositories(self, prefix: str) -> list[str]:
        """Repository names starting with ``prefix`` (``{projectId}/``), in name order.

        The catalog is sorted, so the walk starts just before the prefix and stops after it.
        """
        out: list[str] = []
        for name in self._pages("/v2/_catalog", "repositories", [CATALOG], prefix):
            if not name.startswith(prefix):
                if name > prefix:
                    break
                continue
            out.append(name)
        return out

    def tags(self, repository: str) -> list[str]:
        pull = [Access("repository", repository, ("pull",))]
        return sorted(self._pages(f"/v2/{repository}/tags/list", "tags", pull, None))

    def manifest_exists(self, repository: str, reference: str) -> bool:
        pull = [Access("repository", repository, ("pull",))]
        path = f"/v2/{repository}/manifests/{reference}"
        resp = self._request("HEAD", path, pull, accept=MANIFEST_TYPES)
        if resp.status_code == 200:
            return True
        if resp.status_code == 404:
            return False
        raise RegistryUnavailable(f"HEAD {path}: HTTP {resp.status_code}")
