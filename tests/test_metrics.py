"""Prometheus metrics at /htc/metrics, scraped by a real Prometheus (Debian's `prometheus`).

The server under test is the real subprocess; Prometheus scrapes it on loopback with an API
key, as docs/metrics.md's scrape config does, and the assertions are PromQL answers from its
HTTP API. The Grafana dashboard's queries are checked against the exposition.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from openhtc.domain.clock import Clock
from openhtc.domain.enums import JobStatus
from openhtc.domain.models import AttemptReport
from openhtc.metrics import Metrics
from openhtc.metrics.http import HttpMetrics
from openhtc.metrics.jobs import Buckets
from openhtc.testing.ci import skip_or_fail
from openhtc.testing.inprocess import EXECUTOR, StoreHarness, in_process_services
from openhtc.testing.postgres import free_port
from openhtc.testing.server import HtcApi

S = JobStatus
DASHBOARD = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "openhtc.json"
SERVER_FAMILY = "openhtc_job_transitions_total"  # one of the server-wide families
WAIT = 30.0


def exposition(server: Any, key: str) -> str:
    resp = httpx.get(f"{server.api_url}/htc/metrics", headers={"Authorization": f"Token {key}"}, timeout=30)
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/plain"), resp.headers
    return resp.text


def sample_names(text: str) -> set[str]:
    return {line.split("{", 1)[0].split(" ", 1)[0] for line in text.splitlines() if line and line[0] != "#"}


class Prometheus:
    """A Prometheus server scraping one openhtc server every 250 ms, with its admin API key."""

    def __init__(self, workdir: Path, target: Any) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        key_file = workdir / "openhtc-api-key"
        key_file.write_text(target.api_key + "\n")
        key_file.chmod(0o600)
        config = {  # JSON is YAML
            "global": {"scrape_interval": "250ms", "scrape_timeout": "250ms"},
            "scrape_configs": [
                {
                    "job_name": "openhtc",
                    "metrics_path": "/api/v1/htc/metrics",
                    "authorization": {"type": "Token", "credentials_file": str(key_file)},
                    "static_configs": [{"targets": [f"127.0.0.1:{target.port}"]}],
                }
            ],
        }
        (workdir / "prometheus.yml").write_text(json.dumps(config))
        self.log = workdir / "prometheus.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Prometheus:
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [
                    "prometheus",
                    f"--config.file={self.workdir / 'prometheus.yml'}",
                    f"--storage.tsdb.path={self.workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.wait(lambda: self._get("/-/ready").status_code == 200, "Prometheus to be ready")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def _get(self, path: str, **params: Any) -> httpx.Response:
        try:
            return httpx.get(self.url + path, params=params, timeout=10)
        except httpx.TransportError:
            return httpx.Response(599)

    def query(self, promql: str) -> float | None:
        """An instant query's single value, or None when it returns no series."""
        resp = self._get("/api/v1/query", query=promql)
        assert resp.status_code == 200, resp.text
        result = resp.json()["data"]["result"]
        assert len(result) <= 1, (promql, result)
        return float(result[0]["value"][1]) if result else None

    def labels(self) -> list[str]:
        resp = self._get("/api/v1/labels")
        assert resp.status_code == 200, resp.text
        return list(resp.json()["data"])

    def label_values(self, label: str) -> list[str]:
        resp = self._get(f"/api/v1/label/{label}/values")
        assert resp.status_code == 200, resp.text
        return list(resp.json()["data"])

    def wait(self, predicate: Callable[[], bool], what: str | Callable[[], str]) -> None:
        deadline = time.monotonic() + WAIT
        while not predicate():
            if self.proc is not None and self.proc.poll() is not None:
                pytest.fail(f"prometheus exited: {self.log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                what = what if isinstance(what, str) else what()
                pytest.fail(f"timed out waiting for {what}\n{self.log.read_text()[-3000:]}")
            time.sleep(0.1)

    def wait_value(self, promql: str, expected: float) -> None:
        seen: list[float | None] = []

        def matches() -> bool:
            seen[:] = [self.query(promql)]
            return seen[0] == expected

        self.wait(matches, lambda: f"{promql} == {expected} (last answer: {seen})")


@pytest.fixture
def prometheus_for(tmp_path: Path) -> Iterator[Callable[[Any], Prometheus]]:
    if shutil.which("prometheus") is None:
        skip_or_fail("not installed: prometheus (make containers installs it)")
    started: list[Prometheus] = []

    def start(target: Any) -> Prometheus:
        workdir = tmp_path / f"prom-{len(started)}"
        workdir.mkdir()
        prom = Prometheus(workdir, target)
        started.append(prom)
        return prom.start()

    yield start
    for prom in started:
        prom.stop()


def gated(gate: Path, batch_size: int) -> dict[str, Any]:
    """Jobs that run until ``gate`` exists: the test decides when they end, not a clock."""
    script = f"while [ ! -e {gate} ]; do sleep 0.05; done"
    return HtcApi.job_request(["sh", "-c", script], batch_size=batch_size)


@pytest.mark.one_db
def test_prometheus_sees_a_batch_while_it_runs_and_after_it_ends(
    start_server: Callable[..., Any], prometheus_for: Callable[[Any], Prometheus], tmp_path: Path
) -> None:
    server = start_server(env={"OPENHTC_EXECUTOR_VCPUS": "2", "OPENHTC_HEARTBEAT_SECONDS": "0.5"})
    prom = prometheus_for(server)
    api = server.api()
    project_id, task_id = api.project_and_task()
    gate = tmp_path / "gate"
    parent = api.submit_one(project_id, task_id, gated(gate, 4))["parentJobId"]

    # while it runs: two jobs on the executor's two vCPUs, none finished
    running = f'sum(htc_jobs{{project_id="{project_id}", status="RUNNING"}})'
    prom.wait_value(running, 2)
    prom.wait_value('sum(openhtc_job_transitions_total{status="RUNNING"})', 2)
    prom.wait_value('sum(openhtc_executors{state="online"})', 1)
    assert prom.query('sum(openhtc_job_transitions_total{status="SUCCEEDED"})') is None
    assert not prom.query(f'sum(htc_jobs{{project_id="{project_id}", status="SUCCEEDED"}})')

    # after it ends: every count is the batch's
    gate.touch()
    prom.wait_value('sum(openhtc_job_transitions_total{status="SUCCEEDED"})', 4)
    prom.wait_value(f'sum(htc_jobs{{project_id="{project_id}", status="SUCCEEDED"}})', 4)
    prom.wait_value("sum(openhtc_job_run_seconds_count)", 4)
    assert prom.query("sum(openhtc_job_queue_wait_seconds_count)") == 4
    assert prom.query('sum(openhtc_job_transitions_total{status="RUNNABLE"})') == 4
    assert prom.query("sum(openhtc_executor_claimed_jobs_total)") == 4
    vcpu_seconds = prom.query(f'sum(openhtc_vcpu_seconds_total{{project_id="{project_id}"}})')
    assert vcpu_seconds is not None and vcpu_seconds > 0
    assert (prom.query('sum(openhtc_db_transaction_duration_seconds_count{kind="write"})') or 0) > 0

    # failures by failure code; a cancel counts once, not again when the killed jobs report
    api.submit_one(project_id, task_id, api.job_request(["sh", "-c", "exit 3"], batch_size=2))
    prom.wait_value(
        'sum(openhtc_job_transitions_total{status="FAILED", failure_code="ErrorNonZeroContainerExitCode"})', 2
    )
    other_task = api.create_task(project_id)["taskId"]
    api.submit_one(project_id, other_task, gated(tmp_path / "never", 2))
    prom.wait_value(running, 2)
    api.cancel(project_id, other_task)
    prom.wait_value('sum(openhtc_job_transitions_total{status="FAILED", failure_code="Cancelled"})', 2)
    # every attempt reports STARTING, RUNNING and its end (the cancelled ones too, once killed)
    reports = "sum(openhtc_executor_reports_total)"
    prom.wait(lambda: (prom.query(reports) or 0) >= 3 * (4 + 2 + 2), "the killed jobs' reports")
    assert prom.query('sum(openhtc_job_transitions_total{status="FAILED"})') == 4
    assert prom.query(running) == 0

    # HTTP latency is labelled by route template; no label anywhere holds a task or job id
    routes = prom.label_values("route")
    assert "/htc/projects/{project_id}/tasks/{task_id}/jobs/batch" in routes, routes
    for label in prom.labels():
        for value in prom.label_values(label):
            assert task_id not in value and other_task not in value and parent not in value, (label, value)


@pytest.mark.one_db
def test_every_metric_of_the_grafana_dashboard_is_in_the_exposition(module_server: Any, api: Any) -> None:
    project_id, task_id = api.project_and_task()
    api.submit_one(project_id, task_id, api.job_request(["true"]))
    api.wait_terminal(project_id, task_id, 1)
    names = sample_names(exposition(module_server, module_server.api_key))
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [
        target["expr"]
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
        if "expr" in target
    ]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if v.get("definition")]
    assert len(exprs) >= 15, exprs
    used = {m for expr in exprs for m in re.findall(r"\b(?:openhtc|htc)_[a-z0-9_]+", expr)}
    assert used, exprs
    missing = sorted(used - names)
    assert not missing, f"the dashboard queries metrics the server does not expose: {missing}"


