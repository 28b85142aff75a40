"""Settings: one explicit object, loaded once at the edge (CLI) and passed down. No module globals."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

RuntimeName = Literal["auto", "bwrap", "podman", "process", "noop"]
StorageBackend = Literal["local", "s3", "seaweedfs"]
JobNetworkMode = Literal["none", "openhtc", "full"]


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return Path(base) / "openhtc"


class Settings(BaseSettings):
    """Server settings. Every field can be set as ``OPENHTC_<NAME>`` in the environment."""

    model_config = SettingsConfigDict(env_prefix="OPENHTC_", extra="forbid")

    data_dir: Path = Field(default_factory=default_data_dir, description="State directory: DB, keys, logs.")
    host: str = Field("127.0.0.1", description="Address the HTTP API binds to.")
    port: int = Field(8080, description="Port the HTTP API binds to.")
    database_url: str | None = Field(
        None, description="SQLAlchemy URL; postgresql://… for PostgreSQL. Default: SQLite in data_dir."
    )
    runtime: RuntimeName = Field(
        "auto",
        description="How the local executor runs jobs: 'bwrap' (bubblewrap over a cached rootfs), "
        "'podman' (full OCI via podman and runc), 'process' (host processes, no isolation; "
        "development only), 'noop' (finishes every job at once; control-plane benchmarks). "
        "'auto' picks bwrap, then podman, and refuses to start if neither is installed.",
    )
    region: str = Field(
        "AWS_US_EAST_1",
        description="Name of the local region. A Rescale region name so every client accepts it; "
        "in openhtc it means 'the executors of this installation', not a cloud region.",
    )
    executor: bool = Field(True, description="Run the embedded local executor in the server process.")
    executor_vcpus: int | None = Field(None, description="vCPUs the local executor offers (default: CPUs).")
    executor_memory_mb: int | None = Field(
        None, description="Memory the local executor offers (default: RAM)."
    )
    executor_prefetch: int | None = Field(
        None,
        description="Jobs an executor holds RUNNABLE beyond what runs, to hide claim latency "
        "(default: adaptive, see executor_prefetch_seconds).",
    )
    executor_prefetch_seconds: float = Field(
        0.25, description="Adaptive prefetch holds about this many seconds of work at the observed job rate."
    )
    executor_prefetch_max: int = Field(
        4096, ge=1, description="The most jobs the adaptive prefetch holds (htc agent: 256)."
    )
    executor_journal_sync: bool = Field(
        True,
        description="Make the executor's attempt journal tell recovery which attempts may have run "
        "even after a power loss (a server crash alone needs nothing): the embedded executor records "
        "the machine's boot in it (after a machine crash every job it held may have started); htc "
        "agent fdatasyncs it before each hand-off.",
    )
    executor_adopt_seconds: float = Field(
        600.0,
        ge=0,
        description="How long the process runtime's job launchers keep a crashed server's running "
        "jobs (their logs and exit codes) for the next start of the server to take back; after "
        "that they kill them. 0: jobs die with the server and are recovered as before. On PostgreSQL "
        "capped at lease_seconds - 2 x heartbeat_seconds (another server may expire the leases).",
    )
    executor_stop_grace_seconds: float = Field(
        0.0,
        ge=0,
        description="On a clean stop (SIGTERM), how long the executor lets running jobs finish "
        "before it kills them (a killed job fails with ErrorInfrastructureFault). Jobs not "
        "started yet are taken back either way and re-queued free at the next start.",
    )
    max_running_jobs: int = Field(256, description="Upper bound on jobs one local executor runs at once.")
    image_cache_gib: float = Field(
        10.0,
        description="bwrap runtime: size of the unpacked-image cache in the work directory; least "
        "recently used images beyond it are removed (never one in use).",
    )
    function_result_max_bytes: int = Field(
        256 * 1024,
        gt=0,
        description="A function call's result up to this size is kept in the database; a larger "
        "one goes to the task's storage (docs/functions.md).",
    )
    function_worker_idle_seconds: float = Field(
        60.0,
        gt=0,
        description="A warm function worker with no call for this long exits (docs/functions.md).",
    )
    function_worker_window: int | None = Field(
        None,
        ge=2,
        le=1024,
        description="Function calls an executor slot queues in its warm worker at once (written "
        "to it a chunk at a time); unset: about 20 ms of calls at the observed rate, 2 to 64 "
        "(docs/functions.md).",
    )
    max_log_bytes_per_job: int = Field(
        100 * 1024 * 1024,
        gt=0,
        description="Output one job attempt may write to its log; past it the rest is discarded "
        "and one truncation marker line is written (the job runs on).",
    )
    log_store: Literal["files", "database"] = Field(
        "files",
        description="Where the job logs that agents ship are kept: 'files' (this server's data "
        "directory) or 'database' (readable through every server on one PostgreSQL; see "
        "docs/deployment.md).",
    )
    job_network: JobNetworkMode = Field(
        "openhtc",
        description="What container jobs (bwrap, podman) can reach: 'openhtc' (the API and the "
        "S3 endpoint if given by IPv4 address, nothing else), 'none' (no network: only their "
        "own loopback), 'full' (the host's network). true/false mean full/none.",
    )
    lease_seconds: float = Field(
        60.0, description="An executor that misses heartbeats this long loses its jobs."
    )
    heartbeat_seconds: float = Field(5.0, description="How often executors renew their leases.")
    agent_liveness_seconds: float = Field(
        30.0,
        gt=0,
        description="An `htc agent` silent this long is lost: its jobs are recovered (infrastructure "
        "retry). Not before this long after the server hears from any agent again.",
    )
    agent_poll_seconds: float = Field(
        20.0, ge=0, description="The longest the server holds an idle agent's exchange (long poll)."
    )
    alloc_period_seconds: float = Field(
        5.0, gt=0, description="How often the leader looks at allocation queues (Slurm pilots)."
    )
    alloc_server_url: str | None = Field(
        None, description="The URL pilots' agents call this server at (default: http://HOST:PORT)."
    )
    alloc_agent_command: str = Field(
        "htc agent",
        description="What a pilot runs (on the batch system's node), before its --server, --region, "
        "--vcpus, --labels and --work-dir: e.g. '/opt/openhtc/bin/htc agent --runtime podman'.",
    )
    alloc_sbatch_options: str = Field(
        "",
        description="Comma list of sbatch options (long names, e.g. '--nodes-per-gpu,--signal') an "
        "allocation queue may pass besides the allowed ones (docs/allocation.md, 'Extra sbatch arguments').",
    )
    alloc_start_timeout_seconds: float = Field(
        300.0,
        gt=0,
        description="A pilot running this long whose agent has not called the server is cancelled "
        "(a failed start: it would hold its node until its walltime).",
    )
    installation_admin_workspace: str | None = Field(
        None,
        description="The workspace (id or name) whose administrators are the installation's: they alone "
        "add, pause, resume and remove allocation queues. Default: the first workspace (the first start's).",
    )
    max_infrastructure_retries: int = Field(
        3,
        ge=0,
        description="Re-runs a job gets when its executor is lost after its attempt may have "
        "started (restart, lease expiry); they spend no retry of its retryStrategy. Past them the "
        "job fails with ErrorInfrastructureFault. 0: fail at the first such loss (at most once).",
    )
    token_ttl_seconds: int = Field(21600, description="Lifetime of bearer tokens (6 h, as Rescale).")
    refresh_token_ttl_seconds: int = Field(14 * 86400, description="Lifetime of job refresh tokens.")
    admission_chunk: int = Field(5000, description="Jobs admitted per scheduler transaction.")
    materialize_chunk: int = Field(
        20000,
        gt=0,
        description="Job rows a submit writes before it answers; the rest of a larger submit is "
        "written as the queue needs them, this many rows per transaction.",
    )
    log_level: str = Field("info", description="Server log level.")
    planner_statistics_seconds: float = Field(
        2.0,
        ge=0,
        description="PostgreSQL: how often the leader looks for tables grown or changed enough"
        " to analyse again (a stale row count makes the planner scan whole tables); 0: never.",
    )
    retention_sweep_seconds: float = Field(
        300.0, gt=0, description="How often task retention policies are applied (archive, delete)."
    )

    # -- request limits (400 or 413 naming the limit; see docs/configuration.md#limits) ---------
    max_request_bytes: int = Field(64 * 1024 * 1024, gt=0, description="Largest JSON request body (413).")
    max_string_chars: int = Field(
        1024 * 1024, gt=0, description="Longest string anywhere in a JSON request body."
    )
    max_name_chars: int = Field(
        500, gt=0, le=500, description="Longest name: project, task, job, group, image, env name."
    )
    max_description_chars: int = Field(65536, gt=0, description="Longest project or task description.")
    max_command_bytes: int = Field(
        1024 * 1024, gt=0, description="Most bytes of one job's commands and envs together."
    )
    max_envs_per_job: int = Field(1000, gt=0, description="Most envs (and most tags) of one job definition.")
    max_requests_per_call: int = Field(
        1000, gt=0, description="Most HTCJobSubmitRequests in one submit call."
    )
    max_live_subscriptions: int = Field(
        2000, gt=0, description="Most open long polls and event streams (/openhtc/v1); past it: 503."
    )

    signing_key_file: Path | None = Field(
        None,
        description="PEM file of the RS256 key that signs tokens (created if missing). Default: "
        "DATA_DIR/keys/jwt-signing.pem with SQLite; with PostgreSQL, one key kept in the database "
        "and shared by every server on it.",
    )

    # -- container registry ------------------------------------------------------------------
    registry_url: str | None = Field(
        None,
        description="Cluster mode: URL of an external CNCF distribution registry whose token auth "
        "points at this server. Default: start and supervise docker-registry on loopback.",
    )
    registry_port: int | None = Field(None, description="Port of the embedded registry (default: free).")
    registry_binary: str = Field("docker-registry", description="The CNCF distribution registry binary.")
    registry_public_host: str | None = Field(
        None,
        description="host[:port] users tag and push images to (projects' containerRegistry). "
        "Default: the registry's own address (embedded: 127.0.0.1:PORT).",
    )

    # -- storage -------------------------------------------------------------------------------
    storage: StorageBackend = Field(
        "local",
        description="Project and task storage: 'local' (files under data_dir), 's3' (any "
        "S3-compatible store, see s3_*), 'seaweedfs' (start and supervise a SeaweedFS S3 server).",
    )
    s3_endpoint: str | None = Field(None, description="S3 endpoint URL; None means AWS.")
    s3_bucket: str | None = Field(None, description="Bucket holding projects/{p}/shared and tasks.")
    s3_access_key: str | None = Field(None, description="Access key openhtc uses and assumes the role with.")
    s3_secret_key: str | None = Field(None, description="Secret key for s3_access_key.")
    s3_role_arn: str | None = Field(None, description="Role assumed through STS to mint scoped tokens.")
    s3_region: str = Field("us-east-1", description="Signing region of the S3 endpoint.")
    storage_token_ttl_seconds: int = Field(3600, description="Lifetime of storage tokens.")
    presigned_url_ttl_seconds: int = Field(3600, description="Lifetime of presigned upload URLs.")

    @field_validator("job_network", mode="before")
    @classmethod
    def _job_network_bool(cls, value: object) -> object:
        """The old boolean setting: true was the host's network, false none."""
        if isinstance(value, bool):
            return "full" if value else "none"
        if isinstance(value, str):
            lowered = value.strip().lower()
            old = {"true": "full", "1": "full", "yes": "full", "false": "none", "0": "none", "no": "none"}
            return old.get(lowered, lowered)
        return value

    @property
    def sqlite_path(self) -> Path:
        return self.data_dir / "openhtc.db"

    def resolved_database_url(self) -> str:
        url = self.database_url or f"sqlite:///{self.sqlite_path}"
        if url.startswith("postgresql://") or url.startswith("postgres://"):
            url = "postgresql+psycopg://" + url.split("://", 1)[1]
        return url
