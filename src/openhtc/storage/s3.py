"""S3 storage (AWS S3, SeaweedFS, MinIO, …) through boto3.

The server holds one identity (``s3_access_key``) that reads and writes the whole bucket, and
mints scoped credentials with STS AssumeRole on ``s3_role_arn`` and a session policy naming
exactly the prefixes of a :class:`~openhtc.storage.layout.Scope`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

from openhtc.domain.errors import NotFound
from openhtc.storage.base import Credentials, ObjectBody, ObjectInfo
from openhtc.storage.layout import Scope

CHUNK = 1 << 20
MULTIPART_BYTES = 8 << 20  # boto3's default multipart threshold
# STS refuses sessions shorter than 15 minutes or longer than 12 hours.
MIN_SESSION_SECONDS = 900
MAX_SESSION_SECONDS = 43200
_RW_ACTIONS = [
    "s3:GetObject",
    "s3:PutObject",
    "s3:DeleteObject",
    "s3:AbortMultipartUpload",
    "s3:ListMultipartUploadParts",
]


def session_policy(bucket: str, scope: Scope) -> dict[str, Any]:
    """An IAM policy allowing exactly ``scope``: objects under its prefixes, and listing with a
    ``Prefix`` inside them (the ``s3:prefix`` condition), nothing else in the bucket."""
    statements: list[dict[str, Any]] = []
    if scope.rw:
        statements.append(
            {
                "Effect": "Allow",
                "Action": _RW_ACTIONS,
                "Resource": [f"arn:aws:s3:::{bucket}/{p}*" for p in scope.rw],
            }
        )
    if scope.ro:
        statements.append(
            {
                "Effect": "Allow",
                "Action": ["s3:GetObject"],
                "Resource": [f"arn:aws:s3:::{bucket}/{p}*" for p in scope.ro],
            }
        )
    statements.append(
        {
            "Effect": "Allow",
            "Action": ["s3:ListBucket"],
            "Resource": [f"arn:aws:s3:::{bucket}"],
            "Condition": {"StringLike": {"s3:prefix": [f"{p}*" for p in (*scope.rw, *scope.ro)]}},
        }
    )
    return {"Version": "2012-10-17", "Statement": statements}


def session_name(text: str) -> str:
    """A RoleSessionName STS accepts: [\\w+=,.@-], 2 to 64 characters."""
    return (re.sub(r"[^\w+=,.@-]", "-", text) or "openhtc").ljust(2, "-")[:64]


class _S3Upload:
    """Bytes spool to a local file, uploaded (multipart when large) on commit."""

    def __init__(self, backend: S3Backend, key: str) -> None:
        self.backend = backend
        self.key = key
        backend.spool_dir.mkdir(parents=True, exist_ok=True)
        fd, self.tmp = tempfile.mkstemp(dir=backend.spool_dir, prefix="upload-")
        self.fh = os.fdopen(fd, "wb")
        self.size = 0

    def write(self, data: bytes) -> None:
        self.fh.write(data)
        self.size += len(data)

    def commit(self) -> int:
        self.fh.close()
        try:
            self.backend.put_file(self.key, self.tmp)
        finally:
            self.abort()
        return self.size

    def abort(self) -> None:
        self.fh.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.tmp)


class S3Backend:
    provider = "AWS"

    def __init__(
        self,
        *,
        endpoint: str | None,
        bucket: str,
        access_key: str | None,
        secret_key: str | None,
        role_arn: str,
        region: str,
        spool_dir: Path,
    ) -> None:
        self.endpoint = endpoint
        self.bucket = bucket
        self.storage_name = bucket
        self.role_arn = role_arn
        self.region = region
        self.spool_dir = spool_dir
        session = boto3.session.Session(
            aws_access_key_id=access_key, aws_secret_access_key=secret_key, region_name=region
        )
        config = Config(
            s3={"addressing_style": "path" if endpoint else "auto"},
            signature_version="s3v4",
            retries={"max_attempts": 3, "mode": "standard"},
            max_pool_connections=32,
        )
        self.s3 = session.client("s3", endpoint_url=endpoint, config=config)
        self.sts = session.client("sts", endpoint_url=endpoint, config=Config(retries={"max_attempts": 3}))

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def open(self) -> None:
        try:
            self.s3.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            if _code(exc) not in ("404", "NoSuchBucket", "NotFound"):
                raise
            kwargs: dict[str, Any] = {"Bucket": self.bucket}
            if self.endpoint is None and self.region != "us-east-1":
                kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
            self.s3.create_bucket(**kwargs)

    # -- objects --------------------------------------------------------------------------------

    def begin_put(self, key: str) -> _S3Upload:
        return _S3Upload(self, key)

    def put_file(self, key: str, path: str) -> None:
        if os.path.getsize(path) < MULTIPART_BYTES:
            # One request; upload_file would set up a transfer manager and threads per call.
            with open(path, "rb") as body:
                self.s3.put_object(Bucket=self.bucket, Key=key, Body=body)
        else:
            self.s3.upload_file(path, self.bucket, key)  # multipart, parts in parallel

    def get(self, key: str) -> ObjectBody:
        try:
            resp = self.s3.get_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if _code(exc) in ("NoSuchKey", "404"):
                raise NotFound(f"no object {key}") from None
            raise
        body = resp["Body"]
        return ObjectBody(int(resp["ContentLength"]), body.iter_chunks(CHUNK), [body])

    def download(self, key: str, path: str) -> None:
        self.s3.download_file(self.bucket, key, path)

    def list(self, prefix: str, after: str | None, limit: int) -> list[ObjectInfo]:
        out: list[ObjectInfo] = []
        start = after or ""
        while len(out) < limit:
            resp = self.s3.list_objects_v2(
                Bucket=self.bucket, Prefix=prefix, StartAfter=start, MaxKeys=min(1000, limit - len(out))
            )
            contents = resp.get("Contents", [])
            out.extend(ObjectInfo(o["Key"], int(o["Size"]), o["LastModified"].timestamp()) for o in contents)
            if not resp.get("IsTruncated") or not contents:
                break
            start = contents[-1]["Key"]
        return out

    def delete(self, key: str) -> None:
        self.s3.delete_object(Bucket=self.bucket, Key=key)

    def delete_prefix(self, prefix: str) -> int:
        deleted = 0
        while True:
            # Always list from the start: what was deleted is gone, so this terminates.
            batch = self.list(prefix, None, 1000)
            if not batch:
                return deleted
            self.s3.delete_objects(
                Bucket=self.bucket, Delete={"Objects": [{"Key": o.key} for o in batch], "Quiet": True}
            )
            deleted += len(batch)

    # -- access ---------------------------------------------------------------------------------

    def presign_put(self, key: str, ttl: int, api_url: str) -> tuple[str, float]:
        url = self.s3.generate_presigned_url(
            "put_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=ttl
        )
        return str(url), time.time() + ttl

    def credentials(self, scope: Scope, ttl: int, session: str, api_url: str) -> Credentials:
        resp = self.sts.assume_role(
            RoleArn=self.role_arn,
            RoleSessionName=session_name(session),
            DurationSeconds=max(MIN_SESSION_SECONDS, min(MAX_SESSION_SECONDS, ttl)),
            Policy=json.dumps(session_policy(self.bucket, scope), separators=(",", ":")),
        )
        creds = resp["Credentials"]
        values = {
            "AWS_ACCESS_KEY_ID": creds["AccessKeyId"],
            "AWS_SECRET_ACCESS_KEY": creds["SecretAccessKey"],
            "AWS_SESSION_TOKEN": creds["SessionToken"],
        }
        if self.endpoint:  # not AWS: tell aws-cli and boto3 where the store is
            values["AWS_ENDPOINT_URL"] = self.endpoint
            values["AWS_DEFAULT_REGION"] = self.region
        return Credentials(values, creds["Expiration"].timestamp())


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))
