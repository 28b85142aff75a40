"""Rescale's HTC tutorial (rescale-labs/Api_HtcAPI_Tutorial), replayed against openhtc as
docs/rescale-tutorial.md tells it, on both storage backends, under the default runtime.

The calls are the notebook's: raw HTTP with a bearer token from ``/auth/token``, ``podman``
login and push to ``$REGISTRY_URI$REPO_NAME:$IMAGE_TAG``, ``htcctl`` with ``RESCALE_API_TOKEN``
or ``RESCALE_HTC_BEARER_TOKEN``, ``aws s3`` with only the token's three ``AWS_*`` keys. The
differences are the documented ones: the base URL (``RESCALE_API_URL`` for ``htcctl``), the
region (the server is started with the tutorial's ``AWS_EU_WEST_1``), the one-time set-up steps
(``htc image trust``, ``htc storage configure-aws``), a python3 image built offline with
examples/rescale-tutorial/face_tagger.py (words stand in for faces) and a smaller data set.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from openhtc.cli.bundle import build_bundle
from openhtc.testing.ci import skip_or_fail
from openhtc.testing.images import find_busybox, podman_import, python_rootfs_tar

pytestmark = pytest.mark.one_db

ROOT = Path(__file__).resolve().parents[2]
TAGGER = ROOT / "examples" / "rescale-tutorial" / "face_tagger.py"
BIN = Path(sys.executable).parent
REGION = "AWS_EU_WEST_1"  # the tutorial's region: the server is started with it
REPO_NAME, IMAGE_TAG = "opencv-htc-tutorial", "v1"
IMAGES = 20  # the tutorial's 5,000 COCO images, scaled down
BATCH_SIZE = 10
POLL = 0.5  # the tutorial sleeps 30 s between polls


def _need(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing or find_busybox() is None or not Path("/usr/bin/python3").exists():
        message = f"missing: {', '.join(missing) or 'busybox-static or /usr/bin/python3'}"
        skip_or_fail(message)


@pytest.fixture(scope="module")
def tools(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path | str]]:
    """The bundled htcctl, and a python3 image holding it and the tutorial's job (built once)."""
    _need("podman", "docker-registry", "bwrap")
    work = tmp_path_factory.mktemp("tutorial-image")
    htcctl = build_bundle(work / "bin" / "htcctl")
    files = {"opt/face_tagger.py": TAGGER.read_bytes(), "usr/local/bin/htcctl": htcctl.read_bytes()}
    tar = python_rootfs_tar(work / "rootfs.tar", files)
    image = f"localhost/htc-tutorial-py:{uuid.uuid4().hex[:8]}"
    podman_import(tar, image, changes=["ENV PATH=/usr/local/bin:/usr/bin:/bin"])
    tar.unlink()
    yield {"htcctl": htcctl, "image": image}
    subprocess.run(["podman", "rmi", "--force", image], capture_output=True, check=False)


