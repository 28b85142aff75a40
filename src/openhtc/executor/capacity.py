"""What the local machine offers."""

from __future__ import annotations

import os
import platform

from openhtc.config import Settings
from openhtc.domain.models import Capacity


def host_architecture() -> str:
    """This machine's architecture, as the API names it."""
    machine = platform.machine().lower()
    return "AARCH64" if machine in ("aarch64", "arm64") else "X86"


def machine_memory_mb() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1024 * 1024)
    except (ValueError, OSError):  # pragma: no cover - non-Linux
        return 4096


def local_capacity(settings: Settings) -> Capacity:
    return Capacity(
        vcpus=settings.executor_vcpus or os.cpu_count() or 1,
        memory_mb=settings.executor_memory_mb or machine_memory_mb(),
    )
