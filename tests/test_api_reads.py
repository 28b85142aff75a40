"""Reads the HTTP layer serves through services and stores (it runs no SQL of its own: see the
layer contracts in pyproject.toml): the project list reads every listed project's container
repositories in one query (it was one query per project), and /htc/metrics counts jobs by project
and status from the job counters.

In process on SQLite and PostgreSQL, through the real HTTP routes (FastAPI's TestClient), counting
the statements the database runs while a page is served.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import event

from openhtc.api.app import create_app
from openhtc.services.service_set import ServiceSet
from openhtc.testing.inprocess import StoreHarness, in_process_services


class World:
    def __init__(self, services: ServiceSet) -> None:
        self.services = services
        self.harness = StoreHarness(services)
        token, _ = services.tokens.bearer(self.harness.who)
        self.http = TestClient(create_app(services), headers={"Authorization": f"Bearer {token}"})
        self.statements = 0
        event.listen(services.db.engine, "before_cursor_execute", self._count)

    def _count(self, *_: Any) -> None:
        self.statements += 1

    def project_with_repositories(self, name: str, repositories: list[str]) -> str:
        project_id: str = self.harness.create_project(name).id
        for repo in repositories:
            made = self.http.post(f"/api/v1/htc/projects/{project_id}/container-registry/repo/{repo}")
            assert made.status_code == 200, made.text
        return project_id

    def list_page(self, size: int) -> tuple[list[dict[str, Any]], int]:
        """One page of the project list, and how many statements serving it ran."""
        self.statements = 0
        resp = self.http.get("/api/v1/htc/projects", params={"pageSize": size})
        assert resp.status_code == 200, resp.text
        return resp.json()["items"], self.statements


@pytest.fixture
def world(tmp_path: Path, db_url: str | None) -> Iterator[World]:
    with in_process_services(tmp_path / "data", db_url) as services:
        yield World(services)


def test_the_project_list_reads_all_repositories_in_one_query(world: World) -> None:
    expected = {
        world.project_with_repositories(f"p{i}", [f"tool-{i}", "app"] if i % 2 else []): (
            ["app", f"tool-{i}"] if i % 2 else []
        )
        for i in range(12)
    }

    one, statements_for_one = world.list_page(1)
    many, statements_for_many = world.list_page(12)

    assert len(one) == 1 and len(many) == 12
    assert {p["projectId"]: p["repositories"] for p in many} == expected
    registry = world.services.registry
    assert registry is not None
    assert all(p["containerRegistry"] == registry.container_registry(p["projectId"]) for p in many)
    assert statements_for_many == statements_for_one, "one query per listed project (N+1)"


def test_a_single_project_names_its_repositories(world: World) -> None:
    project_id = world.project_with_repositories("solo", ["b-repo", "a-repo"])
    resp = world.http.get(f"/api/v1/htc/projects/{project_id}")
    assert resp.status_code == 200, resp.text
    assert resp.json()["repositories"] == ["a-repo", "b-repo"]


def test_metrics_count_the_jobs_of_each_project_by_status(world: World) -> None:
    h = world.harness
    busy, idle = h.create_project("busy"), h.create_project("idle")
    h.submit(busy, h.create_task(busy), h.job_request(5, maxVCpus=2))
    h.succeed(h.claim(2))

    resp = world.http.get("/api/v1/htc/metrics")
    assert resp.status_code == 200, resp.text
    samples = {
        (s.name, s.labels["project_id"], s.labels["status"]): s.value
        for family in text_string_to_metric_families(resp.text)
        for s in family.samples
        if s.name in ("htc_jobs", "htc_job_vcpus")
    }
    assert samples[("htc_jobs", busy.id, "SUCCEEDED")] == 2
    assert samples[("htc_jobs", busy.id, "SUBMITTED_TO_PROVIDER")] == 3
    assert samples[("htc_job_vcpus", busy.id, "SUBMITTED_TO_PROVIDER")] == 6
    assert not any(project == idle.id for _, project, _ in samples), "a project without jobs has none"
