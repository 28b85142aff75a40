"""The schema. Times are epoch seconds (float); statuses and priorities are small ints.

A batch row holds a submitted job definition once; a job row holds only what changes.
``job_counters`` keeps per (task, group, status) counts and vCPUs in step with every
transition, so summaries and limit checks never scan jobs.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    SmallInteger,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

# BigInteger primary keys that still autoincrement on SQLite.
BigId = BigInteger().with_variant(Integer(), "sqlite")

workspaces = Table(
    "workspaces",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("vcpu_limit", Integer),
    Column("limit_created_by", String(32)),
    Column("limit_updated_by", String(32)),
    Column("limit_created_at", Float),
    Column("limit_updated_at", Float),
    Column("retention_archive_after", Integer),
    Column("retention_delete_after", Integer),
    Column("retention_created_at", Float),
)

users = Table(
    "users",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("workspace_id", ForeignKey("workspaces.id"), nullable=False, index=True),
    Column("email", String(320), nullable=False),
    Column("full_name", String(200), nullable=False),
    Column("role", String(32), nullable=False),
    Column("created_at", Float, nullable=False),
    UniqueConstraint("workspace_id", "email"),
)

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("user_id", ForeignKey("users.id"), nullable=False, index=True),
    Column("key_hash", String(64), nullable=False, unique=True),
    Column("label", String(200)),
    Column("created_at", Float, nullable=False),
    Column("revoked", Boolean, nullable=False, default=False),
)

regions = Table(
    "regions",
    metadata,
    Column("workspace_id", ForeignKey("workspaces.id"), primary_key=True),
    Column("name", String(64), primary_key=True),
    Column("enabled", Boolean, nullable=False, default=True),
    Column("weight", Float, nullable=False, default=1.0),
    Column("architectures", JSON, nullable=False),
    Column("updated_by", String(32), nullable=False),
    Column("updated_at", Float, nullable=False),
)

projects = Table(
    "projects",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("workspace_id", ForeignKey("workspaces.id"), nullable=False),
    Column("name", String(500), nullable=False),
    Column("description", Text, nullable=False),
    Column("created_by", String(32), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("regions", JSON, nullable=False),
    Column("region_settings", JSON),
    Column("dimensions", JSON),
    Column("retention_archive_after", Integer),
    Column("retention_delete_after", Integer),
    Column("retention_created_at", Float),
    Index("ix_projects_workspace_created", "workspace_id", "created_at", "id"),
)

project_limits = Table(
    "project_limits",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("project_id", ForeignKey("projects.id"), nullable=False, index=True),
    Column("workspace_id", String(32), nullable=False),
    Column("vcpus", Integer, nullable=False),
    Column("modifier_role", String(32), nullable=False),
    Column("created_by", String(32), nullable=False),
    Column("updated_by", String(32), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    UniqueConstraint("project_id", "modifier_role"),
)

tasks = Table(
    "tasks",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("project_id", ForeignKey("projects.id"), nullable=False),
    Column("workspace_id", String(32), nullable=False),
    Column("name", String(500), nullable=False),
    Column("description", Text, nullable=False),
    Column("created_by", String(32), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("last_active_at", Float, nullable=False),
    Column("archived_at", Float),
    Column("deleted_at", Float),
    Column("lifecycle_status", String(16), nullable=False),
    Index("ix_tasks_project_created", "project_id", "created_at", "id"),
)

batches = Table(
    "batches",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("parent_job_id", String(64), nullable=False, unique=True),
    Column("task_id", ForeignKey("tasks.id"), nullable=False, index=True),
    Column("project_id", String(64), nullable=False),
    Column("workspace_id", String(32), nullable=False),
    Column("group_name", String(500), nullable=False),
    Column("batch_size", Integer, nullable=False),
    Column("created_by", String(32), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("region", String(64), nullable=False),
    Column("max_retries", Integer, nullable=False),
    Column("request", JSON, nullable=False),  # the echoed HTCJobSubmitRequest
    # Late materialization (store/materialize.py): job i of the batch has id first_job_id + i;
    # rows idx >= pending_from are not written yet and read as the batch's fresh jobs, with
    # status job_status and the scheduling fields below. NULL first_job_id: an older batch.
    Column("first_job_id", BigInteger),
    Column("pending_from", Integer),
    Column("job_status", SmallInteger),
    Column("architecture", String(16)),
    Column("priority", SmallInteger),
    Column("vcpus", Integer),
    Column("memory_mb", Integer),
    Index(
        "ix_batches_pending",
        "task_id",
        "id",
        sqlite_where=text("pending_from IS NOT NULL"),
        postgresql_where=text("pending_from IS NOT NULL"),
    ),
)

jobs = Table(
    "jobs",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("batch_id", ForeignKey("batches.id"), nullable=False),
    Column("idx", Integer, nullable=False),
    Column("task_id", String(64), nullable=False),
    Column("project_id", String(64), nullable=False),
    Column("group_name", String(500), nullable=False),
    Column("region", String(64), nullable=False),
    Column("architecture", String(16), nullable=False),
    Column("status", SmallInteger, nullable=False),
    Column("attempt", Integer, nullable=False, default=1),
    # Attempts that failed and count against retryStrategy.maxRetries. An attempt lost before
    # its process started (executor restart, lease expiry while RUNNABLE) does not count.
    Column("failed_attempts", Integer, nullable=False, default=0),
    # Attempts re-run after an infrastructure fault (an executor lost after the attempt may have
    # started); they spend no user retry, only settings.max_infrastructure_retries.
    Column("infra_retries", Integer, nullable=False, default=0, server_default="0"),
    Column("priority", SmallInteger, nullable=False),
    Column("vcpus", Integer, nullable=False),
    Column("memory_mb", Integer, nullable=False),
    Column("executor_id", String(128)),
    Column("lease_expires_at", Float),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("started_at", Float),
    Column("completed_at", Float),
    Column("exit_code", Integer),
    Column("failure_code", String(40)),
    Column("status_reason", Text),
    Column("cancelled", Boolean, nullable=False, default=False),
    UniqueConstraint("batch_id", "idx"),
    # On PostgreSQL (migration 0012) the status indexes are partial, so that a status change
    # past the queue writes no entry in them: the queue index holds queued jobs (0, 1), the
    # executor index held ones (2-4), ix_jobs_failed failed ones. Queries name the statuses as
    # literals, so the planner can prove they fall inside. SQLite keeps them whole (its planner
    # matches a partial index's condition only word for word).
    Index(
        "ix_jobs_queue",
        "status",
        "project_id",
        "priority",
        "id",
        postgresql_where=text("status IN (0, 1)"),
    ),
    Index("ix_jobs_task", "task_id", "id"),
    Index("ix_jobs_task_group", "task_id", "group_name", "id"),
    # The dashboard's failure code filter; jobs that never failed stay out of the index.
    Index(
        "ix_jobs_task_failure",
        "task_id",
        "failure_code",
        "id",
        sqlite_where=text("failure_code IS NOT NULL"),
        postgresql_where=text("failure_code IS NOT NULL"),
    ),
    # Only jobs held by an executor are looked up by executor; queued ones stay out of the index.
    Index(
        "ix_jobs_executor",
        "executor_id",
        "status",
        sqlite_where=text("executor_id IS NOT NULL"),
        postgresql_where=text("status IN (2, 3, 4)"),
    ),
    # PostgreSQL only (migration 0012): the job list's filter on status FAILED.
    Index("ix_jobs_failed", "project_id", "id", postgresql_where=text("status = 6")),
    # Room on each page for a row's next version (migration 0022; docs/performance.md).
    postgresql_with={"fillfactor": 50},
)

# A row with job_id set belongs to one job. A row with job_id NULL belongs to every job of
# batch_id: the submission events, which all jobs of a batch share, are written once per batch
# instead of once per job (two rows per job made up a quarter of a million-job submit).
job_events = Table(
    "job_events",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("job_id", BigInteger),
    Column("batch_id", BigInteger),
    Column("attempt", Integer, nullable=False),
    Column("status", SmallInteger, nullable=False),
    Column("at", Float, nullable=False),
    Column("reason", Text),
    Column("exit_code", Integer),
    Column("executor_id", String(128)),
    Column("cancelled", Boolean, nullable=False, default=False),
    Index("ix_job_events_job", "job_id", "id"),
    Index(
        "ix_job_events_batch",
        "batch_id",
        "id",
        sqlite_where=text("job_id IS NULL"),
        postgresql_where=text("job_id IS NULL"),
    ),
)

job_counters = Table(
    "job_counters",
    metadata,
    Column("task_id", String(64), primary_key=True),
    Column("group_name", String(500), primary_key=True),
    Column("status", SmallInteger, primary_key=True),
    Column("project_id", String(64), nullable=False),
    Column("count", BigInteger, nullable=False, default=0),
    Column("vcpus", BigInteger, nullable=False, default=0),
    Index("ix_job_counters_project_status", "project_id", "status"),
)

# The dashboard's last hour (domain/throughput.py), shared by every server and kept across
# restarts: per (minute since the epoch, project), what its flushes tallied, by bucket: 0 jobs
# that succeeded, 1 that failed, 2 + i first attempts whose queue wait fell in histogram bin i.
# Upserted (added to) by each status flush; rows older than the hour are pruned.
throughput_minutes = Table(
    "throughput_minutes",
    metadata,
    Column("minute", BigInteger, primary_key=True),
    Column("project_id", String(64), primary_key=True),
    Column("bucket", SmallInteger, primary_key=True),
    Column("count", BigInteger, nullable=False),
)

executors = Table(
    "executors",
    metadata,
    Column("id", String(128), primary_key=True),
    Column("region", String(64), nullable=False),
    Column("incarnation", String(64), nullable=False),
    Column("architectures", JSON, nullable=False),
    Column("vcpus", Integer, nullable=False),
    Column("memory_mb", BigInteger, nullable=False),
    Column("last_heartbeat", Float, nullable=False),
    Column("version", String(64), nullable=True),  # the openhtc version the executor runs
    Column("host", String(255), nullable=True),  # the host name it runs on
    Column("kind", String(16), nullable=True),  # "agent" (htc agent over HTTP); NULL: embedded
    Column("labels", JSON, nullable=True),  # an agent's labels (k=v)
    Column("runtime", String(32), nullable=True),  # the runtime an agent runs jobs with
    Column("lost_at", Float, nullable=True),  # an agent marked lost (liveness): re-register first
    # the sha256 of the agent token an agent registered with: only that token speaks for it
    Column("token_hash", String(64), nullable=True, index=True),
    Column("draining", Boolean, nullable=True),  # the agent said it stops: no new jobs for it
)

# Container repositories created through the API (POST …/container-registry/repo/{name}).
# Pushed images are read from the registry itself; this records who made a repository first.
repositories = Table(
    "repositories",
    metadata,
    Column("project_id", ForeignKey("projects.id"), primary_key=True),
    Column("name", String(255), primary_key=True),
    Column("workspace_id", String(32), nullable=False),
    Column("created_by", String(32), nullable=False),
    Column("created_at", Float, nullable=False),
)

# Secrets every server of an installation must share (several servers on one PostgreSQL): the
# JWT signing key, the registry token key. Created once by the first server to start.
shared_secrets = Table(
    "shared_secrets",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("value", Text, nullable=False),
    Column("created_at", Float, nullable=False),
)

# Function tasks (services/functions.py): one row per call of a function batch, its event (JSON
# text) written with the batch, its result or error by the executor's report. ``result_key``:
# a result over function_result_max_bytes, in task storage under that key instead.
function_calls = Table(
    "function_calls",
    metadata,
    Column("batch_id", BigInteger, primary_key=True),
    Column("idx", Integer, primary_key=True),
    Column("event", Text, nullable=False),
    Column("result", Text),
    Column("error", Text),
    Column("result_key", Text),
    Column("attempt", Integer),
)

# Allocation queues (issue 17): each submits pilot jobs running `htc agent` to a batch system
# (Slurm) for one region, within its limits (domain/allocation.py; docs/allocation.md).
alloc_queues = Table(
    "alloc_queues",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("kind", String(16), nullable=False),  # "slurm"
    Column("region", String(64), nullable=False),
    Column("time_limit_s", Integer, nullable=False),
    Column("max_pilots", Integer, nullable=False),
    Column("backlog", Integer, nullable=False),
    Column("pilot_vcpus", Integer, nullable=False),
    Column("idle_timeout_s", Integer, nullable=False),
    Column("extra_args", JSON, nullable=False),  # extra sbatch arguments
    Column("state", String(16), nullable=False),  # active | paused
    Column("pause_reason", Text, nullable=True),
    Column("failed_submissions", Integer, nullable=False, default=0),
    Column("failed_starts", Integer, nullable=False, default=0),
    Column("created_at", Float, nullable=False),
)

# One row per pilot a queue submitted; kept after it ended (its state then "ended").
pilots = Table(
    "pilots",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("queue_id", String(32), nullable=False),
    Column("batch_job_id", String(64), nullable=False),  # Slurm's job id
    Column("state", String(16), nullable=False),  # domain/allocation.py: PilotState
    Column("submitted_at", Float, nullable=False),
    Column("started_at", Float, nullable=True),
    Column("ends_at", Float, nullable=True),  # its walltime's end, once running
    Column("ended_at", Float, nullable=True),
    Column("agent_id", String(128), nullable=True),  # its agent, once that registered
    Column("last_busy_at", Float, nullable=True),  # when its agent last held a job (or started)
    Column("detail", Text, nullable=True),  # why it ended, when known
    Index("ix_pilots_queue_state", "queue_id", "state"),
)

# Job logs in the database (log_store = "database": several servers, one log wherever its chunks
# arrived): an attempt's log as the chunks of whole lines an agent shipped, each at its byte
# offset; ``end_offset`` = byte_offset + its length. Keyed as the log files are (services/logs.py).
log_chunks = Table(
    "log_chunks",
    metadata,
    Column("task_id", String(64), primary_key=True),
    Column("parent_job_id", String(64), primary_key=True),
    Column("idx", Integer, primary_key=True),
    Column("attempt", Integer, primary_key=True),
    Column("byte_offset", BigInteger, primary_key=True),
    Column("end_offset", BigInteger, nullable=False),
    Column("data", LargeBinary, nullable=False),
)
