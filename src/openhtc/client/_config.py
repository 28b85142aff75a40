"""The credentials file written by ``htc login`` and read by every client.

Location: ``$XDG_CONFIG_HOME/openhtc/credentials.json`` (default ``~/.config/openhtc/``), mode 0600.
Content: ``{"url": "<base URL>", "api_key": "<key>"}``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = ["StoredCredentials", "credentials_path", "load_credentials", "save_credentials"]


@dataclass(frozen=True)
class StoredCredentials:
    url: str
    api_key: str


def credentials_path(env: Mapping[str, str] | None = None) -> Path:
    """Where ``htc login`` keeps its credentials."""
    env = os.environ if env is None else env
    base = env.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "openhtc" / "credentials.json"


def load_credentials(path: Path | None = None) -> StoredCredentials | None:
    """Read the credentials file; None if it is absent, unreadable or malformed."""
    path = credentials_path() if path is None else path
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    url, api_key = data.get("url"), data.get("api_key")
    if not isinstance(url, str) or not isinstance(api_key, str) or not url or not api_key:
        return None
    return StoredCredentials(url=url, api_key=api_key)


def save_credentials(url: str, api_key: str, path: Path | None = None) -> Path:
    """Write the credentials file atomically with mode 0600 (its directory 0700); return its path."""
    path = credentials_path() if path is None else path
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump({"url": url, "api_key": api_key}, fh, indent=2)
            fh.write("\n")
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
