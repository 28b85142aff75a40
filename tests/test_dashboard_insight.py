"""The dashboard's overview figures, failure code filter, executors page, "why is my job
pending?" (route, job page, ``htc explain``) and ``htc top``, against the real server."""

from __future__ import annotations

import socket
import subprocess
import uuid
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from tests.test_dashboard import sign_in

import openhtc
from openhtc.domain.enums import JobStatus
from openhtc.testing.inprocess import StoreHarness, in_process_services
from openhtc.testing.server import htc_command

EXT = "/openhtc/v1"


def htc(server: Any, *args: str, api_key: str | None = None) -> str:
    result = subprocess.run(
        [*htc_command(), *args, "--url", server.url, "--api-key", api_key or server.api_key],
        capture_output=True, text=True, timeout=60, env=server.environment(), check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def ext(api: Any, path: str, expect: int = 200) -> Any:
    resp = api.client.get(f"{api.root_url}{EXT}{path}")
    assert resp.status_code == expect, resp.text
    return resp.json()


def member_key(server: Any) -> str:
    created = server.cli("admin", "create-user", f"m-{uuid.uuid4().hex[:6]}@x.org", "--role", "member")
    return created.stdout.split()[-1]


@pytest.mark.one_db
def test_why_a_held_job_is_pending_on_the_route_the_job_page_and_htc_explain(
    module_server: Any, api: Any
) -> None:
    project_id, task_id = api.project_and_task()
    api.request(
        "POST",
        f"/htc/projects/{project_id}/limits",
        json={"vCPUs": 1, "modifierRole": "PROJECT_ADMIN"},
        expect=201,
    )
    parent = api.submit_one(project_id, task_id, api.job_request(["sleep", "60"], batch_size=3))[
        "parentJobId"
    ]
    api.wait_jobs(
        project_id, task_id, lambda js: any(j["status"] == "RUNNING" for j in js), what="one job running"
    )
    path = f"/projects/{project_id}/tasks/{task_id}/jobs"
    last = ext(api, f"{path}/{parent}:2/explain")
    assert last["status"] == "SUBMITTED_TO_RESCALE" and last["pending"] is True
    codes = [r["code"] for r in last["reasons"]]
    assert codes == ["PROJECT_VCPU_LIMIT", "QUEUE_POSITION"], last
    assert "1 of 1 vCPUs" in last["reasons"][0]["message"]
    assert last["reasons"][1]["message"].startswith("1 job of its project is ahead")
    running = ext(api, f"{path}/{parent}:0/explain")
    assert running["pending"] is False and [r["code"] for r in running["reasons"]] == ["NOT_PENDING"]
    ext(api, f"{path}/{parent}:9/explain", expect=404)
    ext(api, f"/projects/{project_id}/tasks/nope/jobs/{parent}:2/explain", expect=404)
    with closing(sign_in(module_server)) as client:
        page = client.get(f"/ui{path}/{parent}:2")
        assert "Why is it pending?" in page.text and 'data-code="PROJECT_VCPU_LIMIT"' in page.text
        assert "Why is it pending?" not in client.get(f"/ui{path}/{parent}:0").text
    out = htc(module_server, "explain", f"{parent}:2", "-p", project_id, "-t", task_id)
    assert "SUBMITTED_TO_RESCALE" in out and "PROJECT_VCPU_LIMIT" in out and "QUEUE_POSITION" in out
    # another workspace's user: the same 404 as every route of that task
    other = module_server.cli(
        "admin", "create-workspace", f"w-{uuid.uuid4().hex[:6]}", "--admin-email", "o@x.org"
    )
    resp = api.client.get(
        f"{api.root_url}{EXT}{path}/{parent}:2/explain",
        headers={"Authorization": f"Bearer {module_server.token(other.stdout.split()[-1])}"},
    )
    assert resp.status_code == 404


@pytest.mark.one_db
def test_the_overview_counts_the_last_hour_and_the_job_list_filters_by_failure_code(
    module_server: Any, api: Any
) -> None:
    before = ext(api, "/overview")["lastHour"]
    project_id, task_id = api.project_and_task()
    api.submit_one(project_id, task_id, api.job_request(["true"], batch_size=3), group="ok")
    api.submit_one(project_id, task_id, api.job_request(["sh", "-c", "exit 3"], batch_size=2, max_retries=0))
    api.wait_terminal(project_id, task_id, 5)
    after = ext(api, "/overview")["lastHour"]
    assert sum(after["succeededPerMinute"]) - sum(before["succeededPerMinute"]) == 3
    assert sum(after["failedPerMinute"]) - sum(before["failedPerMinute"]) == 2
    assert after["started"] - before["started"] == 5 and after["queueWaitP50"] is not None
    assert len(after["succeededPerMinute"]) == 60
    base = f"/ui/projects/{project_id}/tasks/{task_id}/jobs"
    with closing(sign_in(module_server)) as client:
        overview = client.get("/ui/")
        assert "<svg" in overview.text and "3 succeeded" in overview.text
        assert 'id="succeeded-hour"' in overview.text and "queue wait p50" in overview.text
        failed = client.get(base, params={"failureCode": "ErrorNonZeroContainerExitCode"})
        assert failed.status_code == 200 and failed.text.count(f"{base}/") == 2
        assert client.get(base, params={"failureCode": "ErrorTimeout"}).text.count(f"{base}/") == 0
        both = client.get(base, params={"failureCode": "ErrorNonZeroContainerExitCode", "group": "ok"})
        assert both.text.count(f"{base}/") == 0
        assert client.get(base, params={"failureCode": "NotACode"}).status_code == 400


@pytest.mark.one_db
def test_the_executors_page_shows_leases_to_admins_only_and_htc_top_renders(
    module_server: Any, api: Any
) -> None:
    name = f"top-{uuid.uuid4().hex[:6]}"
    project_id = api.create_project(name)["projectId"]
    task_id = api.create_task(project_id)["taskId"]
    api.submit_one(project_id, task_id, api.job_request(["sleep", "60"]))
    api.wait_jobs(project_id, task_id, lambda js: js[0]["status"] == "RUNNING", what="the job running")
    with closing(sign_in(module_server)) as admin:
        page = admin.get("/ui/executors")
        assert page.status_code == 200 and "Leases held" in page.text
        assert '<td class="leases">1</td>' in page.text  # the sleeping job
        assert f'<td class="version">{openhtc.__version__}</td>' in page.text
        assert socket.gethostname() in page.text  # where it runs
        assert "This server leads" in page.text  # one server: it runs the scheduler
    member = member_key(module_server)
    with closing(sign_in(module_server, member)) as client:
        page = client.get("/ui/executors")
        assert page.status_code == 200 and "online" in page.text and "Leases held</th>" not in page.text
    frame = htc(module_server, "top", "--once")
    assert name in frame and "succeeded/min" in frame and "online" in frame
    assert "1 / " in frame or "1 /" in frame  # its running vCPU
    live = htc(module_server, "top", "--frames", "2", "--interval", "0.2")
    assert live.count("openhtc top") >= 1 and name in live


def test_the_failure_code_filter_reads_an_index_on_both_databases(tmp_path: Path, db_url: str | None) -> None:
    with in_process_services(tmp_path / "data", db_url) as services:
        harness = StoreHarness(services)
        project = harness.create_project()
        task = harness.create_task(project)
        harness.submit(project, task, harness.job_request(50))

        def plan(**filters: Any) -> str:
            with services.db.read() as conn:
                stmt = services.jobs.list_statement(conn, task.id, 0, 51, **filters)
                sql = str(stmt.compile(conn, compile_kwargs={"literal_binds": True}))
                if services.db.is_sqlite:
                    return " ".join(str(r) for r in conn.execute(text("EXPLAIN QUERY PLAN " + sql)))
                conn.execute(text("SET LOCAL enable_seqscan = off"))  # a tiny table: ask for an index
                return " ".join(r[0] for r in conn.execute(text("EXPLAIN " + sql)))

        assert "ix_jobs_task_failure" in plan(failure_code="ErrorTimeout")
        # a status few jobs of the project are in: its range of the queue index, not a walk of the task
        assert "ix_jobs_queue" in plan(status=JobStatus.FAILED)
        assert "ix_jobs_task_group" in plan(group="g")


@pytest.mark.one_db
def test_a_tasks_files_are_listed_and_downloaded_and_only_for_who_may_read_them(
    module_server: Any, api: Any
) -> None:
    project_id, task_id = api.project_and_task()
    key = f"projects/{project_id}/tasks/{task_id}/out/result 1.txt"
    api.request("PUT", f"/htc/storage/objects/{key}", content=b"forty-two\n", expect=200)
    base = f"/ui/projects/{project_id}/tasks/{task_id}"
    with closing(sign_in(module_server)) as client:
        page = client.get(f"{base}/files")
        assert page.status_code == 200 and "out/result 1.txt" in page.text
        got = client.get(f"{base}/files/download", params={"path": "out/result 1.txt"})
        assert got.status_code == 200 and got.content == b"forty-two\n"
        assert "attachment" in got.headers["content-disposition"]
        assert client.get(f"{base}/files/download", params={"path": "../../shared/x"}).status_code == 400
        assert client.get(f"{base}/files/download", params={"path": "nope.txt"}).status_code == 404
        images = client.get(f"/ui/projects/{project_id}/images")
        assert images.status_code == 200 and "Images of" in images.text
    other = module_server.cli(
        "admin", "create-workspace", f"w-{uuid.uuid4().hex[:6]}", "--admin-email", "f@x.org"
    )
    with closing(sign_in(module_server, other.stdout.split()[-1])) as stranger:
        assert stranger.get(f"{base}/files").status_code == 404
        assert stranger.get(f"{base}/files/download", params={"path": "out/result 1.txt"}).status_code == 404
        assert stranger.get(f"/ui/projects/{project_id}/images").status_code == 404


@pytest.mark.one_db
def test_a_polled_fragment_is_shared_only_with_the_same_workspace_and_role(
    module_server: Any, api: Any
) -> None:
    """Polls are answered from a one-second cache; another workspace or role never gets its entry."""
    project_id, task_id = api.project_and_task()
    base = f"/ui/projects/{project_id}/tasks/{task_id}"
    poll = {"HX-Request": "true"}
    other = module_server.cli(
        "admin", "create-workspace", f"w-{uuid.uuid4().hex[:6]}", "--admin-email", "c@x.org"
    )
    with (
        closing(sign_in(module_server)) as admin,
        closing(sign_in(module_server, other.stdout.split()[-1])) as stranger,
        closing(sign_in(module_server, member_key(module_server))) as member,
    ):
        assert "All jobs" in admin.get(base, headers=poll).text
        assert stranger.get(base, headers=poll).status_code == 404
        assert "Leases held" in admin.get("/ui/executors", headers=poll).text
        assert "Leases held</th>" not in member.get("/ui/executors", headers=poll).text
        assert "Leases held" in admin.get("/ui/executors", headers=poll).text
