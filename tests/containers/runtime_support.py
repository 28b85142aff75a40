"""Helpers for the runtime tests: a plain registry, images pushed to it, jobs run in-process.

The runtimes are driven directly (``runtime.run(launch, ...)``) against a real
``docker-registry`` without auth, real bubblewrap, podman and cgroups; ``StaticSource`` plays
the server's ImageSource, pointing every project at that registry.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import subprocess
import tarfile
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from openhtc.domain.models import JobLaunch, Mount
from openhtc.runtimes.base import ImagePull, Outcome, RunHandle
from openhtc.testing.ci import IN_CI as IN_CI  # re-exported: test modules import these here
from openhtc.testing.ci import require_tools as require_tool  # noqa: F401
from openhtc.testing.images import busybox_rootfs_tar, find_busybox, podman_import
from openhtc.testing.postgres import free_port


class PlainRegistry:
    """``docker-registry serve`` on a free loopback port, filesystem storage, no auth."""

    def __init__(self, root: Path, extra_config: str = "") -> None:
        self.root = root
        self.extra_config = extra_config  # more YAML sections, e.g. ``auth:``
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.host}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> PlainRegistry:
        self.root.mkdir(parents=True, exist_ok=True)
        config = self.root / "config.yml"
        config.write_text(
            "version: 0.1\nlog: {level: warn}\n"
            f"storage:\n  filesystem: {{rootdirectory: {self.root / 'data'}}}\n  delete: {{enabled: true}}\n"
            f"http:\n  addr: {self.host}\n" + self.extra_config
        )
        with open(self.root / "registry.log", "wb") as log:
            self.proc = subprocess.Popen(["docker-registry", "serve", str(config)], stdout=log, stderr=log)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/v2/", timeout=1).status_code in (200, 401):
                    return self
            except httpx.HTTPError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"docker-registry did not start: {(self.root / 'registry.log').read_text()}")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)

    # -- pushing images ---------------------------------------------------------------------

    def push_busybox(self, tmp: Path, repository: str, changes: Iterable[str] = (), **files: bytes) -> None:
        """Build a busybox image with ``podman import`` and push it as ``repository`` (repo:tag)."""
        tar = busybox_rootfs_tar(tmp / f"rootfs-{abs(hash(repository))}.tar", extra_files=files or None)
        # a name of its own: podman's store is the host's, and two test processes pushing the
        # same repository at once would remove each other's image before its push (rmi below)
        name, _, tag = repository.replace("/", "-").partition(":")
        local = f"localhost/openhtc-test/{name}-{uuid.uuid4().hex[:8]}:{tag or 'latest'}"
        podman_import(tar, local, list(changes))
        try:
            pushed = subprocess.run(
                ["podman", "push", "--tls-verify=false", local, f"{self.host}/{repository}"],
                capture_output=True,
                text=True,
            )
            assert pushed.returncode == 0, f"podman push {local}: {pushed.stderr.strip()}"
        finally:  # the registry has it now; podman's own store need not keep it
            subprocess.run(["podman", "rmi", "-f", local], capture_output=True, check=False)

    def put_blob(self, repository: str, data: bytes) -> dict[str, Any]:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        start = httpx.post(f"{self.url}/v2/{repository}/blobs/uploads/", timeout=30)
        assert start.status_code == 202, start.text
        location = start.headers["location"]
        if location.startswith("/"):
            location = self.url + location
        sep = "&" if "?" in location else "?"  # keep the upload's _state parameters
        done = httpx.put(f"{location}{sep}digest={digest}", content=data, timeout=30)
        assert done.status_code == 201, done.text
        return {"digest": digest, "size": len(data)}

    def put_manifest(self, repository: str, reference: str, doc: dict[str, Any]) -> str:
        body = json.dumps(doc).encode()
        resp = httpx.put(
            f"{self.url}/v2/{repository}/manifests/{reference}",
            content=body,
            headers={"Content-Type": doc["mediaType"]},
            timeout=30,
        )
        assert resp.status_code == 201, resp.text
        return "sha256:" + hashlib.sha256(body).hexdigest()

    def push_layers(
        self,
        repository: str,
        tag: str,
        layers: list[bytes],
        config: dict[str, Any] | None = None,
        *,
        index: bool = False,
        docker: bool = False,
    ) -> str:
        """Push an image made of gzip-compressed ``layers`` (tar bytes); returns the tag's digest."""
        blobs = [self.put_blob(repository, gzip.compress(layer, mtime=0)) for layer in layers]
        image_config = {
            "architecture": "amd64",
            "os": "linux",
            "config": config or {},
            "rootfs": {
                "type": "layers",
                "diff_ids": ["sha256:" + hashlib.sha256(x).hexdigest() for x in layers],
            },
        }
        cfg = self.put_blob(repository, json.dumps(image_config).encode())
        if docker:
            types = ("application/vnd.docker.distribution.manifest.v2+json",
                     "application/vnd.docker.container.image.v1+json",
                     "application/vnd.docker.image.rootfs.diff.tar.gzip",
                     "application/vnd.docker.distribution.manifest.list.v2+json")  # fmt: skip
        else:
            types = ("application/vnd.oci.image.manifest.v1+json",
                     "application/vnd.oci.image.config.v1+json",
                     "application/vnd.oci.image.layer.v1.tar+gzip",
                     "application/vnd.oci.image.index.v1+json")  # fmt: skip
        manifest = {
            "schemaVersion": 2,
            "mediaType": types[0],
            "config": {"mediaType": types[1], **cfg},
            "layers": [{"mediaType": types[2], **blob} for blob in blobs],
        }
        if not index:
            return self.put_manifest(repository, tag, manifest)
        body = json.dumps(manifest).encode()
        digest = self.put_manifest(repository, "sha256:" + hashlib.sha256(body).hexdigest(), manifest)
        # An arm64 entry first, pointing at the same manifest: the client must pick amd64.
        entry = {"mediaType": types[0], "digest": digest, "size": len(body)}
        return self.put_manifest(
            repository,
            tag,
            {
                "schemaVersion": 2,
                "mediaType": types[3],
                "manifests": [
                    {**entry, "platform": {"os": "linux", "architecture": "arm64"}},
                    {**entry, "platform": {"os": "linux", "architecture": "amd64"}},
                ],
            },
        )


