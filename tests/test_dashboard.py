"""The web dashboard under /ui/, driven over HTTP against the real server subprocess.

Sign-in, the session cookie and CSRF; workspace isolation; and the pages showing the projects,
tasks, groups, jobs, events and logs created through the API.
"""

from __future__ import annotations

import re
import uuid
from contextlib import closing
from typing import Any

import httpx
import pytest

CSRF = re.compile(r'name="csrf" value="([^"]+)"')


def browser(module_server: Any) -> httpx.Client:
    return httpx.Client(base_url=module_server.url, follow_redirects=False, timeout=30)


def sign_in(module_server: Any, api_key: str | None = None) -> httpx.Client:
    client = browser(module_server)
    page = client.get("/ui/login")
    assert page.status_code == 200, page.text
    token = CSRF.search(page.text)
    assert token is not None
    resp = client.post("/ui/login", data={"api_key": api_key or module_server.api_key, "csrf": token[1]})
    assert resp.status_code == 303, resp.text
    assert resp.headers["location"] == "/ui/"
    return client


def csrf_of(client: httpx.Client, path: str) -> str:
    page = client.get(path)
    assert page.status_code == 200, page.text
    found = CSRF.search(page.text)
    assert found is not None
    return found[1]


@pytest.mark.one_db
def test_pages_need_sign_in_and_a_wrong_key_is_refused(module_server: Any, api: Any) -> None:
    project_id, task_id = api.project_and_task()
    with browser(module_server) as anonymous:
        for path in ("/ui/", f"/ui/projects/{project_id}", f"/ui/projects/{project_id}/tasks/{task_id}/jobs"):
            resp = anonymous.get(path)
            assert resp.status_code == 303, (path, resp.status_code)
            assert resp.headers["location"].startswith("/ui/login?next=")
        page = anonymous.get("/ui/login")
        token = CSRF.search(page.text)
        assert token is not None
        refused = anonymous.post("/ui/login", data={"api_key": "not-a-key", "csrf": token[1]})
        assert refused.status_code == 401
        assert "Unknown or revoked API key" in refused.text
        assert "openhtc_session" not in refused.headers.get("set-cookie", "")
        assert anonymous.get("/ui/").status_code == 303  # still signed out
        # a forged session cookie is no session
        anonymous.cookies.set("openhtc_session", "eyJhbGciOiJSUzI1NiJ9.e30.c2ln", path="/ui")
        assert anonymous.get("/ui/").status_code == 303


@pytest.mark.one_db
def test_session_cookie_is_httponly_samesite_strict_and_signin_needs_csrf(module_server: Any) -> None:
    with browser(module_server) as client:
        page = client.get("/ui/login")
        token = CSRF.search(page.text)
        assert token is not None
        # sign-in without its CSRF token is refused, even with the right key
        refused = client.post("/ui/login", data={"api_key": module_server.api_key})
        assert refused.status_code == 403
        assert "openhtc_session" not in refused.headers.get("set-cookie", "")
        resp = client.post("/ui/login", data={"api_key": module_server.api_key, "csrf": token[1]})
        assert resp.status_code == 303
        cookie = next(c for c in resp.headers.get_list("set-cookie") if c.startswith("openhtc_session="))
        flags = {part.strip().lower() for part in cookie.split(";")[1:]}
        assert "httponly" in flags and "samesite=strict" in flags and "path=/ui" in flags, cookie
        assert module_server.api_key not in cookie  # the key itself is never stored
        assert client.get("/ui/").status_code == 200


@pytest.mark.one_db
def test_forms_without_the_csrf_token_are_refused_and_change_nothing(module_server: Any, api: Any) -> None:
    project_id, task_id = api.project_and_task()
    base = f"/ui/projects/{project_id}/tasks/{task_id}"
    with closing(sign_in(module_server)) as client:
        for data in ({}, {"csrf": "0" * 64}):
            resp = client.post(f"{base}/archive", data=data)
            assert resp.status_code == 403, resp.text
            assert "CSRF" in resp.text
            assert client.post(f"{base}/delete", data=data).status_code == 403
            assert client.post("/ui/logout", data=data).status_code == 403
        assert api.get(api.task_path(project_id, task_id))["lifecycleStatus"] == "ACTIVE"
        # with the token of the confirmation page, the same POST archives the task
        confirm = client.get(f"{base}/confirm/archive")
        assert "Archive" in confirm.text
        done = client.post(f"{base}/archive", data={"csrf": CSRF.search(confirm.text)[1]})  # type: ignore[index]
        assert done.status_code == 303, done.text
        assert api.get(api.task_path(project_id, task_id))["lifecycleStatus"] == "ARCHIVED"
        # and deleting, confirmed, deletes it
        done = client.post(f"{base}/delete", data={"csrf": csrf_of(client, f"{base}/confirm/delete")})
        assert done.status_code == 303
        assert api.get(api.task_path(project_id, task_id))["lifecycleStatus"] == "DELETED"


