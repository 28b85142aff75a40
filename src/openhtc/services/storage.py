"""Project and task storage: scoped tokens, presigned uploads, the object API's access checks,
job credentials and freeing a deleted task's storage, over one backend (``openhtc.storage``).

Scopes (see ``Scope`` in ``storage.layout``):

- a user's project token: the project's shared folder, read-write;
- a user's task token: the task's folder and the project's shared folder, both read-write
  (users upload inputs with the same credentials they fetch outputs with);
- a job (job-scoped bearer): its own task's folder read-write, the shared folder read-only.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization

from openhtc.auth.permissions import check_project_scope, check_task_scope
from openhtc.auth.tokens import Principal, TokenService
from openhtc.config import Settings
from openhtc.domain.clock import Clock
from openhtc.domain.enums import LifecycleStatus
from openhtc.domain.errors import Conflict, NotFound, PermissionDenied, ValidationFailed
from openhtc.storage.base import Backend, Credentials
from openhtc.storage.layout import (
    Scope,
    clean_key,
    clean_relative,
    parse_layout,
    shared_prefix,
    task_prefix,
)
from openhtc.storage.local import LocalBackend, UrlSigner
from openhtc.storage.seaweedfs import SeaweedFS
from openhtc.storage.staging import BindStager, Stager, SyncStager
from openhtc.store.projects import ProjectStore

DEFAULT_SEAWEEDFS_BUCKET = "openhtc"


@dataclass(frozen=True, slots=True)
class StorageToken:
    """One StorageAccessToken before it is put on the wire."""

    project_id: str
    task_id: str | None
    user: str
    region: str
    storage_name: str
    provider: str
    shared_path: str
    task_path: str | None
    credentials: Credentials


def build_backend(settings: Settings, tokens: TokenService) -> Backend:
    if settings.storage == "local":
        return LocalBackend(settings.data_dir / "storage", tokens, UrlSigner(_url_secret(tokens)))
    from openhtc.storage.s3 import S3Backend

    bucket = settings.s3_bucket or (DEFAULT_SEAWEEDFS_BUCKET if settings.storage == "seaweedfs" else None)
    if not bucket:
        raise ValidationFailed("storage 's3' needs a bucket (--s3-bucket)", field="s3_bucket")
    if not settings.s3_role_arn:
        raise ValidationFailed(
            "storage 's3' needs a role to mint scoped tokens through STS (--s3-role-arn)", field="s3_role_arn"
        )
    if settings.storage == "seaweedfs" and not settings.s3_endpoint:
        raise ValidationFailed("storage 'seaweedfs' starts with the server (htc server)", field="storage")
    return S3Backend(
        endpoint=settings.s3_endpoint,
        bucket=bucket,
        access_key=settings.s3_access_key,
        secret_key=settings.s3_secret_key,
        role_arn=settings.s3_role_arn,
        region=settings.s3_region,
        spool_dir=settings.data_dir / "storage-spool",
    )


def start_managed_storage(settings: Settings) -> tuple[SeaweedFS | None, Settings]:
    """``--storage seaweedfs`` without an endpoint: start our own SeaweedFS under
    DATA_DIR/seaweedfs and return it with settings that point the S3 backend at it."""
    if settings.storage != "seaweedfs" or settings.s3_endpoint:
        return None, settings
    bucket = settings.s3_bucket or DEFAULT_SEAWEEDFS_BUCKET
    process = SeaweedFS(settings.data_dir / "seaweedfs", bucket)
    endpoint = process.start()
    return process, settings.model_copy(
        update={
            "s3_endpoint": endpoint.endpoint,
            "s3_bucket": bucket,
            "s3_access_key": endpoint.access_key,
            "s3_secret_key": endpoint.secret_key,
            "s3_role_arn": endpoint.role_arn,
            "s3_region": endpoint.region,
        }
    )


def _url_secret(tokens: TokenService) -> bytes:
    """The presigned-URL key, derived from the JWT signing key: replicas sharing one key agree."""
    der = tokens.key.private_key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return hashlib.sha256(b"openhtc presigned upload v1\0" + der).digest()


class StorageService:
    def __init__(
        self, settings: Settings, tokens: TokenService, projects: ProjectStore, clock: Clock
    ) -> None:
        self.settings = settings
        self.tokens = tokens
        self.projects = projects
        self.clock = clock
        self.region = settings.region
        self.signer = UrlSigner(_url_secret(tokens))
        self._backend: Backend | None = None
        self._lock = threading.Lock()

    @property
    def backend(self) -> Backend:
        """Built on first use, so commands that never touch storage need no store settings."""
        if self._backend is None:
            with self._lock:
                if self._backend is None:
                    self._backend = build_backend(self.settings, self.tokens)
        return self._backend

    def open(self) -> None:
        """At server start: the bucket (or directory) exists afterwards."""
        self.backend.open()

    def check_region(self, region: str | None) -> None:
        if region is not None and region != self.region:
            raise NotFound(f"no storage in region {region} (this installation's storage is in {self.region})")

    # -- tokens ---------------------------------------------------------------------------------

    def project_token(self, who: Principal, project: Any, api_url: str) -> StorageToken:
        scope = Scope.for_job_project(project.id) if who.is_job else Scope.for_user_project(project.id)
        return self._token(who, project.id, None, scope, api_url)

    def task_token(self, who: Principal, task: Any, api_url: str) -> StorageToken:
        if task.lifecycle_status == LifecycleStatus.DELETED.value:
            raise Conflict(f"task {task.id} is DELETED and its storage was freed")
        scope = (
            Scope.for_job(task.project_id, task.id)
            if who.is_job
            else Scope.for_user_task(task.project_id, task.id)
        )
        return self._token(who, task.project_id, task.id, scope, api_url)

    def _token(
        self, who: Principal, project_id: str, task_id: str | None, scope: Scope, api_url: str
    ) -> StorageToken:
        backend = self.backend
        session = f"{'job' if who.is_job else 'user'}-{who.user_id}-{(task_id or project_id)[:8]}"
        creds = backend.credentials(scope, self.settings.storage_token_ttl_seconds, session, api_url)
        return StorageToken(
            project_id=project_id,
            task_id=task_id,
            user=f"{who.workspace_id}:{who.user_id}",
            region=self.region,
            storage_name=backend.storage_name,
            provider=backend.provider,
            shared_path=backend.url(shared_prefix(project_id)),
            task_path=backend.url(task_prefix(project_id, task_id)) if task_id else None,
            credentials=creds,
        )

    def job_credentials(self, project_id: str, task_id: str, user_id: str) -> Credentials | None:
        """AWS_* credentials for every job of a batch on an S3 store (job scope); None on local,
        where jobs reach storage through their mounted folders and the token routes."""
        if self.settings.storage == "local":
            return None
        return self.backend.credentials(
            Scope.for_job(project_id, task_id),
            self.settings.storage_token_ttl_seconds,
            f"job-{user_id}-{task_id[:8]}",
            "",
        )

    # -- presigned uploads ----------------------------------------------------------------------

    def presigned_put(
        self, who: Principal, project_id: str, task: Any | None, file_path: str | None, api_url: str
    ) -> tuple[str, float]:
        relative = clean_relative(file_path, "filePath")
        if task is None:
            if who.is_job:
                raise PermissionDenied("a job's access to project shared storage is read-only")
            key = shared_prefix(project_id) + relative
        else:
            if task.lifecycle_status == LifecycleStatus.DELETED.value:
                raise Conflict(f"task {task.id} is DELETED and its storage was freed")
            key = task_prefix(project_id, task.id) + relative
        clean_key(key, "filePath")  # the whole key, prefix included, within MAX_KEY_BYTES
        return self.backend.presign_put(key, self.settings.presigned_url_ttl_seconds, api_url)

    def check_presigned(self, key: str, expires: str | None, signature: str | None) -> None:
        try:
            deadline = int(expires or "")
        except ValueError:
            raise PermissionDenied("not a valid presigned URL") from None
        if not signature or not self.signer.valid(key, deadline, signature):
            raise PermissionDenied("not a valid presigned URL")
        if deadline <= self.clock.now():
            raise PermissionDenied("this presigned URL has expired")

    # -- the object API -------------------------------------------------------------------------

    def access(self, token: str) -> Access:
        """What a bearer of ``token`` reaches: a storage token's scope, or (a normal API token)
        the same scopes the token routes would give its principal."""
        try:
            typ = jwt.decode(token, options={"verify_signature": False}).get("typ")
        except jwt.PyJWTError:
            typ = None
        if typ == "storage":
            claims = self.tokens.decode(token, "storage")
            return Access(self, Scope(tuple(claims.get("rw") or ()), tuple(claims.get("ro") or ())), None)
        return Access(self, None, self.tokens.verify(token))

    def scope_of(self, who: Principal, key: str) -> Scope:
        """The scope a principal's token routes would give for the folder holding ``key``."""
        where = parse_layout(key)
        if where is None:
            raise PermissionDenied(f"{key} is outside project and task storage")
        project_id, task_id = where
        try:
            check_project_scope(who, project_id)
            if task_id is not None:
                check_task_scope(who, project_id, task_id)
        except NotFound:
            raise PermissionDenied(f"{key} is outside your storage") from None
        if who.is_job:
            assert who.project_id and who.task_id
            if task_id is not None and self.task_gone(project_id, task_id):
                # a late output (an agent's upload after a cancel) must not bring it back
                return Scope(ro=(shared_prefix(who.project_id),))
            return Scope.for_job(who.project_id, who.task_id)
        if self.projects.get(who.workspace_id, project_id) is None:
            raise PermissionDenied(f"{key} is outside your storage")
        if task_id is None:
            return Scope.for_user_project(project_id)
        task = self.projects.task(project_id, task_id)
        if task is None:
            raise PermissionDenied(f"{key} is outside your storage")
        if task.lifecycle_status == LifecycleStatus.DELETED.value:
            return Scope(ro=(task_prefix(project_id, task_id),))
        return Scope.for_user_task(project_id, task_id)

    # -- lifecycle ------------------------------------------------------------------------------

    def delete_task(self, project_id: str, task_id: str) -> int:
        """Free a deleted task's storage; returns how many objects went."""
        return self.backend.delete_prefix(task_prefix(project_id, task_id))

    def task_gone(self, project_id: str, task_id: str) -> bool:
        task = self.projects.task(project_id, task_id)
        return task is None or task.lifecycle_status == LifecycleStatus.DELETED.value

    def stager(self) -> Stager:
        """The embedded executor's side: bind mounts on local storage, staging on S3."""
        if self.settings.storage == "local":
            return BindStager(self.settings.data_dir / "storage", self.task_gone)
        return SyncStager(self.backend, self.settings.data_dir / "storage-stage", self.task_gone)


class Access:
    """The object API's check for one request: a fixed scope, or one derived per key."""

    def __init__(self, service: StorageService, scope: Scope | None, who: Principal | None) -> None:
        self.service = service
        self.scope = scope
        self.who = who

    def _scope(self, key: str) -> Scope:
        if self.scope is not None:
            return self.scope
        assert self.who is not None
        return self.service.scope_of(self.who, key)

    def check_read(self, key: str) -> None:
        if not self._scope(key).can_read(key):
            raise PermissionDenied(f"your storage token does not reach {key}")

    def check_write(self, key: str) -> None:
        scope = self._scope(key)
        if not scope.can_write(key):
            if scope.can_read(key):
                raise PermissionDenied(f"your storage token may read {key} but not change it")
            raise PermissionDenied(f"your storage token does not reach {key}")

    def check_list(self, prefix: str) -> None:
        self.check_read(prefix)
