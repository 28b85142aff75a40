"""Runtimes turn a JobLaunch into a running process: process (dev only), noop (benchmarks)."""

from __future__ import annotations

from openhtc.runtimes.base import Outcome, RunHandle, Runtime
from openhtc.runtimes.noop import NoopRuntime
from openhtc.runtimes.process import ProcessRuntime

__all__ = ["NoopRuntime", "Outcome", "ProcessRuntime", "RunHandle", "Runtime", "build_runtime"]


def build_runtime(name: str, work_root: str) -> Runtime:
    if name == "process":
        return ProcessRuntime(work_root)
    if name == "noop":
        return NoopRuntime()
    raise ValueError(f"unknown runtime {name!r} (choose process or noop)")
