"""The unmodified PyPI ``rescalehtc`` 1.1.0 client works against openhtc.

Each test drives the client as its users do (high-level objects where they exist, the
``rescalehtc.api`` plumbing where they do not) against a live ``htc server`` on SQLite and on
PostgreSQL. The client's base URL is patched the way its own tests do, by replacing
``HtcSession.get_rescale_api_base_url``. Its 15-second flood guard on status and log refreshes
is set to 0 so the tests can poll quickly; nothing else about the client is changed.

The container registry and storage are not built yet, so their client functions are not
exercised here (image status is, because every submission goes through it).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jwt
import pytest
from rescalehtc import HtcSession, htcjobs, htcprojects, htctasks
from rescalehtc import api as plumbing
from rescalehtc.bearer_token import token_from_str
from rescalehtc.exceptions import HtcException
from rescalehtc.htcjobs import HtcJob
from rescalehtc.htcprojects import HtcProject
from rescalehtc.htctasks import HtcTask
from rescalehtc.scripts import rauthenticate

from openhtc.client import JOB_STATUSES

REGION = "AWS_US_EAST_1"
IMAGE = "busybox:latest"
LIFECYCLE = ["SUBMITTED_TO_RESCALE", "SUBMITTED_TO_PROVIDER", "RUNNABLE", "STARTING", "RUNNING"]


# --------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _client_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    """No ambient credentials, no flood guard, and a private config folder."""
    for name in ("RESCALE_HTC_REFRESH_TOKEN", "RESCALE_API_TOKEN", "RESCALE_HTC_BEARER_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(htcjobs, "FLOOD_PREVENTION_INTERVAL_SECONDS", 0)
    monkeypatch.setattr(htctasks, "FLOOD_PREVENTION_INTERVAL_SECONDS", 0)
    config = tmp_path / "rescalehtc-config"
    monkeypatch.setattr(HtcSession, "get_config_folder", lambda override=None: override or str(config))


@pytest.fixture
def point_client_at(module_server: Any, monkeypatch: pytest.MonkeyPatch) -> Callable[[str], str]:
    """Make the client talk to the test server under ``prefix`` ('/api/v1' or '')."""

    def point(prefix: str = "/api/v1") -> str:
        base = module_server.url + prefix
        monkeypatch.setattr(HtcSession, "get_rescale_api_base_url", lambda: base)
        return base

    return point


@pytest.fixture
def session(module_server: Any, point_client_at: Callable[[str], str]) -> HtcSession:
    point_client_at("/api/v1")
    return HtcSession(api_key=module_server.api_key)


@pytest.fixture
def project(session: HtcSession) -> HtcProject:
    body = {
        "projectName": f"compat-{uuid.uuid4().hex[:8]}",
        "projectDescription": "rescalehtc compatibility",
        "regions": [REGION],
    }
    return HtcProject(plumbing.post_htc_projects(session, body))


@pytest.fixture
def task(session: HtcSession, project: HtcProject) -> Iterator[HtcTask]:
    created = htctasks.create_task_with_name(session, project, f"task-{uuid.uuid4().hex[:8]}", "compat")
    yield created
    # leave nothing running on the shared server, whatever the test did
    with contextlib.suppress(HtcException):
        created.cancel_jobs_in_task(session)


class RequestLog:
    """Records every GET the client's requests.Session makes, with the JSON it got back."""

    def __init__(self, session: HtcSession) -> None:
        self.calls: list[tuple[str, dict[str, Any] | None, Any]] = []
        self._get = session.requests_session.get
        session.requests_session.get = self._record  # type: ignore[method-assign]

    def _record(self, url: str, **kwargs: Any) -> Any:
        resp = self._get(url, **kwargs)
        try:
            body = resp.json()
        except ValueError:
            body = None
        self.calls.append((resp.url, kwargs.get("params"), body))
        return resp

    def matching(self, fragment: str) -> list[tuple[str, dict[str, Any] | None, Any]]:
        return [c for c in self.calls if fragment in c[0].split("?")[0]]


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 60, interval: float = 0.25) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def wait_task_done(session: HtcSession, task: HtcTask, timeout: float = 60) -> dict[str, Any]:
    """The client's own completion loop (is_still_running), with a deadline."""
    wait_for(lambda: not task.is_still_running(session), "the task's jobs to finish", timeout)
    return task.get_task_summary(session)


