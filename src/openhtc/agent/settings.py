"""``htc agent``'s settings: every flag also an ``OPENHTC_AGENT_<NAME>`` environment variable."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from openhtc.config import RuntimeName


def default_work_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "openhtc-agent"


class AgentSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="OPENHTC_AGENT_", extra="forbid")

    server: str = Field(description="The openhtc server's URL, e.g. http://10.0.0.1:8080.")
    token: str = Field(description="An agent token (htc admin create-agent-token).")
    region: str = Field("AWS_US_EAST_1", description="The region this agent runs jobs of.")
    vcpus: int | None = Field(None, ge=1, description="vCPUs it offers (default: CPUs).")
    memory_mb: int | None = Field(None, ge=1, description="Memory it offers (default: RAM).")
    runtime: RuntimeName = Field("auto", description="bwrap, podman or process (as htc server --runtime).")
    work_dir: Path = Field(
        default_factory=default_work_dir, description="Journal, report buffer, logs, scratch."
    )
    labels: str = Field("", description="Labels the agent advertises: k=v,k2=v2.")
    drain_seconds: float = Field(
        86400.0,
        ge=0,
        description="At SIGTERM, how long running jobs may finish (a second SIGTERM kills them).",
    )
    max_running_jobs: int = Field(256, ge=1, description="Jobs it runs at once at most.")
    job_network: str = Field(
        "openhtc", description="What container jobs reach (as htc server --job-network)."
    )
    shared_ttl_seconds: float = Field(
        10.0,
        ge=0,
        description="How long a project's PROJECT_SHARED_FOLDER copy is used before it is synced again.",
    )
    max_buffered_reports: int = Field(
        100000, ge=100, description="Reports kept on disk while the server is away."
    )

    @field_validator("labels")
    @classmethod
    def _labels(cls, value: str) -> str:
        parse_labels(value)
        return value

    def label_map(self) -> dict[str, str]:
        return parse_labels(self.labels)

    @field_validator("server")
    @classmethod
    def _server_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("the server's URL starts with http:// or https://")
        return value.rstrip("/")


def parse_labels(value: str) -> dict[str, str]:
    """``"k=v,k2=v2"`` -> ``{"k": "v", "k2": "v2"}``."""
    pairs = [p.split("=", 1) for p in value.split(",") if p.strip()]
    if any(len(p) != 2 or not p[0].strip() for p in pairs):
        raise ValueError("labels are k=v pairs separated by commas")
    return {k.strip(): v.strip() for k, v in pairs}