def tar_layer(*entries: tuple[str, str, bytes | str | None]) -> bytes:
    """A layer tarball from (kind, name, content) entries; kind is file, dir, symlink, link."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for kind, name, content in entries:
            info = tarfile.TarInfo(name)
            info.mtime = 1_700_000_000
            if kind == "file":
                data = content.encode() if isinstance(content, str) else (content or b"")
                info.size, info.mode = len(data), 0o755
                tar.addfile(info, io.BytesIO(data))
                continue
            if kind == "dir":
                info.type, info.mode = tarfile.DIRTYPE, 0o755
            elif kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, str(content)
            elif kind == "link":
                info.type, info.linkname = tarfile.LNKTYPE, str(content)
            elif kind == "chr":
                info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 3
            tar.addfile(info)
    return out.getvalue()


def busybox_layer() -> bytes:
    """The busybox rootfs as one layer (bin/busybox plus the applet symlinks)."""
    busybox = find_busybox()
    assert busybox is not None
    entries: list[tuple[str, str, bytes | str | None]] = [("dir", "bin", None)]
    entries.append(("file", "bin/busybox", Path(busybox).read_bytes()))
    for applet in ("sh", "cat", "ls", "echo", "test", "id", "sleep", "head", "dd", "true"):
        entries.append(("symlink", f"bin/{applet}", "busybox"))
    return tar_layer(*entries)


@dataclass
class StaticSource:
    """An ImageSource sending every project to one registry (repository = project/name)."""

    registry: PlainRegistry
    calls: int = 0

    def pull_access(self, project_id: str, image_name: str) -> ImagePull:
        self.calls += 1
        repo, _, tag = image_name.partition(":")
        repository = f"{project_id}/{repo}"
        return ImagePull(
            registry_url=self.registry.url,
            reference=f"{self.registry.host}/{repository}:{tag or 'latest'}",
            repository=repository,
            tag=tag or "latest",
            username="",
            password="",
            insecure=True,
        )


_JOB_IDS = iter(range(1, 1_000_000))


def launch(image: str, commands: Iterable[str] = (), **fields: Any) -> JobLaunch:
    """A JobLaunch for project 'proj' with small defaults; ``fields`` override."""
    job_id = fields.pop("job_id", next(_JOB_IDS) + os.getpid() % 1000 * 1000)
    values: dict[str, Any] = {
        "job_id": job_id,
        "attempt": 1,
        "job_uuid": f"parent{job_id}:0",
        "batch_id": 1,
        "array_index": 0,
        "project_id": "proj",
        "task_id": "task",
        "region": "AWS_US_EAST_1",
        "image": image,
        "commands": tuple(commands),
        "envs": (),
        "vcpus": 1,
        "memory_mb": 256,
        "disk_gib": 1,
        "timeout_s": 120,
        "working_dir": None,
        "mounts": (),
    }
    values.update(fields)
    if isinstance(values["envs"], dict):
        values["envs"] = tuple(values["envs"].items())
    if values["mounts"]:
        values["mounts"] = tuple(Mount(*m) for m in values["mounts"])
    return JobLaunch(**values)


@dataclass
class Ran:
    outcome: Outcome
    lines: list[str] = field(default_factory=list)
    running: bool = False

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


class _Log(io.StringIO):
    def __init__(self, sink: list[str]) -> None:
        super().__init__()
        self.sink = sink

    def close(self) -> None:
        self.sink.extend(line.split("\t", 1)[1] for line in self.getvalue().splitlines())
        super().close()


def run_job(runtime: Any, job: JobLaunch, handle: RunHandle | None = None) -> Ran:
    lines: list[str] = []
    ran = Ran(Outcome(None, None, ""), lines)

    def on_running() -> None:
        ran.running = True

    ran.outcome = runtime.run(job, handle or RunHandle(), lambda: _Log(lines), on_running)
    return ran


def pids_with_env(name: str, value: str) -> list[int]:
    needle = f"{name}={value}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/environ", "rb") as fh:
                    if needle in fh.read().split(b"\0"):
                        found.append(int(entry))
            except OSError:
                continue
    return found


def wait_for(predicate: Any, timeout: float = 30, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")
