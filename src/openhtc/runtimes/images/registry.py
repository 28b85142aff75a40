"""Docker Registry HTTP API v2 client: resolve a tag, fetch verified blobs.

The ImagePull's password is already a registry token granting pull on the repository, so it is
sent as ``Authorization: Bearer``; a 401 means the registry refused it, and is reported as is
(with its ``Www-Authenticate`` challenge) rather than answered with another token round trip.
"""

from __future__ import annotations

import hashlib
import json
import platform
from dataclasses import dataclass
from typing import IO, Any

import httpx

from openhtc.runtimes.base import ImagePull
from openhtc.runtimes.images.oci import ImageError

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MANIFESTS = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEXES = (OCI_INDEX, DOCKER_LIST)
ACCEPT = ", ".join((*MANIFESTS, *INDEXES))
LAYER_TYPES = {
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
}


def host_platform() -> tuple[str, str]:
    """(os, architecture) as OCI indexes name them."""
    machine = platform.machine().lower()
    arch = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(machine, machine)
    return "linux", arch


@dataclass(frozen=True, slots=True)
class Descriptor:
    media_type: str
    digest: str
    size: int | None

    @classmethod
    def parse(cls, doc: dict[str, Any]) -> Descriptor:
        digest = doc.get("digest")
        if not isinstance(digest, str) or not digest.startswith("sha256:"):
            raise ImageError(f"unsupported digest {digest!r} (only sha256 is supported)")
        size = doc.get("size")
        return cls(str(doc.get("mediaType", "")), digest, int(size) if isinstance(size, int) else None)


@dataclass(frozen=True, slots=True)
class Manifest:
    """An image manifest for this host's platform."""

    digest: str  # what the tag pointed at (an index's digest when it was an index)
    config: Descriptor
    layers: tuple[Descriptor, ...]


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class RegistryClient:
    """Talks to one registry with one pull token."""

    def __init__(self, pull: ImagePull, timeout: float = 60.0) -> None:
        self.pull = pull
        headers = {"User-Agent": "openhtc"}
        if pull.password:
            headers["Authorization"] = f"Bearer {pull.password}"
        self.client = httpx.Client(
            base_url=pull.registry_url.rstrip("/"),
            headers=headers,
            timeout=timeout,
            follow_redirects=True,
            verify=not pull.insecure,
        )

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check(self, resp: httpx.Response, what: str) -> None:
        if resp.status_code == 200:
            return
        where = f"{self.pull.repository}:{self.pull.tag}"
        if resp.status_code == 401:
            challenge = resp.headers.get("www-authenticate", "")
            raise ImageError(f"the registry refused the pull token for {where} ({challenge or 'HTTP 401'})")
        if resp.status_code == 404:
            raise ImageError(f"{what} of {where} not found in the registry")
        raise ImageError(f"the registry answered HTTP {resp.status_code} for {what} of {where}")

    def _get(self, path: str, what: str, accept: str | None = None) -> httpx.Response:
        try:
            resp = self.client.get(path, headers={"Accept": accept} if accept else None)
        except httpx.HTTPError as exc:
            raise ImageError(f"cannot reach the registry at {self.pull.registry_url}: {exc}") from exc
        self._check(resp, what)
        return resp

    def head_digest(self) -> str | None:
        """The digest the tag points at now, from a HEAD request (None if not told)."""
        try:
            resp = self.client.head(
                f"/v2/{self.pull.repository}/manifests/{self.pull.tag}", headers={"Accept": ACCEPT}
            )
        except httpx.HTTPError as exc:
            raise ImageError(f"cannot reach the registry at {self.pull.registry_url}: {exc}") from exc
        self._check(resp, "the manifest")
        return resp.headers.get("docker-content-digest")

    def manifest(self) -> Manifest:
        """Resolve the tag to this platform's manifest (following an index), verifying digests."""
        reference = self.pull.tag
        resp = self._get(f"/v2/{self.pull.repository}/manifests/{reference}", "the manifest", ACCEPT)
        top_digest = self._verified(resp, reference)
        doc = self._json(resp.content)
        media = str(doc.get("mediaType") or resp.headers.get("content-type", "")).split(";")[0]
        if media in INDEXES or "manifests" in doc:
            chosen = self._choose(doc)
            resp = self._get(f"/v2/{self.pull.repository}/manifests/{chosen.digest}", "the manifest", ACCEPT)
            self._verified(resp, chosen.digest)
            doc = self._json(resp.content)
            media = str(doc.get("mediaType") or resp.headers.get("content-type", "")).split(";")[0]
        if media not in MANIFESTS and "layers" not in doc:
            raise ImageError(f"unsupported manifest type {media!r}")
        config = Descriptor.parse(doc.get("config") or {})
        layers = tuple(Descriptor.parse(layer) for layer in doc.get("layers") or ())
        for layer in layers:
            if layer.media_type and layer.media_type not in LAYER_TYPES:
                raise ImageError(f"unsupported layer type {layer.media_type!r} (gzip or plain tar only)")
        return Manifest(top_digest, config, layers)

    def _verified(self, resp: httpx.Response, reference: str) -> str:
        digest = sha256_digest(resp.content)
        if reference.startswith("sha256:") and digest != reference:
            raise ImageError(f"manifest {reference} does not match its content ({digest})")
        told = resp.headers.get("docker-content-digest")
        if told and told.startswith("sha256:") and told != digest:
            raise ImageError(f"the registry's digest {told} does not match the manifest ({digest})")
        return digest

    @staticmethod
    def _json(data: bytes) -> dict[str, Any]:
        try:
            doc = json.loads(data)
        except ValueError as exc:
            raise ImageError(f"the registry sent invalid JSON: {exc}") from exc
        if not isinstance(doc, dict):
            raise ImageError("the registry sent a manifest that is not a JSON object")
        return doc

    def _choose(self, index: dict[str, Any]) -> Descriptor:
        want_os, want_arch = host_platform()
        for item in index.get("manifests") or ():
            plat = item.get("platform") or {}
            if plat.get("os") == want_os and plat.get("architecture") == want_arch:
                return Descriptor.parse(item)
        raise ImageError(f"the image has no manifest for {want_os}/{want_arch}")

    def config(self, desc: Descriptor) -> dict[str, Any]:
        resp = self._get(f"/v2/{self.pull.repository}/blobs/{desc.digest}", "the image config")
        if sha256_digest(resp.content) != desc.digest:
            raise ImageError(f"the image config does not match its digest {desc.digest}")
        return self._json(resp.content)

    def blob_to(self, desc: Descriptor, out: IO[bytes]) -> None:
        """Stream a blob into ``out``, checking its size and digest."""
        hasher = hashlib.sha256()
        size = 0
        try:
            with self.client.stream("GET", f"/v2/{self.pull.repository}/blobs/{desc.digest}") as resp:
                self._check(resp, f"layer {desc.digest}")
                for chunk in resp.iter_bytes(1 << 20):
                    hasher.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
        except httpx.HTTPError as exc:
            raise ImageError(f"download of layer {desc.digest} failed: {exc}") from exc
        if desc.size is not None and size != desc.size:
            raise ImageError(f"layer {desc.digest} has {size} bytes, the manifest says {desc.size}")
        if "sha256:" + hasher.hexdigest() != desc.digest:
            raise ImageError(f"layer {desc.digest} does not match its digest")
