"""Storage backends (local directory, S3, SeaweedFS), the object layout, and staging a job's
folders. A regular package so the layer contracts (pyproject.toml) see it."""

from __future__ import annotations
