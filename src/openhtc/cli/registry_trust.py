"""``htc image trust``: let podman, buildah and skopeo use the embedded registry with no flags.

The embedded registry speaks plain HTTP on loopback. Docker treats ``127.0.0.0/8`` registries as
insecure by itself, so ``docker login``/``docker push`` work as Rescale's tutorial writes them;
the containers tools (podman, buildah, skopeo) want ``--tls-verify=false`` unless the registry
is marked insecure in registries.conf. This writes that entry once, as a drop-in file:
``/etc/containers/registries.conf.d/`` as root, else ``~/.config/containers/registries.conf.d/``
(or ``--file``, e.g. the file ``$CONTAINERS_REGISTRIES_CONF`` names).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

__all__ = ["default_dropin", "insecure_entry", "write_entry"]

MARK = "# openhtc: {host}"


def default_dropin(host: str, home: Path, is_root: bool) -> Path:
    base = Path("/etc/containers") if is_root else home / ".config" / "containers"
    return base / "registries.conf.d" / f"50-openhtc-{re.sub(r'[^A-Za-z0-9.-]', '-', host)}.conf"


def insecure_entry(host: str) -> str:
    return f'{MARK.format(host=host)}\n[[registry]]\nlocation = "{host}"\ninsecure = true\n'


def write_entry(path: Path, host: str) -> bool:
    """Add the entry for ``host`` to ``path`` (created if absent); False if it was there."""
    existing = path.read_text(encoding="utf-8") if path.exists() else ""
    if MARK.format(host=host) in existing:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    separator = "\n" if existing and not existing.endswith("\n\n") else ""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(existing + separator + insecure_entry(host), encoding="utf-8")
    tmp.replace(path)
    return True
