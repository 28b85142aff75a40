"""Building HTCJobSubmitRequest bodies."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["DEFAULT_IMAGE", "PRIORITIES", "env_pairs", "job_request", "normalize_priority"]

DEFAULT_IMAGE = "local/process:latest"
PRIORITIES = {"economy": "ON_DEMAND_ECONOMY", "priority": "ON_DEMAND_PRIORITY"}

EnvInput = Mapping[str, str] | Sequence[Mapping[str, str]]


def normalize_priority(value: str) -> str:
    """``economy``/``priority`` (any case) or the wire names ``ON_DEMAND_ECONOMY``/``ON_DEMAND_PRIORITY``."""
    lowered = value.strip().lower()
    if lowered in PRIORITIES:
        return PRIORITIES[lowered]
    upper = value.strip().upper()
    if upper in PRIORITIES.values():
        return upper
    raise ValueError(f"unknown priority {value!r}: use economy or priority")


def env_pairs(envs: EnvInput | None) -> list[dict[str, str]]:
    """``{"K": "V"}`` or ``[{"name": "K", "value": "V"}]`` → the wire list of name/value pairs."""
    if envs is None:
        return []
    if isinstance(envs, Mapping):
        return [{"name": str(k), "value": str(v)} for k, v in envs.items()]
    return [{"name": str(e["name"]), "value": str(e.get("value", ""))} for e in envs]


def job_request(
    image: str,
    commands: Sequence[str] | str,
    *,
    batch_size: int = 1,
    job_name: str | None = None,
    envs: EnvInput | None = None,
    max_vcpus: int = 1,
    max_memory: int = 4000,
    exec_timeout: int | None = None,
    retries: int = 0,
    priority: str | None = None,
    architecture: str | None = None,
    max_disk_gib: int | None = None,
    tags: Mapping[str, str] | None = None,
    regions: Sequence[str] | None = None,
) -> dict[str, Any]:
    """One HTCJobSubmitRequest: ``batch_size`` jobs sharing one definition.

    ``commands`` is an argv list; a string is run as ``sh -c <string>``. ``max_memory`` is in
    MiB, ``exec_timeout`` in seconds, ``priority`` is ``economy`` or ``priority``.
    """
    argv = ["sh", "-c", commands] if isinstance(commands, str) else [str(c) for c in commands]
    definition: dict[str, Any] = {
        "imageName": image,
        "commands": argv,
        "maxVCpus": max_vcpus,
        "maxMemory": max_memory,
    }
    if envs:
        definition["envs"] = env_pairs(envs)
    if exec_timeout is not None:
        definition["execTimeoutSeconds"] = exec_timeout
    if priority is not None:
        definition["priority"] = normalize_priority(priority)
    if architecture is not None:
        definition["architecture"] = architecture.upper()
    if max_disk_gib is not None:
        definition["maxDiskGiB"] = max_disk_gib
    if tags:
        definition["tags"] = dict(tags)
    request: dict[str, Any] = {
        "jobName": job_name or "openhtc-job",
        "batchSize": batch_size,
        "htcJobDefinition": definition,
    }
    if retries:
        request["retryStrategy"] = {"maxRetries": retries}
    if regions:
        request["regions"] = list(regions)
    return request
