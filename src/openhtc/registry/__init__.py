"""The per-project container registry: token service, embedded docker-registry, lookups."""

from __future__ import annotations

from openhtc.registry.client import RegistryUnavailable
from openhtc.registry.service import TOKEN_PATH, Registry

__all__ = ["TOKEN_PATH", "Registry", "RegistryUnavailable"]