class Tutorial:
    """The notebook's cells, against one server."""

    def __init__(self, s: Any, tools: dict[str, Any], tmp: Path) -> None:
        self.s = s
        self.root = s.server.url  # https://htc.rescale.com
        self.api = s.server.api_url  # https://htc.rescale.com/api/v1
        self.api_key = s.server.api_key
        self.tmp = tmp
        self.home = tmp / "home"
        (self.home / ".aws").mkdir(parents=True)
        self.path = f"{Path(tools['htcctl']).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}"
        self.token = ""

    def http(self, method: str, url: str, **kw: Any) -> httpx.Response:
        res = httpx.request(method, url, headers={"Authorization": f"Bearer {self.token}"}, timeout=60, **kw)
        assert res.status_code < 400, f"{method} {url} -> {res.status_code}: {res.text}"  # raise_for_status
        return res

    def sh(self, *cmd: str, cwd: Path | None = None, stdin: str | None = None, **env: str) -> str:
        base = {"PATH": self.path, "HOME": str(self.home), "RESCALE_API_URL": self.root}
        base.update(CONTAINERS_REGISTRIES_CONF=str(self.tmp / "registries.conf"))
        base.update(REGISTRY_AUTH_FILE=str(self.tmp / "auth.json"))
        result = subprocess.run(
            list(cmd), cwd=cwd or self.tmp, input=stdin, env={**base, **env},
            capture_output=True, text=True, timeout=180, check=False,
        )  # fmt: skip
        assert result.returncode == 0, f"{cmd} -> {result.returncode}\n{result.stdout}\n{result.stderr}"
        return result.stdout

    def htc(self, *args: str) -> str:
        return self.sh(str(BIN / "htc"), *args, OPENHTC_URL=self.root, OPENHTC_API_KEY=self.api_key)

    def jobs_path(self, project_id: str, task_id: str) -> str:
        return f"{self.api}/htc/projects/{project_id}/tasks/{task_id}/jobs"

    def poll_for_status_events(self, project_id: str, task_id: str, parent_job_id: str) -> dict[str, Any]:
        while True:
            url = f"{self.jobs_path(project_id, task_id)}/{parent_job_id}:0/events"
            items = self.http("GET", url).json()["items"]
            final = [e for e in items if e["status"] in ("FAILED", "SUCCEEDED")]
            if final:
                return dict(final[0])
            time.sleep(POLL)

    def get_logs(self, project_id: str, task_id: str, parent_job_id: str) -> list[str]:
        url = f"{self.jobs_path(project_id, task_id)}/{parent_job_id}:0/logs"
        return [i["message"] for i in self.http("GET", url).json()["items"]]

    def monitor_group(self, project_id: str, task_id: str, group: str, size: int) -> dict[str, int]:
        while True:
            url = f"{self.api}/htc/projects/{project_id}/tasks/{task_id}/group-summary-statistics"
            job_statuses = self.http("GET", url, params={"group": group}).json()["items"][0]["jobStatuses"]
            if job_statuses["SUCCEEDED"] + job_statuses["FAILED"] == size:
                return dict(job_statuses)
            time.sleep(POLL)

    def get_all_jobs(self, project_id: str, task_id: str, group: str, status: str | None = None) -> list[Any]:
        params = {"group": group, "viewType": "SIMPLE"} | ({"status": status} if status else {})
        res = self.http("GET", self.jobs_path(project_id, task_id), params=params)
        statuses = list(res.json()["items"])
        while "next" in res.json():
            res = self.http("GET", res.json()["next"])
            statuses.extend(res.json()["items"])
        return statuses

    def task_storage_token(self, project_id: str, task_id: str) -> tuple[str, str, str, str]:
        body = self.http(
            "GET", f"{self.api}/htc/projects/{project_id}/tasks/{task_id}/storage/token/{REGION}"
        ).json()
        creds = body["credentials"]
        return (
            creds["AWS_SESSION_TOKEN"],
            creds["AWS_ACCESS_KEY_ID"],
            creds["AWS_SECRET_ACCESS_KEY"],
            body["storagePath"],
        )

    def aws(self, token: tuple[str, str, str, str], *args: str) -> str:
        session, key_id, secret, _ = token
        keys = {"AWS_SESSION_TOKEN": session, "AWS_ACCESS_KEY_ID": key_id, "AWS_SECRET_ACCESS_KEY": secret}
        return self.sh(self.s.aws_path(), "s3", *args, **keys)


