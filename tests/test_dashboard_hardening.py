"""The dashboard against awkward input and narrow principals, on the real server: downloads of
files with non-Latin-1 names, job tokens used as a session (scoped to one task, also for the
polled fragments' cache), and odd query parameters (a clear 4xx page, never a 500)."""

from __future__ import annotations

from contextlib import closing
from typing import Any
from urllib.parse import quote, unquote

import httpx
import pytest
from tests.test_dashboard import browser, sign_in
from tests.test_input_hardening import _job_tokens

from openhtc.api.pagination import encode_cursor

POLL = {"HX-Request": "true"}


@pytest.mark.one_db
def test_a_file_with_a_cjk_and_emoji_name_downloads_under_its_own_name(module_server: Any, api: Any) -> None:
    project_id, task_id = api.project_and_task()
    name = '結果 "データ" 🎉.txt'
    key = f"projects/{project_id}/tasks/{task_id}/out/{name}"
    api.request("PUT", f"/htc/storage/objects/{quote(key)}", content="数据 ✓\n".encode(), expect=200)
    base = f"/ui/projects/{project_id}/tasks/{task_id}"
    with closing(sign_in(module_server)) as client:
        listed = client.get(f"{base}/files")
        assert listed.status_code == 200 and "結果" in listed.text
        for _ in range(2):  # twice: the same bytes and name each time
            got = client.get(f"{base}/files/download", params={"path": f"out/{name}"})
            assert got.status_code == 200, got.text
            assert got.content == "数据 ✓\n".encode()
            disposition = got.headers["content-disposition"]
            assert disposition.isascii() and disposition.startswith('attachment; filename="')
            assert unquote(disposition.split("filename*=UTF-8''", 1)[1]) == name
    # once deleted through the API, the dashboard's download is a 404 page
    api.request("DELETE", f"/htc/storage/objects/{quote(key)}", expect=None)
    with closing(sign_in(module_server)) as client:
        assert client.get(f"{base}/files/download", params={"path": f"out/{name}"}).status_code == 404


def _session(module_server: Any, token: str) -> httpx.Client:
    client = browser(module_server)
    client.cookies.set("openhtc_session", token, path="/ui")
    return client


@pytest.mark.one_db
def test_a_job_token_never_gets_another_tasks_polled_fragment(module_server: Any, api: Any) -> None:
    """A job token is accepted as a session, scoped to its task; another task's fragment, even
    one just rendered for a job of that task, is a 404 for it."""
    project_a, task_a = api.project_and_task()
    project_b, task_b = api.project_and_task()
    task_b2 = api.create_task(project_b)["taskId"]
    token_a, _ = _job_tokens(api, project_a, task_a)
    token_b, _ = _job_tokens(api, project_b, task_b)
    token_b2, _ = _job_tokens(api, project_b, task_b2)
    project_page = f"/ui/projects/{project_b}"
    task_page = f"{project_page}/tasks/{task_b}"
    with (
        _session(module_server, token_a) as job_a,
        _session(module_server, token_b) as job_b,
        _session(module_server, token_b2) as job_b2,
        closing(sign_in(module_server)) as admin,
    ):
        assert job_a.get(f"/ui/projects/{project_a}/tasks/{task_a}", headers=POLL).status_code == 200
        for owner in (job_b, admin):  # the fragments rendered for task B's audiences...
            assert owner.get(task_page, headers=POLL).status_code == 200
            assert owner.get(project_page, headers=POLL).status_code == 200
            # ...are not for a job of another project, nor of another task of the same project
            for path in (task_page, project_page):
                refused = job_a.get(path, headers=POLL)
                assert refused.status_code == 404, (path, refused.text)
            refused = job_b2.get(task_page, headers=POLL)
            assert refused.status_code == 404, refused.text
        # the project page lists a job token's own task only, and the overview (every project) is a user's
        for headers in ({}, POLL):
            listed = job_b2.get(project_page, headers=headers)
            assert listed.status_code == 200 and task_b2 in listed.text and task_b not in listed.text
            assert task_b in admin.get(project_page, headers=headers).text
            overview = job_a.get("/ui/", headers=headers)
            assert overview.status_code == 403 and project_b not in overview.text


ODD = (
    "-1", "0", "9" * 5000, "9" * 5000 + ".1", "%FF%FE", "%ED%A0%80", "\u202e", "😀" * 300,
    "[]", "null", "1e999", "-0", "1.-1",
    "99999999999999999999.0", "1." + "9" * 19, "..", "/etc/passwd", "a/../../b",
    # forged page indexes: a huge id, a huge or odd timestamp, a long group name
    *(encode_cursor(v) for v in (2**64, -1, [10**30, "x"], [1e308, "x"], [-1e308, ""], "x" * 501, [1, 2])),
)  # fmt: skip
ODD_IDS = ("0", "-1", "x", "1:", ":1", "1:-1", "a:b", "9" * 30 + ":0", "1:" + "9" * 30, "%FF")


@pytest.mark.one_db
def test_odd_query_parameters_get_a_clear_4xx_page_never_a_500(module_server: Any, api: Any) -> None:
    project_id, task_id = api.project_and_task()
    job = api.submit_one(project_id, task_id, api.job_request(["echo", "hi"]))
    api.wait_terminal(project_id, task_id, 1)
    base = f"/ui/projects/{project_id}/tasks/{task_id}"
    job_page = f"{base}/jobs/{job['parentJobId']}:0"
    pages = {
        "/ui/": ("pageIndex",),
        "/ui/login": ("next",),
        f"/ui/projects/{project_id}": ("pageIndex",),
        base: ("pageIndex",),
        f"{base}/jobs": ("pageIndex", "status", "group", "failureCode"),
        f"{base}/files": ("after",),
        f"{base}/files/download": ("path",),
        f"{base}/confirm/cancel": ("group",),
        job_page: ("pageIndex",),
        f"{job_page}/log": ("after",),
    }
    forged = encode_cursor([10**30, "x"])  # the API's lists of projects and tasks share the check
    for path in ("/htc/projects", f"/htc/projects/{project_id}/tasks"):
        assert api.client.get(path, params={"pageIndex": forged}).status_code == 400
    with closing(sign_in(module_server)) as client:
        for path, params in pages.items():
            for param in params:
                for value in ODD:
                    raw = f"{path}?{param}={value if '%' in value else quote(value)}"
                    for headers in ({}, POLL):
                        resp = client.get(raw, headers=headers)
                        assert resp.status_code < 500, (raw, resp.status_code, resp.text[-300:])
                        assert resp.status_code in (200, 303) or 400 <= resp.status_code < 500
                        if resp.status_code >= 400:  # the dashboard's error page, saying what is wrong
                            assert resp.headers["content-type"].startswith("text/html"), raw
                            assert 'role="alert"' in resp.text, resp.text
        for odd in ODD_IDS:  # and odd ids in the path
            for path in (f"/ui/projects/{odd}", f"{base[:-len(task_id)]}{odd}", f"{base}/jobs/{odd}",
                         f"{base}/jobs/{odd}/log", f"{base}/confirm/{odd}"):  # fmt: skip
                resp = client.get(path)
                assert 400 <= resp.status_code < 500, (path, resp.status_code, resp.text[-300:])
                assert resp.headers["content-type"].startswith("text/html"), path