@pytest.mark.one_db
@pytest.mark.second_workspace
def test_metrics_take_an_api_key_and_scope_what_they_show(module_server: Any, api: Any) -> None:
    project_id, task_id = api.project_and_task()
    api.submit_one(project_id, task_id, api.job_request(["true"]))
    api.wait_terminal(project_id, task_id, 1)
    admin = exposition(module_server, module_server.api_key)
    assert f'openhtc_vcpu_seconds_total{{project_id="{project_id}"}}' in admin
    assert SERVER_FAMILY in admin
    # a bearer token works as on every Rescale route; a wrong key is refused
    bearer = api.client.get("/htc/metrics")
    assert bearer.status_code == 200 and SERVER_FAMILY in bearer.text
    wrong = httpx.get(f"{module_server.api_url}/htc/metrics", headers={"Authorization": "Token nope"})
    assert wrong.status_code == 401, wrong.text
    # a member sees the workspace's families, not the server-wide ones
    member_key = module_server.cli(
        "admin", "create-user", f"m-{uuid.uuid4().hex[:6]}@example.org", "--role", "member"
    ).stdout.split()[-1]
    member = exposition(module_server, member_key)
    assert f'openhtc_vcpu_seconds_total{{project_id="{project_id}"}}' in member
    assert f'htc_jobs{{project_id="{project_id}"' in member
    assert SERVER_FAMILY not in member
    # another workspace's admin sees nothing of this workspace's projects
    other_key = module_server.cli(
        "admin", "create-workspace", f"w-{uuid.uuid4().hex[:6]}", "--admin-email", "w@x.org"
    ).stdout.split()[-1]
    other = exposition(module_server, other_key)
    assert project_id not in other
    assert SERVER_FAMILY in other


