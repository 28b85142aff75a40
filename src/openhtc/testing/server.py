"""The real ``htc server`` as a subprocess, and raw-HTTP helpers to drive it, for tests.

:class:`HtcServer` is one server process with its data directory and database (SQLite when no
URL is given); :class:`HtcApi` wraps an authenticated ``httpx.Client`` with helpers for projects,
tasks, submissions, paginated lists and bounded waits. All waits poll with a deadline; nothing
sleeps for a fixed time to "let things settle". ``tests/conftest.py`` builds its fixtures on
these; they fail the running test (``pytest.fail``) when the server does not come up.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest

from openhtc.client import JOB_STATUSES, TERMINAL_STATUSES
from openhtc.testing.postgres import free_port

DEFAULT_REGION = "AWS_US_EAST_1"
HEALTH_TIMEOUT = 30.0


def htc_command() -> list[str]:
    """The `htc` console script of this virtualenv (override with OPENHTC_TEST_HTC)."""
    override = os.environ.get("OPENHTC_TEST_HTC")
    if override:
        return override.split()
    beside_python = Path(sys.executable).parent / "htc"
    if beside_python.exists():
        return [str(beside_python)]
    found = shutil.which("htc")
    if found:
        return [found]
    pytest.fail("the `htc` command is missing: run `pip install -e .` in the repository first")


class HtcServer:
    """One ``htc server`` subprocess with its data directory and database."""

    live: ClassVar[list[HtcServer]] = []  # started and not yet stopped: their logs go into failure reports
    # told to stop (SIGTERM) by stop(wait=False) and perhaps still exiting: reap() waits for them
    exiting: ClassVar[list[subprocess.Popen[bytes]]] = []
    MAX_EXITING = 4  # more than this many still exiting: stop(wait=False) waits for the oldest

    def __init__(
        self,
        data_dir: Path,
        db_url: str | None,
        *,
        env: dict[str, str] | None = None,
        args: tuple[str, ...] = (),
        runtime: str = "process",
    ) -> None:
        self.data_dir = data_dir
        self.db_url = db_url
        self.extra_env = dict(env or {})
        self.extra_args = tuple(args)
        self.runtime = runtime
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_url = f"{self.url}/api/v1"
        self.log_path = data_dir / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.api_key = ""
        self._clients: list[httpx.Client] = []
        self._token: str | None = None

    def __repr__(self) -> str:
        db = "sqlite" if self.db_url is None else "postgres"
        return f"HtcServer({self.url}, {db}, {self.data_dir})"

    # -- process control ------------------------------------------------------------------

    def command(self) -> list[str]:
        cmd = [
            *htc_command(), "server", "--data-dir", str(self.data_dir), "--host", "127.0.0.1",
            "--port", str(self.port), "--runtime", self.runtime,
        ]  # fmt: skip
        if self.db_url:
            cmd += ["--database-url", self.db_url]
        return cmd + list(self.extra_args)

    def environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("OPENHTC_")}
        # A server killed and never started again leaves its process runtime's launchers waiting
        # for a successor with their jobs (executor_adopt_seconds, 600 by default): in tests, a
        # short wait, so a suite leaves no job behind for long. Tests that restart set their own.
        env["OPENHTC_EXECUTOR_ADOPT_SECONDS"] = "30"
        env.update(self.extra_env)
        return env

    def start(self) -> HtcServer:
        """Start (or start again) and wait for /health; a fresh server retries a port taken meanwhile."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        first_start = self.proc is None
        for _ in range(3):
            self._spawn()
            problem = self._wait_healthy()
            if problem is None:
                break
            if first_start and "address already in use" in self.log_tail(20).lower():
                self.port = free_port()
                self.url = f"http://127.0.0.1:{self.port}"
                self.api_url = f"{self.url}/api/v1"
                continue
            pytest.fail(f"{problem}\n{self.log_tail()}")
        else:
            pytest.fail(f"htc server could not bind a free port\n{self.log_tail()}")
        self.api_key = self._read_admin_key()
        return self

    def _spawn(self) -> None:
        with open(self.log_path, "ab") as log:
            log.write(f"\n===== starting: {' '.join(self.command())}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.environment(),
                start_new_session=True,  # not hit by signals sent to pytest's process group
            )
        if self not in HtcServer.live:
            HtcServer.live.append(self)

    def _wait_healthy(self) -> str | None:
        """None once /health answers 200 from our process; else what went wrong."""
        assert self.proc is not None
        deadline = time.monotonic() + HEALTH_TIMEOUT
        last_error = ""
        while time.monotonic() < deadline:
            code = self.proc.poll()
            if code is not None:
                return f"htc server exited with {code} before /health answered"
            try:
                resp = httpx.get(f"{self.url}/health", timeout=2)
                if resp.status_code == 200 and self.proc.poll() is None:
                    return None
                last_error = f"HTTP {resp.status_code}: {resp.text[:200]}"
            except httpx.HTTPError as exc:
                last_error = repr(exc)
            time.sleep(0.05)
        return f"htc server did not answer /health within {HEALTH_TIMEOUT:.0f} s ({last_error})"

    def _read_admin_key(self) -> str:
        path = self.data_dir / "admin-api-key"
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if path.exists() and path.read_text().strip():
                return path.read_text().strip()
            time.sleep(0.05)
        pytest.fail(f"{path} was not written by the server\n{self.log_tail()}")

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill9(self) -> None:
        """SIGKILL the server process only (not its job processes), as a crash would."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        self._token = None

    def restart(self) -> HtcServer:
        """Start again on the same port, data dir and database (stopping it first if alive)."""
        if self.alive:
            self._terminate()
        return self.start()

    def _terminate(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)

    def stop(self, *, wait: bool = True) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 15 s) and close its clients.

        ``wait=False`` (the fixtures' teardown) sends SIGTERM and returns: the next test need not
        wait for this server's shutdown (most of a second). :meth:`reap` waits for it later.
        """
        for client in self._clients:
            client.close()
        self._clients.clear()
        if self.proc is not None:
            if wait or self.proc.poll() is not None:
                self._terminate()
            else:
                self.proc.send_signal(signal.SIGTERM)
                HtcServer.exiting.append(self.proc)
                HtcServer.reap(keep=HtcServer.MAX_EXITING)
        if self in HtcServer.live:
            HtcServer.live.remove(self)

    @classmethod
    def reap(cls, keep: int = 0) -> None:
        """Wait for the servers ``stop(wait=False)`` left exiting, oldest first, until at most
        ``keep`` are still exiting (SIGKILL for one that takes more than 15 s)."""
        cls.exiting[:] = [proc for proc in cls.exiting if proc.poll() is None]
        while len(cls.exiting) > keep:
            proc = cls.exiting.pop(0)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)

    def log_tail(self, lines: int = 150) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return f"(no server log at {self.log_path})"
        return f"--- {self.log_path} (last {lines} lines) ---\n" + "\n".join(text.splitlines()[-lines:])

    # -- clients --------------------------------------------------------------------------

    def token(self, api_key: str | None = None) -> str:
        """A bearer token for the admin key (cached) or for another API key."""
        if api_key is None and self._token:
            return self._token
        resp = httpx.get(
            f"{self.api_url}/auth/token",
            headers={"Authorization": f"Token {api_key or self.api_key}"},
            timeout=30,
        )
        assert resp.status_code == 200, f"/auth/token -> {resp.status_code}: {resp.text}"
        token = str(resp.json()["tokenValue"])
        if api_key is None:
            self._token = token
        return token

    def client(self, token: str | None = None, *, prefix: str = "/api/v1") -> httpx.Client:
        """An httpx client on ``url + prefix`` sending ``Authorization: Bearer <token>``."""
        headers = {"Authorization": f"Bearer {token or self.token()}"}
        client = httpx.Client(base_url=self.url + prefix, headers=headers, timeout=60)
        self._clients.append(client)
        return client

    def api(self, token: str | None = None, *, prefix: str = "/api/v1") -> HtcApi:
        return HtcApi(self.client(token, prefix=prefix), self.url)

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``htc <args>`` with this server's data dir and database appended as options."""
        cmd = [*htc_command(), *args, "--data-dir", str(self.data_dir)]
        if self.db_url:
            cmd += ["--database-url", self.db_url]
        result = subprocess.run(
            cmd, capture_output=True, text=True, timeout=60, env=self.environment(), check=False
        )
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} -> {result.returncode}\n{result.stdout}\n{result.stderr}")
        return result


