"""Test images built offline: a static busybox rootfs imported into podman.

No registry on the internet is reachable from CI, so test images are made from the host's
``busybox-static``: a tarball of a root filesystem holding ``/bin/busybox``, a symlink per
applet, the usual mount points and an ``/etc/passwd``, imported with ``podman import``.
``--change`` instructions set the OCI config (Entrypoint, Cmd, Env, WorkingDir, User).
"""

from __future__ import annotations

import io
import shutil
import subprocess
import tarfile
import time
from collections.abc import Sequence
from pathlib import Path

BUSYBOX_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox")
PASSWD = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/sh\n"
GROUP = "root:x:0:\nnogroup:x:65534:\n"


def find_busybox() -> str | None:
    """A statically linked busybox, or None (install the Debian package busybox-static)."""
    for path in BUSYBOX_CANDIDATES:
        if Path(path).exists():
            out = subprocess.run(["file", "-L", path], capture_output=True, text=True).stdout
            if "statically linked" in out or not shutil.which("file"):
                return path
    return None


def busybox_rootfs_tar(dest: Path, extra_files: dict[str, bytes] | None = None) -> Path:
    """Write a rootfs tarball with busybox, its applets and ``extra_files`` (path -> content)."""
    busybox = find_busybox()
    if busybox is None:
        raise RuntimeError("no static busybox found: apt-get install busybox-static")
    applets = subprocess.run([busybox, "--list"], capture_output=True, text=True, check=True).stdout.split()
    now = time.time()

    def add_dir(tar: tarfile.TarFile, name: str, mode: int = 0o755) -> None:
        info = tarfile.TarInfo(name)
        info.type, info.mode, info.mtime = tarfile.DIRTYPE, mode, now
        tar.addfile(info)

    def add_file(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = len(data), mode, now
        tar.addfile(info, io.BytesIO(data))

    with tarfile.open(dest, "w") as tar:
        for name in ("bin", "etc", "proc", "dev", "sys", "tmp", "root", "work", "usr", "usr/bin"):
            add_dir(tar, name, 0o1777 if name == "tmp" else 0o755)
        add_file(tar, "bin/busybox", Path(busybox).read_bytes(), 0o755)
        for applet in applets:
            if applet == "busybox":
                continue
            link = tarfile.TarInfo(f"bin/{applet}")
            link.type, link.linkname, link.mode, link.mtime = tarfile.SYMTYPE, "busybox", 0o777, now
            tar.addfile(link)
        add_file(tar, "etc/passwd", PASSWD.encode())
        add_file(tar, "etc/group", GROUP.encode())
        for name, data in (extra_files or {}).items():
            add_file(tar, name.lstrip("/"), data, 0o755)
    return dest


def podman_import(tarball: Path, name: str, changes: Sequence[str] = (), podman: str = "podman") -> str:
    """Import a rootfs tarball as image ``name`` (e.g. ``localhost/bb:1``); returns the image id.

    ``changes`` are Dockerfile instructions such as ``ENTRYPOINT ["/bin/sh","-c"]``,
    ``CMD ["echo hi"]``, ``ENV GREETING=hello``, ``WORKDIR /work`` or ``USER 65534``.
    """
    cmd = [podman, "import"]
    for change in changes:
        cmd += ["--change", change]
    cmd += [str(tarball), name]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()
    return out.splitlines()[-1] if out else name


def podman_push(
    local: str, remote: str, password: str, username: str = "AWS", podman: str = "podman"
) -> None:
    """Push ``local`` to ``remote`` (host:port/{projectId}/repo:tag) over plain HTTP with a token."""
    subprocess.run(
        [podman, "push", "--tls-verify=false", "--creds", f"{username}:{password}", local, remote],
        capture_output=True,
        text=True,
        check=True,
    )


# Not needed by a job's python3 and the bulk of the standard library's size.
STDLIB_SKIP = frozenset(
    {"test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3", "pydoc_data", "site-packages",
     "dist-packages", "venv"}
)  # fmt: skip


def python_rootfs_tar(
    dest: Path, extra_files: dict[str, bytes] | None = None, python: str = "/usr/bin/python3"
) -> Path:
    """A busybox rootfs plus the host's ``python`` (``/usr/bin/python3``, ``python``), its standard
    library and the shared libraries it and its extension modules load: a small python3 image
    made offline. ``/usr/bin/env`` is busybox, so ``#!/usr/bin/env python3`` scripts run."""
    info = subprocess.run(
        [python, "-c", "import sys, sysconfig; p = sysconfig.get_paths(); "
         "print(sys.executable); print(p['stdlib']); print(p['platstdlib']); print(sys.version_info[1])"],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    binary, stdlib, platstdlib, minor = Path(info[0]).resolve(), Path(info[1]), Path(info[2]), info[3]
    dynload = platstdlib / "lib-dynload"
    modules = sorted(p for p in dynload.glob("*.so") if "_test" not in p.name and "xx" not in p.name)
    libs: set[str] = set()
    for obj in [binary, *modules]:
        out = subprocess.run(["ldd", str(obj)], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            parts = line.split()
            if (
                "=>" in parts
                and len(parts) > parts.index("=>") + 1
                and parts[parts.index("=>") + 1].startswith("/")
            ):
                libs.add(parts[parts.index("=>") + 1])
            elif parts and parts[0].startswith("/"):
                libs.add(parts[0])  # the dynamic loader
    busybox_rootfs_tar(dest, extra_files)

    def skip(tarinfo: tarfile.TarInfo) -> tarfile.TarInfo | None:
        parts = Path(tarinfo.name).parts
        unneeded = STDLIB_SKIP.intersection(parts) or "config-3" in tarinfo.name or ".opt-" in tarinfo.name
        return None if unneeded else tarinfo

    with tarfile.open(dest, "a") as tar:
        existing = set(tar.getnames())

        def parents(name: str) -> None:
            for parent in reversed(Path(name).parents[:-1]):
                if str(parent) not in existing:
                    info = tarfile.TarInfo(str(parent))
                    info.type, info.mode = tarfile.DIRTYPE, 0o755
                    tar.addfile(info)
                    existing.add(str(parent))

        exe = f"usr/bin/python3.{minor}"
        parents(exe)
        tar.add(str(binary), exe)
        for alias in ("python3", "python"):
            link = tarfile.TarInfo(f"usr/bin/{alias}")
            link.type, link.linkname, link.mode = tarfile.SYMTYPE, f"python3.{minor}", 0o777
            tar.addfile(link)
        env = tarfile.TarInfo("usr/bin/env")
        env.type, env.linkname, env.mode = tarfile.SYMTYPE, "/bin/busybox", 0o777
        tar.addfile(env)
        target = f"usr/lib/python3.{minor}"
        parents(target)
        tar.add(str(stdlib), target, filter=skip)
        if not dynload.is_relative_to(stdlib):
            tar.add(str(dynload), f"{target}/lib-dynload", filter=skip)
        for lib in sorted(libs):
            name = lib.lstrip("/")
            parents(name)
            tar.add(str(Path(lib).resolve()), name)
    return dest
