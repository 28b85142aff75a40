"""``htc htcctl-bundle OUT``: ``htcctl`` as one executable file for images.

The file is a zipapp holding :mod:`openhtc.cli.htcctl` (which needs only Python's standard
library; source and bytecode) and a ``__main__`` calling it, run by ``/usr/bin/env python3``:
copy it into an image (see examples/Containerfile.htcctl) and jobs have ``htcctl`` without
installing openhtc.
"""

from __future__ import annotations

import py_compile
import shutil
import tempfile
import zipapp
from pathlib import Path
from typing import Annotated

import typer

from openhtc.cli import htcctl

__all__ = ["build_bundle", "htcctl_bundle"]

MAIN = "from htcctl import main\n\nmain()\n"


def build_bundle(out: Path) -> Path:
    """Write the zipapp to ``out`` (mode 0755) and return its path."""
    with tempfile.TemporaryDirectory(prefix="htcctl-bundle-") as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        shutil.copyfile(htcctl.__file__, src / "htcctl.py")
        # Compiled too, for the Python that builds the bundle: another version's zipimport finds
        # the wrong magic number and compiles the source instead (a few ms more per call).
        py_compile.compile(
            str(src / "htcctl.py"),
            cfile=str(src / "htcctl.pyc"),
            dfile="htcctl.py",
            doraise=True,
            invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH,
        )
        (src / "__main__.py").write_text(MAIN, encoding="utf-8")
        out.parent.mkdir(parents=True, exist_ok=True)
        zipapp.create_archive(src, out, interpreter="/usr/bin/env python3", compressed=True)
    out.chmod(0o755)
    return out


def htcctl_bundle(
    out: Annotated[Path, typer.Argument(help="Where to write the file (e.g. ./htcctl).")],
) -> None:
    """Write htcctl as one file that needs only python3 (for container images)."""
    path = build_bundle(out)
    print(f"{path}: htcctl for python3 >= 3.7, {path.stat().st_size} bytes")