# -- the counting rules, without a server ---------------------------------------------------


class HandClock(Clock):
    def __init__(self, at: float) -> None:
        self.at = at

    def now(self) -> float:
        return self.at


def test_counts_follow_what_the_store_applied_when_a_cancel_races_the_reports(
    tmp_path: Path, db_url: str | None
) -> None:
    clock = HandClock(990.0)
    with in_process_services(tmp_path / "data", db_url, clock) as services:
        store = StoreHarness(services)
        project = store.create_project()
        task = store.create_task(project)
        store.submit(project, task, store.job_request(4, maxVCpus=2))
        clock.at = 1000.0
        a, b, c, d = store.claim(4)  # each waited 10 s
        ex, jobs = store.executor, services.metrics.jobs
        ex.report(
            EXECUTOR,
            [AttemptReport(j.job_id, 1, s, 1010.0) for j in (a, b, c, d) for s in (S.STARTING, S.RUNNING)],
        )
        ex.report(EXECUTOR, [AttemptReport(a.job_id, 1, S.SUCCEEDED, 1015.0, 0)])
        # the user cancels the task; job b finished just before, and its report lands between the
        # cancel's commit and its counting (the store ignores it: b is cancelled already)
        clock.at = 1020.0
        cancel = services.jobs.cancel(task.id, None, clock.now())
        ex.report(EXECUTOR, [AttemptReport(b.job_id, 1, S.SUCCEEDED, 1019.0, 0)])
        jobs.applied(cancel)
        # the killed jobs' ends, and a repeated end of a: all stale
        ex.report(
            EXECUTOR,
            [
                AttemptReport(c.job_id, 1, S.FAILED, 1021.0, 137, "ErrorNonZeroContainerExitCode"),
                AttemptReport(d.job_id, 1, S.FAILED, 1021.0, 137, "ErrorNonZeroContainerExitCode"),
                AttemptReport(a.job_id, 1, S.SUCCEEDED, 1015.0, 0),
            ],
        )
        snap = jobs.snapshot()
        failed = {code: n for (status, code), n in snap.transitions.items() if status == "FAILED"}
        assert failed == {"Cancelled": 3}
        assert snap.transitions[("SUCCEEDED", "")] == 1
        assert [snap.transitions[(s, "")] for s in ("RUNNABLE", "STARTING", "RUNNING")] == [4, 4, 4]
        # a ran 5 s, b, c and d 10 s until the cancel: 2 vCPUs each
        assert snap.run_time[0][-1] == ("+Inf", 4.0) and snap.run_time[1] == 35.0
        assert snap.vcpu_seconds == {project.id: 70.0}
        assert snap.queue_wait[0][-1] == ("+Inf", 4.0) and snap.queue_wait[1] == 40.0
        assert snap.reports == 8 + 1 + 1 + 3

        # an executor restarts before starting e: e runs again as attempt 2, and attempt 1's late
        # end is not counted (nor does attempt 2 wait again)
        other = store.create_task(project, "t2")
        store.submit(project, other, store.job_request(1))
        (e,) = store.claim(1)
        ex.register(EXECUTOR, "inc-2", store.region, ["X86"], store.capacity)
        services.queue.admit(clock.now(), 10)
        (e2,) = store.claim(1)
        assert (e2.job_id, e2.attempt) == (e.job_id, 2)
        ex.report(EXECUTOR, [AttemptReport(e.job_id, 1, S.SUCCEEDED, 1021.0, 0)])
        store.succeed([e2])
        snap = jobs.snapshot()
        assert snap.transitions[("SUCCEEDED", "")] == 2
        assert snap.transitions[("SUBMITTED_TO_RESCALE", "")] == 1
        assert snap.transitions[("RUNNABLE", "")] == 6
        assert snap.queue_wait[0][-1] == ("+Inf", 5.0)