class HtcApi:
    """Raw-HTTP helpers over an authenticated httpx client (paths are relative to /api/v1)."""

    def __init__(self, client: httpx.Client, root_url: str) -> None:
        self.client = client
        self.root_url = root_url
        self.created_tasks: list[tuple[str, str]] = []

    # -- plain requests -------------------------------------------------------------------

    def request(self, method: str, path: str, *, expect: int | None = None, **kwargs: Any) -> httpx.Response:
        resp = self.client.request(method, path, **kwargs)
        if expect is not None and resp.status_code != expect:
            raise AssertionError(
                f"{method} {resp.request.url} -> HTTP {resp.status_code}, expected {expect}: "
                f"{resp.text[:3000]}"
            )
        return resp

    def get(self, path: str, *, expect: int | None = 200, **params: Any) -> Any:
        resp = self.request("GET", path, expect=expect, params=params or None)
        return resp.json()

    def post(self, path: str, body: Any = None, *, expect: int | None = 200, **params: Any) -> Any:
        resp = self.request("POST", path, expect=expect, json=body, params=params or None)
        return resp.json() if resp.content else None

    # -- pagination -----------------------------------------------------------------------

    def pages(self, path: str, *, max_pages: int = 500, **params: Any) -> list[dict[str, Any]]:
        """Every page of a ``{items,next}`` list, checking the envelope rules on the way."""
        return self.pages_from(self.request("GET", path, expect=200, params=params or None), max_pages)

    def pages_from(self, resp: httpx.Response, max_pages: int = 500) -> list[dict[str, Any]]:
        """The page ``resp`` holds and every page after it, following ``next`` and checking the
        envelope rules on the way."""
        pages: list[dict[str, Any]] = []
        seen: set[str] = set()
        first_url = resp.request.url
        while True:
            assert resp.headers.get("content-type", "").startswith("application/json"), resp.headers
            body = resp.json()
            assert isinstance(body, dict) and isinstance(body.get("items"), list), body
            pages.append(body)
            if "next" not in body:
                return pages
            nxt = body["next"]
            assert isinstance(nxt, str), f"'next' must be an absolute URL string or absent, got {nxt!r}"
            assert nxt.startswith(self.root_url + "/"), f"next {nxt!r} is not absolute on {self.root_url}"
            assert "pageIndex=" in nxt, f"next {nxt!r} carries no pageIndex"
            assert body["items"], f"an empty page must not carry next ({nxt})"
            assert nxt not in seen, f"next repeats: {nxt}"
            assert len(pages) < max_pages, f"more than {max_pages} pages from {first_url}"
            seen.add(nxt)
            resp = self.request("GET", nxt, expect=200)

    def list_all(self, path: str, **params: Any) -> list[dict[str, Any]]:
        return [item for page in self.pages(path, **params) for item in page["items"]]

    # -- projects, tasks, jobs ------------------------------------------------------------

    def create_project(self, name: str | None = None, **fields: Any) -> dict[str, Any]:
        body = {"projectName": name or f"p-{uuid.uuid4().hex[:8]}", "projectDescription": "test", **fields}
        return dict(self.post("/htc/projects", body))

    def create_task(self, project_id: str, name: str | None = None) -> dict[str, Any]:
        body = {"taskName": name or f"t-{uuid.uuid4().hex[:8]}", "taskDescription": "test"}
        task = dict(self.post(f"/htc/projects/{project_id}/tasks", body))
        self.created_tasks.append((project_id, task["taskId"]))
        return task

    def project_and_task(self, **project_fields: Any) -> tuple[str, str]:
        project = self.create_project(**project_fields)
        task = self.create_task(project["projectId"])
        return project["projectId"], task["taskId"]

    @staticmethod
    def job_request(
        commands: list[str],
        *,
        batch_size: int = 1,
        envs: list[dict[str, str]] | None = None,
        max_retries: int | None = None,
        **definition: Any,
    ) -> dict[str, Any]:
        """One HTCJobSubmitRequest that runs ``commands`` on the local X86 region."""
        job_definition = {
            "imageName": "busybox:latest",
            "maxVCpus": 1,
            "maxMemory": 512,
            "commands": commands,
            "envs": envs or [],
            "execTimeoutSeconds": 600,
            "architecture": "X86",
            "priority": "ON_DEMAND_PRIORITY",
            **definition,
        }
        request: dict[str, Any] = {
            "jobName": "test-job",
            "batchSize": batch_size,
            "regions": [DEFAULT_REGION],
            "htcJobDefinition": job_definition,
        }
        if max_retries is not None:
            request["retryStrategy"] = {"maxRetries": max_retries}
        return request

    @staticmethod
    def task_path(project_id: str, task_id: str) -> str:
        return f"/htc/projects/{project_id}/tasks/{task_id}"

    def submit(
        self, project_id: str, task_id: str, *requests: dict[str, Any], group: str | None = None
    ) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"group": group} if group else {}
        result = self.post(f"{self.task_path(project_id, task_id)}/jobs/batch", list(requests), **params)
        assert isinstance(result, list) and len(result) == len(requests), result
        return result

    def submit_one(self, project_id: str, task_id: str, request: dict[str, Any], **kw: Any) -> dict[str, Any]:
        return self.submit(project_id, task_id, request, **kw)[0]

    def jobs(self, project_id: str, task_id: str, **params: Any) -> list[dict[str, Any]]:
        return self.list_all(f"{self.task_path(project_id, task_id)}/jobs", **params)

    def job(self, project_id: str, task_id: str, job_id: str) -> dict[str, Any]:
        return dict(self.get(f"{self.task_path(project_id, task_id)}/jobs/{job_id}"))

    def events(self, project_id: str, task_id: str, job_id: str) -> list[dict[str, Any]]:
        return self.list_all(f"{self.task_path(project_id, task_id)}/jobs/{job_id}/events")

    def logs(self, project_id: str, task_id: str, job_id: str, **params: Any) -> list[dict[str, Any]]:
        return self.list_all(f"{self.task_path(project_id, task_id)}/jobs/{job_id}/logs", **params)

    def log_lines(self, project_id: str, task_id: str, job_id: str) -> list[str]:
        """The job's log messages, oldest first."""
        return [e["message"] for e in self.logs(project_id, task_id, job_id, sort="asc", pageSize=10000)]

    def summary(self, project_id: str, task_id: str) -> dict[str, int]:
        body = self.get(f"{self.task_path(project_id, task_id)}/summary-statistics")
        return dict(body["jobStatuses"])

    def cancel(self, project_id: str, task_id: str, group: str | None = None) -> httpx.Response:
        params = {"group": group} if group else None
        return self.request(
            "POST", f"{self.task_path(project_id, task_id)}/jobs/cancel", expect=200, params=params
        )

    def cancel_created_tasks(self) -> None:
        """Best effort: cancel what the tasks made through this helper still run (test teardown)."""
        for project_id, task_id in self.created_tasks:
            with contextlib.suppress(httpx.HTTPError):
                self.client.post(f"{self.task_path(project_id, task_id)}/jobs/cancel")

    # -- waiting --------------------------------------------------------------------------

    def wait_jobs(
        self,
        project_id: str,
        task_id: str,
        predicate: Callable[[list[dict[str, Any]]], bool],
        *,
        timeout: float = 60,
        what: str = "jobs to reach the expected state",
        interval: float = 0.25,
        **params: Any,
    ) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            jobs = self.jobs(project_id, task_id, **params)
            if predicate(jobs):
                return jobs
            if time.monotonic() > deadline:
                counts = Counter(j["status"] for j in jobs)
                pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}; statuses: {dict(counts)}")
            time.sleep(interval)

    def wait_terminal(
        self, project_id: str, task_id: str, count: int, *, timeout: float = 60
    ) -> list[dict[str, Any]]:
        """Wait until the task has ``count`` jobs, all SUCCEEDED or FAILED."""
        return self.wait_jobs(
            project_id,
            task_id,
            lambda jobs: len(jobs) == count and all(j["status"] in TERMINAL_STATUSES for j in jobs),
            timeout=timeout,
            what=f"{count} jobs to finish",
        )

    def wait_admitted(
        self, project_id: str, task_id: str, *, timeout: float = 60, what: str = "every job to be admitted"
    ) -> list[dict[str, Any]]:
        """Wait until no job of the task is held in SUBMITTED_TO_RESCALE (the scheduler admitted all)."""
        return self.wait_jobs(
            project_id,
            task_id,
            lambda jobs: all(j["status"] != "SUBMITTED_TO_RESCALE" for j in jobs),
            timeout=timeout,
            what=what,
        )

    def assert_summary_matches_jobs(
        self, project_id: str, task_id: str, expected_total: int
    ) -> dict[str, int]:
        """The task summary has the seven statuses and equals a count of the job list."""
        jobs = self.jobs(project_id, task_id)
        summary = self.summary(project_id, task_id)
        assert set(summary) == set(JOB_STATUSES), summary
        counted = Counter(j["status"] for j in jobs)
        assert len(jobs) == expected_total, f"{len(jobs)} jobs listed, {expected_total} submitted"
        assert sum(summary.values()) == expected_total, summary
        assert summary == {s: counted.get(s, 0) for s in JOB_STATUSES}, (summary, dict(counted))
        return summary


class ProcessMarker:
    """A unique environment variable for job processes, to find them on the host afterwards.

    Pass ``marker.envs`` as a job's ``envs``: every process the job starts (and its children)
    inherits it, so :meth:`pids` finds them in ``/proc/*/environ`` even once they are orphaned.
    """

    name = "HTC_TEST_MARKER"

    def __init__(self) -> None:
        self.value = uuid.uuid4().hex
        self.envs = [{"name": self.name, "value": self.value}]
        self._needle = f"{self.name}={self.value}".encode()

    def pids(self) -> list[int]:
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    environ = f.read()
            except OSError:
                continue
            if self._needle in environ.split(b"\0"):
                found.append(int(entry))
        return found

    def kill_leftovers(self) -> None:
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def parse_instant(value: str) -> float:
    """Seconds since the epoch of an RFC 3339 UTC instant such as 2022-03-10T16:15:50.471Z."""
    assert isinstance(value, str) and value.endswith("Z"), f"not an RFC 3339 UTC instant: {value!r}"
    return datetime.fromisoformat(value[:-1] + "+00:00").timestamp()
