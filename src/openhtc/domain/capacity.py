"""What the registered executors offer, and whether a job fits any of them (pure).

The API answers about capacity (submit validation, the dimensions route) from the executors
that registered and still heartbeat, not from the machine the API runs on: an executor on
another machine (``htc agent``) counts the same as the embedded one.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from openhtc.domain.enums import Architecture
from openhtc.domain.models import Capacity

_ARCHITECTURES = frozenset(a.value for a in Architecture)


@dataclass(frozen=True)
class ExecutorOffer:
    """One registered executor: where it runs, which architectures, how much in total."""

    region: str
    architectures: tuple[str, ...]
    capacity: Capacity


def offers_for(offers: Iterable[ExecutorOffer], region: str, architecture: str) -> list[Capacity]:
    """The capacities of the executors that can run a job of ``architecture`` in ``region``."""
    return [o.capacity for o in offers if o.region == region and architecture in o.architectures]


def why_not_fit(
    candidates: list[Capacity], region: str, vcpus: int, memory_mb: int
) -> tuple[str, str] | None:
    """None if one executor of ``candidates`` (those of ``region``) holds the job, or if there is
    none (the job waits for one to register); else (the field at fault, why it does not fit)."""
    if not candidates or any(c.fits(vcpus, memory_mb) for c in candidates):
        return None
    most_vcpus = max(c.vcpus for c in candidates)
    most_memory = max(c.memory_mb for c in candidates)
    if vcpus > most_vcpus:
        return "maxVCpus", f"{vcpus} exceeds the largest executor in {region} ({most_vcpus} vCPUs)"
    if memory_mb > most_memory:
        return "maxMemory", f"{memory_mb} MiB exceeds the largest executor in {region} ({most_memory} MiB)"
    return "maxVCpus", f"no executor in {region} offers both {vcpus} vCPUs and {memory_mb} MiB"


def region_architectures(
    configured: Sequence[str], offers: Iterable[ExecutorOffer], region: str
) -> list[str]:
    """The architectures a region offers: those its live executors serve, the configured ones
    (the server host's) first; while none is live there, the configured ones. Only the API's
    enum values are answered."""
    served: list[str] = []
    for offer in offers:
        if offer.region == region:
            served.extend(a for a in offer.architectures if a in _ARCHITECTURES and a not in served)
    if not served:
        return list(configured)
    return [a for a in configured if a in served] + sorted(a for a in served if a not in configured)


def largest_by_region(offers: Iterable[ExecutorOffer]) -> dict[tuple[str, str], Capacity]:
    """For each (region, architecture) served, its largest executor (most vCPUs, then memory)."""
    out: dict[tuple[str, str], Capacity] = {}
    for offer in offers:
        for arch in offer.architectures:
            key = (offer.region, arch)
            best = out.get(key)
            if best is None or _size(offer.capacity) > _size(best):
                out[key] = offer.capacity
    return out


def _size(capacity: Capacity) -> tuple[int, int]:
    return capacity.vcpus, capacity.memory_mb