def status_of(session: HtcSession, job: HtcJob) -> str:
    return str(job.get_update(session)["status"])


def run_single(session: HtcSession, task: HtcTask, commands: list[str], **kwargs: Any) -> HtcJob:
    job = htcjobs.create_single_job(
        session, task, "ON_DEMAND_PRIORITY", IMAGE, 600, commands=commands, architecture="X86", **kwargs
    )
    wait_for(lambda: not job.is_still_running(session), f"job {job.json['jobUUID']} to finish")
    return job


# --------------------------------------------------------------------------------------------
# authentication
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["/api/v1", ""], ids=["api-v1", "root"])
def test_api_key_session_works_under_both_prefixes(
    module_server: Any, point_client_at: Callable[[str], str], prefix: str
) -> None:
    """HtcSession(api_key=...) gets a bearer token it can decode and use, under /api/v1 and /."""
    point_client_at(prefix)
    session = HtcSession(api_key=module_server.api_key)
    token = session.get_bearer_token()
    assert {"exp", "workspaceId"} <= set(token.payload), token.payload
    # The client re-authenticates before every call unless more than ~2h20m remain.
    assert int(session.bearer_json["expiresIn"]) >= 3 * 3600, session.bearer_json
    log = RequestLog(session)
    for _ in range(3):
        assert isinstance(plumbing.get_htc_projects(session), list)
    assert not log.matching("/auth/token"), "the client had to re-authenticate between calls"


def test_wrong_api_key_is_refused(module_server: Any, point_client_at: Callable[[str], str]) -> None:
    point_client_at("/api/v1")
    with pytest.raises(HtcException, match="authenticate"):
        HtcSession(api_key="0" * 40)


def test_whoami_jwks_and_token_signature(module_server: Any, session: HtcSession) -> None:
    """whoami answers the claims rauthenticate prints, and the JWKS verifies the bearer token."""
    whoami = plumbing.get_auth_token_whoami(session)
    for claim in ("userFullName", "userEmail", "workspaceName", "workspaceId", "organizationCode"):
        assert claim in whoami, f"whoami lacks {claim}: {whoami}"
    user = plumbing.get_auth_whoami(session, f"Token {module_server.api_key}")["user"]
    assert user["workspace"]["id"] == whoami["workspaceId"]
    assert user["workspace"]["name"] == whoami["workspaceName"]

    bearer = session.get_bearer_token()
    jwks = plumbing.get_well_known_jwks(session)
    keys = {k["kid"]: k for k in jwks["keys"]}
    assert bearer.header.get("kid") in keys, (bearer.header, list(keys))
    key = jwt.PyJWK(keys[bearer.header["kid"]])
    claims = jwt.decode(
        bearer.encoded_token, key.key, algorithms=[bearer.header["alg"]], options={"verify_aud": False}
    )
    assert claims["workspaceId"] == whoami["workspaceId"]


