"""The web dashboard under /ui/, driven over HTTP against the real server subprocess.

Sign-in, the session cookie and CSRF; workspace isolation; and the pages showing the projects,
tasks, groups, jobs, events and logs created through the API.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import time
import uuid
from contextlib import ExitStack, closing
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.sync.client import connect

from openhtc.testing.postgres import free_port

CHROMIUM = shutil.which("chromium")
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
        page = client.get("/ui/")
        assert page.status_code == 200
        assert page.headers["x-frame-options"] == "DENY"  # the confirmation forms cannot be framed
        assert "frame-ancestors 'none'" in page.headers["content-security-policy"]


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


@pytest.mark.one_db
def test_cancelling_a_group_from_the_task_page_cancels_only_that_group(module_server: Any, api: Any) -> None:
    project_id, task_id = api.project_and_task()
    api.post(f"/htc/projects/{project_id}/limits", {"vCPUs": 0, "modifierRole": "PROJECT_ADMIN"}, expect=201)
    for group in ("keep", "drop"):  # held by the limit: they stay queued until cancelled
        held = api.submit_one(project_id, task_id, api.job_request(["true"], batch_size=2), group=group)
    base = f"/ui/projects/{project_id}/tasks/{task_id}"
    with closing(sign_in(module_server)) as client:
        job = client.get(f"{base}/jobs/{held['parentJobId']}:1")
        assert job.status_code == 200 and "Not started yet" in job.text
        log = client.get(f"{base}/jobs/{held['parentJobId']}:1/log", headers={"HX-Request": "true"})
        assert log.status_code == 200 and "End of log" not in log.text  # keeps following
        overview = client.get("/ui/").text
        assert "SUBMITTED_TO_RESCALE 4" in overview and "0 / 0" in overview  # vCPUs against the limit
        confirm = client.get(f"{base}/confirm/cancel", params={"group": "drop"})
        assert "group drop" in confirm.text
        resp = client.post(f"{base}/cancel", data={"csrf": CSRF.search(confirm.text)[1], "group": "drop"})  # type: ignore[index]
        assert resp.status_code == 303
        jobs = api.wait_jobs(
            project_id, task_id,
            lambda jobs: sum(j["status"] == "FAILED" for j in jobs) == 2,
            what="the dropped group to be cancelled",
        )  # fmt: skip
        assert {j["group"] for j in jobs if j["status"] == "FAILED"} == {"drop"}
        assert {j["status"] for j in jobs if j["group"] == "keep"} == {"SUBMITTED_TO_RESCALE"}
        # signing out ends the session
        out = client.post("/ui/logout", data={"csrf": csrf_of(client, "/ui/")})
        assert out.status_code == 303
        assert client.get("/ui/").status_code == 303


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


# -- a real browser ----------------------------------------------------------------------------


class Chromium:
    """Headless Chromium driven over the DevTools protocol (Debian's `chromium`, no downloads).

    Every request other than to loopback goes to a dead loopback proxy: the browser reaches
    nothing but the server under test."""

    def __init__(self, profile: Path, port: int) -> None:
        self.stack = ExitStack()
        self.proc = subprocess.Popen(
            [
                CHROMIUM or "chromium", "--headless", "--no-sandbox", "--disable-gpu",
                "--no-first-run", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--disable-extensions", "--proxy-server=http://127.0.0.1:9",
                f"--remote-debugging-port={port}", f"--user-data-dir={profile}",
                "--window-size=1280,900", "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while True:
            try:
                targets = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=2).json()
                page = next(t for t in targets if t["type"] == "page")
                break
            except (httpx.HTTPError, StopIteration):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        self.ws = self.stack.enter_context(connect(page["webSocketDebuggerUrl"], max_size=None))
        self.ids = 0

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.ids += 1
        self.ws.send(json.dumps({"id": self.ids, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv(timeout=30))
            if message.get("id") == self.ids:
                assert "error" not in message, message
                return dict(message.get("result", {}))

    def js(self, expression: str) -> Any:
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def wait_for(self, expression: str, what: str, timeout: float = 30) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.js(expression)
            if value:
                return value
            time.sleep(0.1)
        pytest.fail(f"timed out waiting for {what}; page text: {self.js('document.body.innerText')!r}")

    def close(self) -> None:
        self.stack.close()
        self.proc.terminate()
        self.proc.wait(timeout=10)


@pytest.mark.one_db
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (make containers installs it)")
def test_in_a_real_browser_the_overview_counts_move_without_reloading(
    module_server: Any, api: Any, tmp_path: Path
) -> None:
    name = f"browser-{uuid.uuid4().hex[:8]}"
    project_id = api.create_project(name)["projectId"]
    task_id = api.create_task(project_id)["taskId"]
    api.submit_one(project_id, task_id, api.job_request(["true"], batch_size=3))
    api.wait_terminal(project_id, task_id, 3)
    browser = Chromium(tmp_path / "profile", free_port())
    try:
        browser.call("Page.enable")
        browser.call("Page.navigate", url=f"{module_server.url}/ui/")
        browser.wait_for("location.pathname === '/ui/login'", "the sign-in page")
        browser.wait_for("document.readyState === 'complete'", "the sign-in page to load")
        browser.js(
            f"document.getElementById('api_key').value = {json.dumps(module_server.api_key)};"
            "document.querySelector('form').submit()"
        )
        browser.wait_for(f"document.body.innerText.includes({json.dumps(name)})", "the overview")
        assert browser.js("location.pathname") == "/ui/"
        assert browser.js("document.cookie") == ""  # HttpOnly: no script reads the session
        assert "SUCCEEDED 3" in browser.js("document.body.innerText")
        browser.js("window.notReloaded = true")  # gone if the page reloads
        api.submit_one(project_id, task_id, api.job_request(["true"], batch_size=2))
        api.wait_terminal(project_id, task_id, 5)
        browser.wait_for("document.body.innerText.includes('SUCCEEDED 5')", "the live counts to move")
        assert browser.js("window.notReloaded") is True
        shot = browser.call("Page.captureScreenshot", format="png")["data"]
        (tmp_path / "overview.png").write_bytes(base64.b64decode(shot))
    finally:
        browser.close()
    # and the plain DOM dump of a page without a session is the sign-in form
    dom = subprocess.run(
        [CHROMIUM or "chromium", "--headless", "--no-sandbox", "--disable-gpu",
         "--proxy-server=http://127.0.0.1:9", f"--user-data-dir={tmp_path / 'dump'}",
         "--dump-dom", f"{module_server.url}/ui/"],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    assert 'id="api_key"' in dom and name not in dom
