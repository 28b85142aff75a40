"""A local cluster (``htc cluster``'s code, ``openhtc.cluster.local``) as a fixture: a private
PostgreSQL, API servers on a bridge and ``htc agent`` processes in network namespaces of their
own. Needs root (namespaces, veths) and ``ip``; skipped locally without them, failed in CI."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from openhtc.cluster.local import ClusterSpec, LocalCluster
from openhtc.testing.ci import require_tools, skip_or_fail
from openhtc.testing.server import HtcApi

LIVENESS = 3.0  # agent liveness timeout of the clusters under test (seconds)


def api_for(cluster: LocalCluster, server: int = 0) -> HtcApi:
    """An authenticated client of one of the cluster's servers."""
    url = cluster.urls[server]
    key = cluster.api_key
    token = httpx.get(f"{url}/api/v1/auth/token", headers={"Authorization": f"Token {key}"}, timeout=10)
    token.raise_for_status()
    headers = {"Authorization": f"Bearer {token.json()['tokenValue']}"}
    return HtcApi(httpx.Client(base_url=f"{url}/api/v1", headers=headers, timeout=60), url)


@pytest.fixture
def make_cluster(request: pytest.FixtureRequest) -> Iterator[Callable[..., LocalCluster]]:
    """``make_cluster(agents=2, servers=2, vcpus=2)``: a started cluster, stopped at teardown
    (its servers' and agents' logs are printed when the test failed)."""
    if os.geteuid() != 0:
        skip_or_fail("a local cluster needs root (network namespaces); CI runs as root")
    require_tools("ip", hint="iproute2")
    started: list[LocalCluster] = []
    # Not under tmp_path (mode 0700): PostgreSQL runs as 'postgres' and must reach its directory.
    base = Path(tempfile.mkdtemp(prefix="openhtc-cluster-"))
    base.chmod(0o755)
    request.node.cluster_dirs = []

    def make(agents: int = 2, servers: int = 2, vcpus: int = 2) -> LocalCluster:
        directory = base / f"cluster-{len(started)}"
        request.node.cluster_dirs.append(directory)
        spec = ClusterSpec(
            directory=directory,
            agents=agents,
            servers=servers,
            agent_vcpus=vcpus,
            agent_memory_mb=4096,
            # an idle exchange is held at most 1 s: well within the liveness timeout
            server_env={"OPENHTC_AGENT_LIVENESS_SECONDS": str(LIVENESS), "OPENHTC_AGENT_POLL_SECONDS": "1"},
        )
        cluster = LocalCluster(spec)
        started.append(cluster)
        cluster.up()
        return cluster

    yield make
    for cluster in started:
        cluster.down()
    if not getattr(request.node, "cluster_failed", False):
        shutil.rmtree(base, ignore_errors=True)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """On a failure, attach the tail of every log of the test's clusters (and keep them)."""
    report = yield
    if report.failed and call.when == "call":
        item.cluster_failed = True  # type: ignore[attr-defined]
        for directory in getattr(item, "cluster_dirs", []):
            for log in sorted(directory.glob("*.log")):
                text = log.read_text(errors="replace")[-4000:]
                report.sections.append((f"cluster log {log}", text))
    return report
