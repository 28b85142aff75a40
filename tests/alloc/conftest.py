"""A private single-node Slurm for the allocation tests (openhtc.testing.slurm: munged, slurmctld
and slurmd in a fresh directory, on free ports), and servers on PostgreSQL for them.

Needs root and Debian's slurm-wlm and munge (skipped locally without them; CI installs them).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from openhtc.testing.ci import skip_or_fail
from openhtc.testing.server import HtcServer
from openhtc.testing.slurm import PrivateSlurm, SlurmUnavailable, missing_binaries


@pytest.fixture(scope="module")
def slurm() -> Iterator[PrivateSlurm]:
    missing = missing_binaries()
    if missing:
        skip_or_fail(f"not installed: {', '.join(missing)} (apt-get install slurm-wlm munge)")
    # not under pytest's tmp dir: that is 0700, and munged (user munge) must reach its socket
    root = Path(tempfile.mkdtemp(prefix="openhtc-slurm-"))
    cluster = PrivateSlurm(root, cpus=4, memory=4000, cluster="openhtctest")
    try:
        try:
            cluster.start()
        except SlurmUnavailable as exc:
            skip_or_fail(str(exc))
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def pg_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., HtcServer]]:
    """Factory: ``pg_server(env=..., args=...)``, a server on a fresh PostgreSQL database.

    The pilot tests run once, on PostgreSQL (what cluster mode, and so a pilot's agent, is used
    with), not once per --db: they exercise Slurm and the agents, not the store (26-28 s each)."""
    if request.config.getoption("--db") == "sqlite":
        pytest.skip("the Slurm pilot tests run on PostgreSQL (--db postgres or both)")
    started: list[HtcServer] = []

    def start(*, env: dict[str, str] | None = None, args: tuple[str, ...] = ()) -> HtcServer:
        url = request.getfixturevalue("pg_url_factory")()
        srv = HtcServer(tmp_path_factory.mktemp("htc-data"), url, env=env, args=args, runtime="process")
        started.append(srv)
        return srv.start()

    yield start
    for srv in started:
        srv.stop()
