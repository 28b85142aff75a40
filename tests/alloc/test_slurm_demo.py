"""The documented sequence of docs/allocation.md, "Try it on one machine" (``make slurm-demo``:
examples/slurm-demo.sh), run as a user runs it, short: a private Slurm, a server, an allocation
queue, the demo sweep on pilots, then no pilot left in ``squeue`` or ``htc alloc ls``."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from openhtc.testing.ci import skip_or_fail
from openhtc.testing.server import htc_command
from openhtc.testing.slurm import missing_binaries

# one private Slurm at a time on a host (openhtc.testing.parallel): the pilot tests' group
pytestmark = [pytest.mark.timeout(300), pytest.mark.xdist_group("slurm")]
REPO = Path(__file__).resolve().parents[2]


def test_the_documented_slurm_demo_runs_the_sweep_on_pilots_and_leaves_none_behind() -> None:
    missing = missing_binaries()
    if missing:
        skip_or_fail(f"not installed: {', '.join(missing)} (apt-get install slurm-wlm munge)")
    if os.geteuid() != 0:
        skip_or_fail("the private Slurm runs its daemons as root")
    htc = shutil.which(htc_command()[0]) or htc_command()[0]
    # not under pytest's tmp dir: that is 0700, and munged (user munge) must reach its socket
    root = Path(tempfile.mkdtemp(prefix="openhtc-slurm-demo-"))
    root.chmod(0o755)
    try:
        env = {
            **os.environ,
            "SLURM_DEMO_DIR": str(root / "demo"),
            "HTC": htc,
            "JOBS": "4",
            "IDLE": "3s",
        }
        done = subprocess.run(
            ["bash", str(REPO / "examples" / "slurm-demo.sh")],
            env=env, capture_output=True, text=True, timeout=280, check=False,
        )  # fmt: skip
        out = done.stdout
        assert done.returncode == 0, out[-3000:] + done.stderr[-3000:]
        assert "All 4 job(s) succeeded" in out, out  # htc submit --wait's verdict
        after = out.split("squeue   (empty: no pilot remains)", 1)[1]
        assert after.splitlines()[1].split()[0] == "JOBID" and "openhtc-" not in after.split("==>")[0], after
        shown = after.split("htc alloc ls   (no live pilot)", 1)[1].split("==>")[0]
        assert "  0 pilots alive, " in shown and "alive, 0 ended" not in shown, shown
        assert "stopped; removed" in out
        # the private Slurm is gone: no daemon of it runs
        left = subprocess.run(["pgrep", "-f", str(root)], capture_output=True, text=True, check=False)
        assert left.stdout.strip() == "", left.stdout
    finally:
        shutil.rmtree(root, ignore_errors=True)