@pytest.mark.second_workspace
def test_a_user_of_another_workspace_sees_nothing_of_this_one(module_server: Any, api: Any) -> None:
    name = f"secret-{uuid.uuid4().hex[:8]}"
    project_id = api.create_project(name)["projectId"]
    task_id = api.create_task(project_id)["taskId"]
    job = api.submit_one(project_id, task_id, api.job_request(["echo", "hello"]))
    api.wait_terminal(project_id, task_id, 1)
    job_id = f"{job['parentJobId']}:0"
    created = module_server.cli(
        "admin", "create-workspace", f"w2-{uuid.uuid4().hex[:6]}", "--admin-email", "w2@x.org"
    )
    with closing(sign_in(module_server, created.stdout.split()[-1])) as other:
        overview = other.get("/ui/")
        assert overview.status_code == 200
        assert name not in overview.text and project_id not in overview.text
        base = f"/ui/projects/{project_id}/tasks/{task_id}"
        for path in (
            f"/ui/projects/{project_id}",
            base,
            f"{base}/jobs",
            f"{base}/jobs/{job_id}",
            f"{base}/jobs/{job_id}/log",
            f"{base}/confirm/delete",
        ):
            resp = other.get(path)
            assert resp.status_code == 404, (path, resp.status_code)
            assert "hello" not in resp.text
        csrf = csrf_of(other, "/ui/")
        assert other.post(f"{base}/delete", data={"csrf": csrf}).status_code == 404
        assert other.post(f"{base}/cancel", data={"csrf": csrf}).status_code == 404
    assert api.get(api.task_path(project_id, task_id))["lifecycleStatus"] == "ACTIVE"


def test_pages_show_the_projects_tasks_jobs_and_logs_made_through_the_api(
    module_server: Any, api: Any
) -> None:
    name = f"sweep-{uuid.uuid4().hex[:8]}"
    project_id = api.create_project(name)["projectId"]
    task = api.create_task(project_id)
    task_id = task["taskId"]
    good = api.submit_one(
        project_id, task_id, api.job_request(["sh", "-c", "echo line-one; echo line-two"], batch_size=2),
        group="good",
    )  # fmt: skip
    api.submit_one(project_id, task_id, api.job_request(["sh", "-c", "echo oops; exit 3"]), group="bad")
    api.wait_terminal(project_id, task_id, 3)
    base = f"/ui/projects/{project_id}/tasks/{task_id}"
    with closing(sign_in(module_server)) as client:
        overview = client.get("/ui/")
        assert overview.status_code == 200
        assert name in overview.text
        assert "SUCCEEDED 2" in overview.text and "FAILED 1" in overview.text
        assert "online" in overview.text  # the server's own executor
        project = client.get(f"/ui/projects/{project_id}")
        assert task["taskName"] in project.text and "SUCCEEDED 2" in project.text
        page = client.get(base)
        assert ">good<" in page.text and ">bad<" in page.text
        # an htmx poll gets the live part only: the counts, without the page around them
        live = client.get(base, headers={"HX-Request": "true"})
        assert "SUCCEEDED 2" in live.text and "<html" not in live.text
        failed = client.get(f"{base}/jobs", params={"status": "FAILED"})
        assert failed.status_code == 200
        assert failed.text.count(f"{base}/jobs/") == 1 and ">3<" in failed.text  # its exit code
        grouped = client.get(f"{base}/jobs", params={"group": "good"})
        assert grouped.text.count(f"{base}/jobs/") == 2
        assert client.get(f"{base}/jobs", params={"status": "NOPE"}).status_code == 400
        job_id = f"{good['parentJobId']}:1"
        job = client.get(f"{base}/jobs/{job_id}")
        assert job.status_code == 200
        assert "SUCCEEDED" in job.text and "RUNNING" in job.text  # the event timeline
        log = client.get(f"{base}/jobs/{job_id}/log", headers={"HX-Request": "true"})
        assert "line-one" in log.text and "line-two" in log.text
        assert "End of log" in log.text  # a finished job's log stops polling
        assert client.get(f"{base}/jobs/{job_id}/log", params={"after": "9.0"}).status_code == 400


@pytest.mark.one_db
def test_a_followed_log_continues_from_its_cursor(module_server: Any, api: Any) -> None:
    """A poll returns at most 500 lines and the cursor to poll from next: no line twice or lost."""
    project_id, task_id = api.project_and_task()
    job = api.submit_one(project_id, task_id, api.job_request(["sh", "-c", "seq 1 650"]))
    api.wait_terminal(project_id, task_id, 1)
    url = f"/ui/projects/{project_id}/tasks/{task_id}/jobs/{job['parentJobId']}:0/log"
    numbers = re.compile(r"</time> (\d+)</div>")
    with closing(sign_in(module_server)) as client:
        first = client.get(url, headers={"HX-Request": "true"}).text
        assert "End of log" not in first  # more to read: it keeps polling
        cursor = re.search(r"after=([0-9.]+)", first)
        assert cursor is not None
        rest = client.get(url, params={"after": cursor[1]}, headers={"HX-Request": "true"}).text
        assert "End of log" in rest
        seen = [int(n) for n in numbers.findall(first) + numbers.findall(rest)]
        assert seen == list(range(1, 651))
