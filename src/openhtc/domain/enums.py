"""Enumerations of the wire contract, with the compact codes the store keeps."""

from __future__ import annotations

import enum
from enum import StrEnum


class JobStatus(enum.IntEnum):
    """The seven canonical job statuses, in lifecycle order; the int is the stored code."""

    SUBMITTED_TO_RESCALE = 0  # accepted; held while over a vCPU limit
    SUBMITTED_TO_PROVIDER = 1  # admitted; queued for an executor in its region
    RUNNABLE = 2  # matched to capacity on an executor
    STARTING = 3  # image pull / sandbox set-up
    RUNNING = 4  # the job's process is running
    SUCCEEDED = 5  # terminal
    FAILED = 6  # terminal; carries failureCode, container.exitCode, statusReason

    @property
    def terminal(self) -> bool:
        return self >= JobStatus.SUCCEEDED


ACTIVE_STATUSES = (JobStatus.RUNNABLE, JobStatus.STARTING, JobStatus.RUNNING)
# Statuses whose vCPUs count against project and workspace limits.
LIMITED_STATUSES = (JobStatus.SUBMITTED_TO_PROVIDER, *ACTIVE_STATUSES)
NON_TERMINAL_STATUSES = tuple(s for s in JobStatus if not s.terminal)
STATUS_NAMES = tuple(s.name for s in JobStatus)


class Priority(enum.IntEnum):
    """Job priority; the lower code is scheduled first, so queue indexes run in ascending order."""

    ON_DEMAND_PRIORITY = 0
    ON_DEMAND_ECONOMY = 1


class Architecture(StrEnum):
    AARCH64 = "AARCH64"
    X86 = "X86"
    A100 = "A100"


class FailureCode(StrEnum):
    ErrorUnknownFailure = "ErrorUnknownFailure"
    ErrorTimeout = "ErrorTimeout"
    ErrorNotEnoughMemory = "ErrorNotEnoughMemory"
    ErrorNonZeroContainerExitCode = "ErrorNonZeroContainerExitCode"
    ErrorCostExceeded = "ErrorCostExceeded"
    ErrorInfrastructureFault = "ErrorInfrastructureFault"
    ErrorInstanceTermination = "ErrorInstanceTermination"
    ErrorStartingContainer = "ErrorStartingContainer"
    ErrorProviderDown = "ErrorProviderDown"
    ErrorProviderRegionDown = "ErrorProviderRegionDown"
    ErrorFunction = "ErrorFunction"  # openhtc: a function task's handler raised (docs/functions.md)


class Role(StrEnum):
    WORKSPACE_ADMIN = "WORKSPACE_ADMIN"
    PROJECT_ADMIN = "PROJECT_ADMIN"
    MEMBER = "MEMBER"


class LifecycleStatus(StrEnum):
    ACTIVE = "ACTIVE"
    ARCHIVED = "ARCHIVED"
    DELETED = "DELETED"


RESCALE_REGIONS = (
    "AWS_AP_SOUTHEAST_1", "AWS_CA_CENTRAL_1", "AWS_EU_NORTH_1", "AWS_EU_CENTRAL_1", "AWS_EU_WEST_1",
    "AWS_EU_WEST_2", "AWS_EU_WEST_3", "AWS_SA_EAST_1", "AWS_US_EAST_1", "AWS_US_EAST_2", "AWS_US_WEST_2",
    "GCP_ASIA_SOUTHEAST_1", "GCP_US_CENTRAL_1", "GCP_US_EAST_1", "GCP_US_EAST_2", "GCP_US_EAST_4",
    "GCP_US_WEST_1", "GCP_US_WEST_4", "GCP_EU_WEST_1", "GCP_EU_WEST_2", "GCP_EU_WEST_3", "GCP_EU_WEST_4",
    "GCP_CA_CENTRAL_1", "NGC_ENOCH_1", "AZURE_US_WEST_2", "AZURE_US_EAST_2", "AZURE_US_SOUTHCENTRAL",
    "AZURE_EU_NORTH", "RC_ICELAND_1", "COREWEAVE_US_EAST_4", "UNASSIGNED",
)  # fmt: skip
CLOUD_PROVIDERS = ("AWS", "GCP", "NGC", "AZURE", "RC", "COREWEAVE", "UNASSIGNED")


def cloud_provider_of(region: str) -> str:
    """The provider prefix of a Rescale region name (AWS_US_EAST_1 -> AWS)."""
    prefix = region.split("_", 1)[0]
    return prefix if prefix in CLOUD_PROVIDERS else "UNASSIGNED"
