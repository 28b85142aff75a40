"""Capacity comes from the executors that registered, not from the machine the API runs on.

Submit validation refuses a job no registered executor of its region can hold, naming what the
largest one offers; the workspace dimensions list what the registered executors offer. The
embedded server reports what its local executor registered (``--vcpus``); in process, executors
registered by hand stand for ``htc agent``s on other machines.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from openhtc.api.app import create_app
from openhtc.domain.capacity import (
    ExecutorOffer,
    largest_by_region,
    offers_for,
    region_architectures,
    why_not_fit,
)
from openhtc.domain.clock import Clock
from openhtc.domain.models import Capacity
from openhtc.testing.inprocess import EXECUTOR, REGION, StoreHarness, in_process_services

GIB = 1024


# -- the pure rule ------------------------------------------------------------------------------


@pytest.mark.unit
def test_a_job_fits_when_one_executor_of_its_region_and_architecture_holds_it() -> None:
    offers = [
        ExecutorOffer("R1", ("X86",), Capacity(8, 16 * GIB)),
        ExecutorOffer("R1", ("X86",), Capacity(2, 64 * GIB)),
        ExecutorOffer("R2", ("X86",), Capacity(96, 512 * GIB)),
        ExecutorOffer("R1", ("ARM64",), Capacity(64, 256 * GIB)),
    ]
    r1 = offers_for(offers, "R1", "X86")
    assert why_not_fit(r1, "R1", 8, 16 * GIB) is None
    assert why_not_fit(r1, "R1", 16, GIB) == ("maxVCpus", "16 exceeds the largest executor in R1 (8 vCPUs)")
    assert why_not_fit(r1, "R1", 1, 128 * GIB) == (
        "maxMemory",
        f"{128 * GIB} MiB exceeds the largest executor in R1 ({64 * GIB} MiB)",
    )
    # each dimension fits some executor, but no one executor has both
    assert why_not_fit(r1, "R1", 8, 64 * GIB) == (
        "maxVCpus",
        f"no executor in R1 offers both 8 vCPUs and {64 * GIB} MiB",
    )
    assert why_not_fit([], "R3", 1000, 1) is None  # none registered yet: the job waits for one
    assert largest_by_region(offers) == {
        ("R1", "X86"): Capacity(8, 16 * GIB),
        ("R2", "X86"): Capacity(96, 512 * GIB),
        ("R1", "ARM64"): Capacity(64, 256 * GIB),
    }


@pytest.mark.unit
def test_a_region_offers_the_architectures_its_executors_registered() -> None:
    offers = [
        ExecutorOffer("R1", ("AARCH64",), Capacity(8, GIB)),
        ExecutorOffer("R1", ("X86", "UNKNOWN"), Capacity(8, GIB)),
    ]
    assert region_architectures(["X86"], offers, "R1") == ["X86", "AARCH64"]  # configured first
    assert region_architectures(["X86"], offers[:1], "R1") == ["AARCH64"]  # no X86 executor left
    assert region_architectures(["X86"], offers, "R2") == ["X86"]  # none registered: the configured


# -- in process: executors registered elsewhere -------------------------------------------------


class ManualClock(Clock):
    def __init__(self) -> None:
        self.t = time.time()  # tokens are checked against the real clock

    def now(self) -> float:
        return self.t


class Cluster(StoreHarness):
    """An API with no executor of its own; agents register by hand."""

    def __init__(self, services: Any) -> None:
        super().__init__(services, capacity=Capacity(4, 8 * GIB))  # the harness's executor, ex-1
        self.project = self.create_project()
        self.task = self.create_task(self.project)
        token, _ = services.tokens.bearer(self.who)
        self.http = TestClient(create_app(services), headers={"Authorization": f"Bearer {token}"})
        self.jobs_url = f"/api/v1/htc/projects/{self.project.id}/tasks/{self.task.id}/jobs"

    def post(self, vcpus: int, memory: int = 64) -> Any:
        return self.http.post(
            self.jobs_url + "/batch", json=[self.job_request(1, maxVCpus=vcpus, maxMemory=memory)]
        )

    def listed(self) -> int:
        return len(self.http.get(self.jobs_url).json()["items"])

    def dimensions(self) -> list[dict[str, Any]]:
        resp = self.http.get(f"/api/v1/htc/workspaces/{self.workspace_id}/dimensions")
        assert resp.status_code == 200, resp.text
        return list(resp.json())


@pytest.fixture
def cluster(tmp_path: Path, db_url: str | None) -> Iterator[Cluster]:
    clock = ManualClock()
    with in_process_services(tmp_path / "data", db_url, clock) as services:
        yield Cluster(services)


def test_submit_and_dimensions_follow_the_executors_that_registered(cluster: Cluster) -> None:
    refused = cluster.post(vcpus=16)
    assert refused.status_code == 400, refused.text
    assert "largest executor in AWS_US_EAST_1 (4 vCPUs)" in refused.json()["message"]
    assert cluster.listed() == 0  # nothing stored
    assert {(d["derived"]["vCPUs"], d["derived"]["memory"]) for d in cluster.dimensions()} == {(4, 8.0 * GIB)}

    # an agent on a bigger machine registers: the same job is accepted, the dimensions grow
    cluster.executor.register("agent-big", "inc-1", REGION, ["X86"], Capacity(32, 128 * GIB))
    assert cluster.post(vcpus=16).status_code == 200
    assert cluster.listed() == 1
    dims = cluster.dimensions()
    assert {(d["region"], d["derived"]["vCPUs"], d["derived"]["memory"]) for d in dims} == {
        (REGION, 32, 128.0 * GIB)
    }
    assert {d["priority"] for d in dims} == {"ON_DEMAND_PRIORITY", "ON_DEMAND_ECONOMY"}

    # an executor in another region does not make this region's jobs fit
    cluster.executor.register("agent-elsewhere", "inc-1", "AWS_EU_WEST_1", ["X86"], Capacity(256, 1024 * GIB))
    assert cluster.post(vcpus=64).status_code == 400


def test_an_architecture_is_offered_once_an_executor_of_it_registers(cluster: Cluster) -> None:
    arm = cluster.job_request(1, architecture="AARCH64")
    refused = cluster.http.post(cluster.jobs_url + "/batch", json=[arm])
    assert refused.status_code == 400 and "architecture" in refused.text, refused.text

    cluster.executor.register("agent-arm", "inc-1", REGION, ["AARCH64"], Capacity(16, 32 * GIB))
    region = cluster.http.get(f"/api/v1/htc/regions/{REGION}").json()
    assert region["supportedArchitectures"] == ["X86", "AARCH64"]
    listed = cluster.http.get("/api/v1/htc/regions").json()
    assert [r["supportedArchitectures"] for r in listed if r["region"] == REGION] == [["X86", "AARCH64"]]
    assert cluster.http.post(cluster.jobs_url + "/batch", json=[arm]).status_code == 200
    arm_dims = {(d["derived"]["architecture"], d["derived"]["vCPUs"]) for d in cluster.dimensions()}
    assert arm_dims == {("X86", 4), ("AARCH64", 16)}


def test_an_executor_silent_past_its_lease_no_longer_counts(cluster: Cluster) -> None:
    cluster.executor.register("agent-big", "inc-1", REGION, ["X86"], Capacity(32, 128 * GIB))
    assert cluster.post(vcpus=16).status_code == 200
    clock = cluster.services.clock
    assert isinstance(clock, ManualClock)
    clock.t += cluster.services.settings.lease_seconds / 2
    cluster.executor.heartbeat(EXECUTOR, [])  # only the small one keeps heart-beating
    clock.t += cluster.services.settings.lease_seconds / 2 + 1
    refused = cluster.post(vcpus=16)
    assert refused.status_code == 400 and "(4 vCPUs)" in refused.json()["message"], refused.text
    assert {d["derived"]["vCPUs"] for d in cluster.dimensions()} == {4}


# -- the embedded server ------------------------------------------------------------------------


@pytest.mark.one_db
def test_the_embedded_server_offers_what_its_local_executor_registered(start_server: Any) -> None:
    server = start_server(args=("--vcpus", "2", "--memory-mb", "3000"))
    api = server.api()
    pid, tid = api.project_and_task()
    jobs = f"{api.task_path(pid, tid)}/jobs"
    too_big = api.job_request(["true"], maxVCpus=4, maxMemory=512)
    resp = api.request("POST", f"{jobs}/batch", json=[too_big])
    assert resp.status_code == 400, resp.text
    assert "4 exceeds the largest executor in AWS_US_EAST_1 (2 vCPUs)" in resp.json()["message"]
    assert "maxVCpus" in resp.json()["message"] + resp.json().get("errorDescription", "")
    assert api.jobs(pid, tid) == []
    workspace_id = api.get("/auth/token/whoami")["workspaceId"]
    dims = api.get(f"/htc/workspaces/{workspace_id}/dimensions")
    assert dims and {(d["derived"]["vCPUs"], d["derived"]["memory"]) for d in dims} == {(2, 3000.0)}
    api.submit(pid, tid, api.job_request(["true"], maxVCpus=2, maxMemory=512))
    api.wait_terminal(pid, tid, 1)
