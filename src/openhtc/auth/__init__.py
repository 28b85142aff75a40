"""Authentication (API keys, RS256 JWTs) and authorization (roles, scopes)."""

from __future__ import annotations