def test_rauthenticate_writes_config_and_file_based_session_works(
    module_server: Any, point_client_at: Callable[[str], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`RESCALE_API_TOKEN=… rauthenticate` then HtcSession() with no arguments, as users do."""
    point_client_at("/api/v1")
    monkeypatch.setenv("RESCALE_API_TOKEN", module_server.api_key)
    rauthenticate.main(argparse.Namespace(interactive=False))
    monkeypatch.delenv("RESCALE_API_TOKEN")
    session = HtcSession()  # reads ~/.config/rescalehtc/default/rescale_api_token.txt (patched)
    assert isinstance(plumbing.get_htc_projects(session), list)


# --------------------------------------------------------------------------------------------
# projects and regions
# --------------------------------------------------------------------------------------------


def test_projects_list_and_lookup(session: HtcSession, project: HtcProject) -> None:
    project_id = project.json["projectId"]
    assert project.json["regions"] == [REGION]
    listed = htcprojects.get_projects(session)
    assert listed is not None and project_id in [p.json["projectId"] for p in listed]
    by_name = htcprojects.get_project_with_name(session, project.json["projectName"])
    assert by_name is not None and by_name.json["projectId"] == project_id
    by_id = htcprojects.get_project_with_id(session, project_id)
    assert by_id is not None and by_id.json["projectName"] == project.json["projectName"]
    assert htcprojects.get_project_with_id(session, str(uuid.uuid4())) is None  # 404 -> None


def test_project_without_regions_gets_one_the_client_accepts(session: HtcSession) -> None:
    """The client needs exactly one AWS_*/GCP_* region to submit with region=None."""
    created = plumbing.post_htc_projects(session, {"projectName": "no-regions", "projectDescription": "x"})
    assert created["regions"] == [REGION], created


def test_regions_list_the_local_x86_region(session: HtcSession) -> None:
    regions = plumbing.get_htc_regions(session)
    assert isinstance(regions, list), regions
    local = [r for r in regions if r["region"] == REGION]
    assert local and "X86" in local[0]["supportedArchitectures"], regions
    one = plumbing.get_htc_regions(session, REGION)
    assert one["region"] == REGION and "X86" in one["supportedArchitectures"]


def test_image_status_is_ready_for_well_formed_names(session: HtcSession, project: HtcProject) -> None:
    """create_job_batch_raw asks for the image status first and needs READY."""
    for image in (IMAGE, "library/python:3.11-slim", "my-app"):
        status = plumbing.get_htc_projects_container_registry_images(
            session, project.json["projectId"], image
        )
        assert status == {"status": "READY"} or status.get("status") == "READY", (image, status)


# --------------------------------------------------------------------------------------------
# tasks
# --------------------------------------------------------------------------------------------


def test_task_create_list_get_archive(session: HtcSession, project: HtcProject) -> None:
    task = htctasks.create_task_with_name(session, project, "lifecycle", "described")
    task_id = task.json["taskId"]
    assert task.json["lifecycleStatus"] == "ACTIVE" and task.json["taskName"] == "lifecycle"
    assert task_id in [t.json["taskId"] for t in htctasks.get_tasks(session, project)]
    assert [t.json["taskId"] for t in htctasks.get_tasks_with_name(session, project, "lifecycle")] == [
        task_id
    ]
    fetched = htctasks.get_task_with_id(session, project, task_id)
    assert fetched is not None and fetched.json["taskDescription"] == "described"
    assert htctasks.get_task_with_id(session, project, str(uuid.uuid4())) is None

    archived = plumbing.patch_htc_projects_tasks(
        session, project.json["projectId"], task_id, {"lifecycleStatus": "ARCHIVED"}
    )
    assert archived["lifecycleStatus"] == "ARCHIVED"
    assert task_id not in [t.json["taskId"] for t in htctasks.get_tasks(session, project)]
    assert task_id in [t.json["taskId"] for t in htctasks.get_tasks(session, project, "ARCHIVED")]
    active = plumbing.patch_htc_projects_tasks(
        session, project.json["projectId"], task_id, {"lifecycleStatus": "ACTIVE"}
    )
    assert active["lifecycleStatus"] == "ACTIVE"


def test_task_delete_paths(session: HtcSession, project: HtcProject) -> None:
    """delete_task, delete_task_with_id and delete_tasks_with_name all leave DELETED tasks listed."""
    first = htctasks.create_task_with_name(session, project, "doomed")
    first.delete_task(session)
    gone = htctasks.get_task_with_id(session, project, first.json["taskId"])
    assert gone is not None and gone.json["lifecycleStatus"] == "DELETED"
    assert first.json["taskId"] not in [t.json["taskId"] for t in htctasks.get_tasks(session, project)]
    anything = htctasks.get_tasks(session, project, lifecycle_status="any")
    assert [t.json["lifecycleStatus"] for t in anything if t.json["taskId"] == first.json["taskId"]] == [
        "DELETED"
    ]

    second = htctasks.create_task_with_name(session, project, "by-id")
    deleted = htctasks.delete_task_with_id(session, project, second.json["taskId"])
    assert deleted is not None and deleted["lifecycleStatus"] == "DELETED"
    assert htctasks.delete_task_with_id(session, project, str(uuid.uuid4())) is None  # 404 -> None

    twins = [htctasks.create_task_with_name(session, project, "twin") for _ in range(2)]
    result = htctasks.delete_tasks_with_name(session, project, "twin")
    assert sorted(r["taskId"] for r in result) == sorted(t.json["taskId"] for t in twins)
    assert {r["lifecycleStatus"] for r in result} == {"DELETED"}


def test_submitting_to_a_deleted_task_is_refused(session: HtcSession, task: HtcTask) -> None:
    task.delete_task(session)
    with pytest.raises(HtcException) as info:
        htcjobs.create_job_batch(
            session, task, 1, "ON_DEMAND_PRIORITY", IMAGE, 600, commands=["true"], architecture="X86"
        )
    assert info.value.status_code is not None and 400 <= info.value.status_code < 500


def test_tasks_list_follows_pagination(session: HtcSession, project: HtcProject) -> None:
    for i in range(105):
        plumbing.post_htc_projects_tasks(
            session, project.json["projectId"], {"taskName": f"bulk-{i}", "taskDescription": ""}
        )
    log = RequestLog(session)
    tasks = htctasks.get_tasks(session, project)
    names = [t.json["taskName"] for t in tasks]
    assert sorted(names) == sorted(f"bulk-{i}" for i in range(105))
    pages = log.matching("/tasks")
    assert len(pages) >= 2 and all("next" in body for _, _, body in pages[:-1]) and "next" not in pages[-1][2]


# --------------------------------------------------------------------------------------------
# jobs
# --------------------------------------------------------------------------------------------


def test_single_job_runs_and_reports_events_and_logs(session: HtcSession, task: HtcTask) -> None:
    job = htcjobs.create_single_job(
        session,
        task,
        "ON_DEMAND_PRIORITY",
        IMAGE,
        600,
        commands=["sh", "-c", "echo hello-from-job"],
        architecture="X86",
    )
    # create_single_job already fetched {parentJobId}:0: rows exist when the submit returns.
    assert job.json["jobUUID"].endswith(":0") and job.json["status"] in JOB_STATUSES
    wait_for(lambda: not job.is_still_running(session), "the job to finish")
    assert job.json["status"] == "SUCCEEDED", job.json
    assert "hello-from-job" in list(job.get_logs(session))
    events = plumbing.get_htc_projects_tasks_jobs_events(
        session, task.json["projectId"], task.json["taskId"], job.json["jobUUID"]
    )
    statuses = [e["status"] for e in events]
    assert set([*LIFECYCLE, "SUCCEEDED"]) <= set(statuses), statuses


def test_client_default_architecture_is_refused_on_an_x86_region(session: HtcSession, task: HtcTask) -> None:
    """The client defaults to AARCH64; a region without it answers 400 naming the field."""
    with pytest.raises(HtcException) as info:
        htcjobs.create_single_job(session, task, "ON_DEMAND_PRIORITY", IMAGE, 600, commands=["true"])
    assert info.value.status_code == 400
    assert "architecture" in str(info.value)
    assert htcjobs.get_jobs(session, task) == []


def test_batch_jobs_are_addressable_at_once_and_finish(session: HtcSession, task: HtcTask) -> None:
    batch = htcjobs.create_job_batch(
        session,
        task,
        batch_size=5,
        priority="ON_DEMAND_ECONOMY",
        image_name=IMAGE,
        exec_timeout_seconds=600,
        commands=["sh", "-c", 'echo "index=$AWS_BATCH_JOB_ARRAY_INDEX foo=$FOO"'],
        envs=[{"name": "FOO", "value": "bar"}],
        architecture="X86",
    )
    for key in ("parentJobId", "projectId", "taskId", "batchSize"):
        assert key in batch.json, batch.json
    assert isinstance(batch.json["group"], str) and batch.json["group"], (
        "submit response needs a string group"
    )
    assert batch.json["batchSize"] == 5
    jobs = batch.to_jobs()
    assert [j.json["jobUUID"] for j in jobs] == [f"{batch.json['parentJobId']}:{i}" for i in range(5)]
    for job in jobs:  # each one fetchable immediately
        assert job.get_update(session)["jobUUID"] == job.json["jobUUID"]

    summary = wait_task_done(session, task)
    assert set(summary["jobStatuses"]) >= set(JOB_STATUSES), summary
    assert summary["jobStatuses"]["SUCCEEDED"] == 5 and summary["still_running"] is False
    for i, job in enumerate(jobs):
        assert status_of(session, job) == "SUCCEEDED"
        assert list(job.get_logs(session)) == [f"index={i} foo=bar"]
    assert len(htcjobs.get_jobs(session, task, "SUCCEEDED")) == 5

    groups = plumbing.get_htc_projects_tasks_groups(session, task.json["projectId"], task.json["taskId"])
    assert batch.json["group"] in groups, groups
    per_group = plumbing.get_htc_projects_tasks_group_summary_statistics(
        session, task.json["projectId"], task.json["taskId"]
    )
    ours = [g for g in per_group if g["group"] == batch.json["group"]]
    assert ours and ours[0]["jobStatuses"]["SUCCEEDED"] == 5, per_group


def test_empty_task_summary_has_all_seven_statuses(session: HtcSession, task: HtcTask) -> None:
    summary = task.get_task_summary(session)
    assert summary["jobStatuses"] == dict.fromkeys(JOB_STATUSES, 0)
    assert summary["still_running"] is False


def test_logs_in_reading_order_and_last_n_lines(session: HtcSession, task: HtcTask, tmp_path: Any) -> None:
    job = run_single(session, task, ["sh", "-c", "for i in $(seq 1 30); do echo line-$i; done"])
    expected = [f"line-{i}" for i in range(1, 31)]
    assert list(job.get_logs(session)) == expected

    fresh = HtcJob(dict(job.json), task)  # no cached lines
    log = RequestLog(session)
    assert list(fresh.get_logs(session, last_n_lines=5)) == expected[-5:]
    calls = log.matching("/logs")
    assert len(calls) == 1 and calls[0][1] == {"pageSize": 5}, calls

    target = tmp_path / "job.log"
    job.get_logs_to_file(session, str(target))
    assert target.read_text().splitlines() == expected


def test_job_list_follows_next_over_more_than_100_jobs(session: HtcSession, task: HtcTask) -> None:
    batch = htcjobs.create_job_batch(
        session, task, 150, "ON_DEMAND_PRIORITY", IMAGE, 600, commands=["true"], architecture="X86"
    )
    log = RequestLog(session)
    jobs = htcjobs.get_jobs(session, task)
    uuids = [j.json["jobUUID"] for j in jobs]
    assert len(uuids) == 150 and set(uuids) == {f"{batch.json['parentJobId']}:{i}" for i in range(150)}
    pages = log.matching("/jobs")
    first_page = len(pages[0][2]["items"])
    assert len(pages) == math.ceil(150 / first_page), [len(p[2]["items"]) for p in pages]
    assert all("next" in body for _, _, body in pages[:-1])
    assert "next" not in pages[-1][2], "the last page must omit next, or the client never stops"
    wait_task_done(session, task)


def test_cancel_jobs_in_task(session: HtcSession, task: HtcTask) -> None:
    batch = htcjobs.create_job_batch(
        session, task, 3, "ON_DEMAND_PRIORITY", IMAGE, 600, commands=["sleep", "60"], architecture="X86"
    )
    jobs = batch.to_jobs()
    wait_for(lambda: any(status_of(session, j) == "RUNNING" for j in jobs), "a job to be RUNNING")
    task.cancel_jobs_in_task(session)
    summary = wait_task_done(session, task, timeout=30)
    assert summary["jobStatuses"]["FAILED"] == 3, summary
    for job in jobs:
        assert status_of(session, job) == "FAILED"
        events = plumbing.get_htc_projects_tasks_jobs_events(
            session, task.json["projectId"], task.json["taskId"], job.json["jobUUID"]
        )
        assert any(e.get("userCancelledEvent") for e in events), events


def test_failed_job_reports_exit_code(session: HtcSession, task: HtcTask) -> None:
    job = run_single(session, task, ["sh", "-c", "echo about-to-fail; exit 7"])
    assert job.json["status"] == "FAILED"
    assert job.json["failureCode"] == "ErrorNonZeroContainerExitCode"
    assert job.json["container"]["exitCode"] == 7
    assert list(job.get_logs(session)) == ["about-to-fail"]


def test_job_tokens_carry_claims_and_refresh_tokens_authenticate(
    module_server: Any, session: HtcSession, task: HtcTask, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    """Inside a job: RESCALE_HTC_BEARER_TOKEN has the userDefined_ claims, and the injected
    RESCALE_HTC_REFRESH_TOKEN lets the client itself authenticate (as `rauthenticate` does)."""
    job = run_single(
        session,
        task,
        ["sh", "-c", 'echo "B=$RESCALE_HTC_BEARER_TOKEN"; echo "R=$RESCALE_HTC_REFRESH_TOKEN"'],
        claims=[{"name": "myclaim", "value": "x"}],
    )
    assert job.json["status"] == "SUCCEEDED", job.json
    lines = dict(line.split("=", 1) for line in job.get_logs(session))
    assert lines["B"] and lines["R"], lines
    assert token_from_str(lines["B"]).get_user_claims() == {"myclaim": "x"}

    monkeypatch.setenv("RESCALE_HTC_REFRESH_TOKEN", lines["R"])
    job_session = HtcSession(config_folder_override=str(tmp_path / "job-config"))
    own = htcjobs.get_job_with_id(job_session, task, job.json["jobUUID"])
    assert own is not None and own.json["status"] == "SUCCEEDED"


def test_ten_concurrent_client_threads_are_served(session: HtcSession, task: HtcTask) -> None:
    """The client allows 10 connections at once: parallel submits and reads all succeed."""

    def submit(i: int) -> str:
        batch = htcjobs.create_job_batch(
            session, task, 5, "ON_DEMAND_PRIORITY", IMAGE, 600, commands=["echo", str(i)], architecture="X86"
        )
        return str(batch.json["parentJobId"])

    with ThreadPoolExecutor(max_workers=10) as pool:
        parents = list(pool.map(submit, range(10)))
        ids = [f"{parent}:{i}" for parent in parents for i in range(5)]
        fetched = list(
            pool.map(
                lambda job_id: plumbing.get_htc_projects_tasks_jobs(
                    session, task.json["projectId"], task.json["taskId"], job_id
                )["jobUUID"],
                ids,
            )
        )
    assert fetched == ids
    summary = wait_task_done(session, task)
    assert summary["jobStatuses"]["SUCCEEDED"] == 50, summary


def test_http_errors_raise_or_map_to_none(session: HtcSession, task: HtcTask) -> None:
    project_id, task_id = task.json["projectId"], task.json["taskId"]
    missing = f"{uuid.uuid4()}:0"
    assert htcjobs.get_job_with_id(session, task, missing) is None
    with pytest.raises(HtcException) as info:
        plumbing.get_htc_projects_tasks_jobs(session, project_id, task_id, missing)
    assert info.value.status_code == 404
    with pytest.raises(HtcException) as info:
        plumbing.get_htc_projects_tasks(session, str(uuid.uuid4()))
    assert info.value.status_code == 404


# --------------------------------------------------------------------------------------------
# limits, dimensions and retention policies: the client parses JSON from every one of these
# --------------------------------------------------------------------------------------------


def test_project_limits_through_the_client(session: HtcSession, project: HtcProject) -> None:
    project_id = project.json["projectId"]
    created = project.set_vcpu_limit(session, "PROJECT_ADMIN", 4)
    assert created["vCPUs"] == 4 and created["modifierRole"] == "PROJECT_ADMIN" and "id" in created
    limits = project.get_limits(session)
    assert isinstance(limits, list) and [lim["vCPUs"] for lim in limits] == [4]
    # POST with the same role overwrites instead of adding a second limit
    project.set_vcpu_limit(session, "PROJECT_ADMIN", 3)
    assert [lim["vCPUs"] for lim in project.get_limits(session)] == [3]
    limit_id = project.get_limits(session)[0]["id"]
    assert plumbing.patch_htc_projects_limits(session, project_id, limit_id, {"vCPUs": 6})["vCPUs"] == 6
    assert plumbing.get_htc_projects_limits(session, project_id, limit_id)["vCPUs"] == 6
    plumbing.delete_htc_projects_limits(session, project_id, limit_id)
    assert project.get_limits(session) == []
    project.set_vcpu_limit(session, "WORKSPACE_ADMIN", 8)
    plumbing.delete_htc_projects_limits(session, project_id)
    assert project.get_limits(session) == []


def test_retention_policies_through_the_client(session: HtcSession, project: HtcProject) -> None:
    project_id = project.json["projectId"]
    policy = {"deleteAfter": 24, "archiveAfter": 168}
    put = plumbing.put_htc_projects_task_retention_policy(session, project_id, policy)
    assert (put["deleteAfter"], put["archiveAfter"]) == (24, 168)
    got = plumbing.get_htc_projects_task_retention_policy(session, project_id)
    assert (got["deleteAfter"], got["archiveAfter"]) == (24, 168)
    plumbing.delete_htc_projects_task_retention_policy(session, project_id)
    with pytest.raises(HtcException) as info:
        plumbing.get_htc_projects_task_retention_policy(session, project_id)
    assert info.value.status_code == 404  # no project policy: the workspace's applies

    workspace_id = session.get_bearer_token().payload["workspaceId"]
    ws = plumbing.put_htc_task_retention_policy(session, workspace_id, {"deleteAfter": 0, "archiveAfter": 0})
    assert (ws["deleteAfter"], ws["archiveAfter"]) == (0, 0)
    assert plumbing.get_htc_task_retention_policy(session, workspace_id)["deleteAfter"] == 0


def test_dimensions_through_the_client(session: HtcSession, project: HtcProject) -> None:
    project_id = project.json["projectId"]
    workspace_id = session.get_bearer_token().payload["workspaceId"]
    available = plumbing.get_htc_workspaces_dimensions(session, workspace_id)
    assert isinstance(available, list) and available, "the workspace offers no compute environment"
    assert any(d.get("region") == REGION for d in available), available
    chosen = [{k: v for k, v in available[0].items() if k != "derived"}]
    stored = plumbing.put_htc_projects_dimensions(session, project_id, chosen)
    assert isinstance(stored, list) and len(stored) == 1 and stored[0]["region"] == chosen[0]["region"]
    assert len(plumbing.get_htc_projects_dimensions(session, project_id)) == 1
    assert plumbing.put_htc_projects_dimensions(session, project_id, []) == []
    assert plumbing.get_htc_projects_dimensions(session, project_id) == []
    limits = plumbing.get_htc_workspaces_limits(session, workspace_id)
    assert isinstance(limits, dict) and "vCPUs" in limits, limits