def test_the_rescale_tutorial_end_to_end(
    start_storage_server: Any, storage_backend: str, tools: dict[str, Any], tmp_path: Path
) -> None:
    s = start_storage_server(args=("--region", REGION, "--vcpus", "4"), runtime="auto")
    t = Tutorial(s, tools, tmp_path)

    # -- Authentication: /auth/token, without /api/v1 ---------------------------------------------
    token_res = httpx.get(f"{t.root}/auth/token", headers={"Authorization": f"Token {t.api_key}"})
    token_res.raise_for_status()
    t.token = token_res.json()["tokenValue"]

    # -- Create a project ---------------------------------------------------------------------
    regions = t.http("GET", f"{t.api}/htc/regions").json()
    assert REGION in [r["region"] for r in regions] and all(r["supportedArchitectures"] for r in regions)
    assert [r["region"] for r in t.http("GET", f"{t.api}/htc/storage").json()] == [REGION]
    payload = {"projectName": "htc-tutorial", "projectDescription": "Tutorial project", "regions": [REGION]}
    project_id = t.http("POST", f"{t.api}/htc/projects", json=payload).json()["projectId"]

    # -- Publish the image: $REGISTRY_URI$REPO_NAME:$IMAGE_TAG, podman login without flags -------
    repo = t.http("POST", f"{t.api}/htc/projects/{project_id}/container-registry/repo/{REPO_NAME}").json()
    registry_uri = repo["registryURI"]
    docker_token = t.http("GET", f"{t.root}/htc/projects/{project_id}/container-registry/token").text
    t.htc("image", "trust", "--file", str(tmp_path / "registries.conf"))  # the one-time step
    repo_netloc = registry_uri.split("/")[0]
    t.sh("podman", "login", "--username", "AWS", "--password-stdin", repo_netloc, stdin=docker_token)
    reference = f"{registry_uri}{REPO_NAME}:{IMAGE_TAG}"
    t.sh("podman", "tag", tools["image"], reference)
    try:
        t.sh("podman", "push", reference)
    finally:
        subprocess.run(["podman", "rmi", reference], capture_output=True, check=False)
    images = t.http("GET", f"{t.api}/htc/projects/{project_id}/container-registry/images").json()
    assert f"{REPO_NAME}:{IMAGE_TAG}" in images["images"]

    # -- Upload input files: htcctl --project-shared --project-id P upload * ----------------------
    val = tmp_path / "val2017"
    val.mkdir()
    names = [f"{i:012d}.jpg" for i in range(IMAGES - 1)] + ["000000367818.jpg"]
    for i, name in enumerate(names):
        (val / name).write_text(" ".join(["face"] * (i % 5) + ["tree"]) + "\n")  # up to 4 "faces"
    key = {"RESCALE_API_TOKEN": t.api_key}
    t.sh("htcctl", "--project-shared", "--project-id", project_id, "upload", *sorted(names), cwd=val, **key)
    (tmp_path / "image_list.dat").write_text("".join(f"{n}\n" for n in sorted(names)))  # ls -1 val2017/
    t.sh("htcctl", "--project-shared", "--project-id", project_id, "upload", "image_list.dat", **key)

    # -- Create a task ------------------------------------------------------------------------
    task_payload = {"taskName": "htc-task-from-htctutorial", "taskDescription": "HTC Task from HTC Tutorial"}
    task_id = t.http("POST", f"{t.api}/htc/projects/{project_id}/tasks", json=task_payload).json()["taskId"]

    # -- Simulating the runtime context locally (the job script on this machine) ---------------
    local = tmp_path / "local"
    local.mkdir()
    job_env = {"RESCALE_HTC_PROJECT_ID": project_id, "RESCALE_HTC_TASK_ID": task_id}
    job_env |= {"RESCALE_HTC_BEARER_TOKEN": t.token, "HTC_INPUT_IMAGE": "true"}
    t.sh("python3", str(TAGGER), "000000367818.jpg", cwd=local, **job_env)
    listed = t.sh("htcctl", "--project-id", project_id, "--task-id", task_id, "list", **key).split()
    assert listed == ["000000367818.jpg_tagged.dat", "000000367818.jpg_tagged.jpg"]
    result_file = "000000367818.jpg_tagged.jpg"
    t.sh(
        "htcctl", "--project-id", project_id, "--task-id", task_id, "download", result_file, cwd=local, **key
    )
    assert (local / result_file).read_text().count("[face]") == 4

    # -- Create and run jobs: a failing first job, fixed from its logs ------------------------
    definition = {
        "imageName": f"{REPO_NAME}:{IMAGE_TAG}", "maxVCpus": 1, "maxMemory": 128,
        "commands": ["python", "/opt/face_tagger.py"],
        "envs": [{"name": "HTC_INPUT_IMAGE", "value": "true"}], "execTimeoutSeconds": 5000,
    }  # fmt: skip
    payload_jobs = [{"jobName": "Test HTC tutorial job", "batchSize": 1, "htcJobDefinition": definition}]
    batch = t.http("POST", t.jobs_path(project_id, task_id) + "/batch", json=payload_jobs).json()
    parent = batch[0]["parentJobId"]
    assert t.poll_for_status_events(project_id, task_id, parent)["status"] == "FAILED"
    logs = t.get_logs(project_id, task_id, parent)
    assert any("IndexError" in line for line in logs), logs  # "expected an additional argument"
    definition["commands"] = [*definition["commands"], "000000367818.jpg"]
    batch = t.http("POST", t.jobs_path(project_id, task_id) + "/batch", json=payload_jobs).json()
    parent = batch[0]["parentJobId"]
    event = t.poll_for_status_events(project_id, task_id, parent)
    logs = t.get_logs(project_id, task_id, parent)
    assert event["status"] == "SUCCEEDED", logs
    assert any("Found 4 faces" in line for line in logs), logs

    # -- aws s3 with the three exported keys (S3 backends; once: htc storage configure-aws) -----
    if s.s3:  # on local storage the token's credentials are openhtc's: htcctl and htc storage
        storage_token = t.task_storage_token(project_id, task_id)
        t.htc("storage", "configure-aws")
        assert "000000367818.jpg_tagged.dat" in t.aws(storage_token, "ls", storage_token[3])

    # -- A grouped batch, monitored with group summaries -------------------------------------
    group = f"htc-tutorial-jobgroup-{int(time.time())}"
    envs = [{"name": "BATCH_JOB_ARRAY_SIZE", "value": str(BATCH_SIZE)}]
    envs.append({"name": "IMG_OBJKEY_LIST", "value": "image_list.dat"})
    batch_definition = {**definition, "commands": ["python", "/opt/face_tagger.py"], "envs": envs}
    batch_payload = [
        {"jobName": "Test HTC tutorial job", "batchSize": BATCH_SIZE, "htcJobDefinition": batch_definition}
    ]
    t.http("POST", t.jobs_path(project_id, task_id) + "/batch", params={"group": group}, json=batch_payload)
    statuses = t.monitor_group(project_id, task_id, group, BATCH_SIZE)
    assert statuses["SUCCEEDED"] == BATCH_SIZE, (
        statuses,
        t.get_all_jobs(project_id, task_id, group, "FAILED"),
    )

    # -- Aggregate results: the .dat files (aws s3 cp, or htcctl), then the best image --------
    out = tmp_path / "val2017_output"
    if s.s3:
        storage_token = t.task_storage_token(project_id, task_id)  # tokens expire: a new one
        t.aws(
            storage_token,
            "cp",
            storage_token[3],
            str(out),
            "--recursive",
            "--exclude",
            "*",
            "--include",
            "*.dat",
            "--quiet",
        )
    else:
        dats = [
            k
            for k in t.sh("htcctl", "--project-id", project_id, "--task-id", task_id, "list", **key).split()
            if k.endswith(".dat")
        ]
        t.sh(
            "htcctl",
            "--project-id",
            project_id,
            "--task-id",
            task_id,
            "download",
            *dats,
            "-d",
            str(out),
            **key,
        )
    counts = {f.name: int(f.read_text().splitlines()[1]) for f in out.iterdir() if f.name.endswith("dat")}
    assert len(counts) == IMAGES * 4 // 5  # every image with a face, the local run's included
    max_cnt_file = max(counts, key=lambda name: counts[name]).replace(".dat", ".jpg")
    bearer = {"RESCALE_HTC_BEARER_TOKEN": t.token, "RESCALE_HTC_REGION": REGION}
    t.sh(
        "htcctl",
        "--project-id",
        project_id,
        "--task-id",
        task_id,
        "download",
        max_cnt_file,
        "-d",
        "val2017_output/",
        **bearer,
    )
    assert (out / max_cnt_file).read_text().count("[face]") == 4

    # -- Clean up: delete the task; its storage goes --------------------------------------------
    t.http("DELETE", f"{t.api}/htc/projects/{project_id}/tasks/{task_id}")
    deadline = time.monotonic() + 60
    while t.sh("htcctl", "--project-id", project_id, "--task-id", task_id, "list", **key).split():
        assert time.monotonic() < deadline, "the deleted task's storage is still there"
        time.sleep(POLL)

    # -- Cancelling jobs: a SIMULATE_FAILURES batch, cancelled above 20 % failures -------------
    task_id = t.http("POST", f"{t.api}/htc/projects/{project_id}/tasks", json=task_payload).json()["taskId"]
    fail_definition = {**batch_definition, "execTimeoutSeconds": 60}
    fail_definition["envs"] = [{"name": "SIMULATE_FAILURES", "value": "true"}, *envs]
    fail_payload = [
        {"jobName": "Test HTC tutorial job", "batchSize": BATCH_SIZE, "htcJobDefinition": fail_definition}
    ]
    group = f"htc-tutorial-jobgroup-{int(time.time())}-fail"
    t.http("POST", t.jobs_path(project_id, task_id) + "/batch", params={"group": group}, json=fail_payload)
    cancelled = False
    while True:
        jobs = t.get_all_jobs(project_id, task_id, group)
        succeeded = sum(j["status"] == "SUCCEEDED" for j in jobs)
        failed = sum(j["status"] == "FAILED" for j in jobs)
        if succeeded + failed == BATCH_SIZE:
            break
        if succeeded + failed > 0 and failed / (succeeded + failed) > 0.2:
            t.http("POST", t.jobs_path(project_id, task_id) + "/cancel", params={"group": group})
            cancelled = True
            break
        time.sleep(POLL)
    assert cancelled, jobs
    statuses = t.monitor_group(project_id, task_id, group, BATCH_SIZE)
    assert statuses["SUCCEEDED"] + statuses["FAILED"] == BATCH_SIZE
    reasons = {
        f"{j['failureCode']}:{j['statusReason']}"
        for j in t.get_all_jobs(project_id, task_id, group, "FAILED")
    }
    assert len(reasons) >= 2, reasons  # the simulated exception, and the cancellation