@pytest.mark.unit
def test_histogram_buckets_are_cumulative_and_bounds_inclusive() -> None:
    buckets = Buckets((1.0, 5.0))
    for value in (0.5, 1.0, 3.0, 9.0):
        buckets.observe(value)
    assert buckets.cumulative() == [("1.0", 2.0), ("5.0", 3.0), ("+Inf", 4.0)]
    assert buckets.total == 13.5


@pytest.mark.unit
def test_an_unhandled_error_counts_as_a_500_and_methods_are_a_fixed_set() -> None:
    def boom(request: Request) -> Response:
        raise RuntimeError("a bug")

    def ok(request: Request) -> Response:
        return PlainTextResponse("ok")

    metrics = Metrics()
    app = Starlette(
        routes=[Route("/boom/{x}", boom), Route("/ok", ok, methods=["GET", "PURGE"])],
        middleware=[Middleware(HttpMetrics, metrics=metrics)],
    )

    async def send() -> list[int]:
        transport = httpx.ASGITransport(app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return [
                (await client.request(method, path)).status_code
                for method, path in (("GET", "/boom/1"), ("PURGE", "/ok"), ("GET", "/ok"))
            ]

    assert asyncio.run(send()) == [500, 200, 200]

    def requests(method: str, route: str, status: str) -> float | None:
        labels = {"method": method, "route": route, "status": status}
        return metrics.registry.get_sample_value("openhtc_http_requests_total", labels)

    assert requests("GET", "/boom/{x}", "500") == 1
    latency = {"method": "GET", "route": "/boom/{x}"}
    assert metrics.registry.get_sample_value("openhtc_http_request_duration_seconds_count", latency) == 1
    assert requests("other", "/ok", "200") == 1 and requests("GET", "/ok", "200") == 1
    assert requests("PURGE", "/ok", "200") is None
