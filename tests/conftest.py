"""Fixtures that run the real ``htc server`` as a subprocess, on SQLite and on PostgreSQL.

Choosing the database
    ``pytest --db sqlite|postgres|both`` (or ``OPENHTC_TEST_DB``; default ``both``). Every test
    that uses ``db_url``, ``server`` or ``module_server`` runs once per chosen database.
    PostgreSQL is a private cluster started for the session (see ``openhtc.testing.postgres``); when its
    binaries are missing the PostgreSQL variants are skipped locally and fail when ``CI=true``.

Servers
    ``server`` is a fresh server for one test; ``module_server`` is shared by one test module
    (tests then isolate themselves by creating their own project and task); ``start_server``
    starts more, with extra environment or arguments. A server's combined stdout/stderr goes to
    ``<data_dir>/server.log``; when a test fails, the tail of every live server's log is attached
    to the report.

HTTP helpers
    ``server.api()`` returns an :class:`HtcApi`: an ``httpx.Client`` carrying a bearer token for
    the admin key, plus helpers for projects, tasks, submissions, paginated lists and bounded
    waits. All waits poll with a deadline; nothing sleeps for a fixed time to "let things settle".
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
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from openhtc.client import JOB_STATUSES, TERMINAL_STATUSES
from openhtc.testing.postgres import PostgresCluster, PostgresUnavailable, free_port

DB_CHOICES = ("sqlite", "postgres", "both")
DEFAULT_REGION = "AWS_US_EAST_1"
HEALTH_TIMEOUT = 30.0
IN_CI = os.environ.get("CI", "").lower() == "true"


# --------------------------------------------------------------------------------------------
# Options and database parametrization
# --------------------------------------------------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--db",
        action="store",
        choices=DB_CHOICES,
        default=os.environ.get("OPENHTC_TEST_DB", "both"),
        help="database(s) the server tests run against (env OPENHTC_TEST_DB; default: both)",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "crash: kills the server with SIGKILL and restarts it")
    config.addinivalue_line(
        "markers",
        "one_db: the feature does not depend on the database; run on the first of --db only "
        "(SQLite with --db both), to keep the suite short",
    )
    config.addinivalue_line(
        "markers",
        "second_workspace: needs a second workspace/tenant created through `htc admin`",
    )
    if config.getoption("--db") not in DB_CHOICES:
        raise pytest.UsageError(f"--db / OPENHTC_TEST_DB must be one of {', '.join(DB_CHOICES)}")


def _db_kinds(config: pytest.Config) -> list[str]:
    choice = config.getoption("--db")
    return ["sqlite", "postgres"] if choice == "both" else [choice]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "db_kind" in metafunc.fixturenames:
        # Session scope lets pytest group all tests of one database together, so module- and
        # session-scoped servers are started once per database.
        kinds = _db_kinds(metafunc.config)
        if metafunc.definition.get_closest_marker("one_db"):
            kinds = kinds[:1]
        metafunc.parametrize("db_kind", kinds, indirect=True, scope="session")


@pytest.fixture(scope="session")
def db_kind(request: pytest.FixtureRequest) -> str:
    """'sqlite' or 'postgres' (parametrized by --db)."""
    return str(request.param)


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PostgresCluster]:
    """A private PostgreSQL cluster for the whole session."""
    try:
        cluster = PostgresCluster()
    except PostgresUnavailable as exc:
        if IN_CI:
            pytest.fail(f"PostgreSQL is required in CI: {exc}")
        pytest.skip(f"PostgreSQL unavailable: {exc}")
    try:
        cluster.start()
    except Exception:
        cluster.stop()
        raise
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def pg_url_factory(pg_cluster: PostgresCluster) -> Callable[[], str]:
    """Returns a function creating a fresh, empty database and returning its URL."""
    return pg_cluster.new_database


def _fresh_db_url(db_kind: str, request: pytest.FixtureRequest) -> str | None:
    if db_kind == "sqlite":
        return None  # the server's embedded default: SQLite in its data dir
    cluster: PostgresCluster = request.getfixturevalue("pg_cluster")
    return cluster.new_database()


@pytest.fixture
def db_url(db_kind: str, request: pytest.FixtureRequest) -> str | None:
    """A fresh database for one server: None for SQLite, else a new PostgreSQL database URL."""
    return _fresh_db_url(db_kind, request)


# --------------------------------------------------------------------------------------------
# The server under test
# --------------------------------------------------------------------------------------------

_LIVE_SERVERS: list[HtcServer] = []


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
        if self not in _LIVE_SERVERS:
            _LIVE_SERVERS.append(self)

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
            time.sleep(0.1)
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

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 15 s) and close its clients."""
        for client in self._clients:
            client.close()
        self._clients.clear()
        if self.proc is not None:
            self._terminate()
        if self in _LIVE_SERVERS:
            _LIVE_SERVERS.remove(self)

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
        params = {"group": group} if group else {}
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


# --------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------


@pytest.fixture
def start_server(
    tmp_path_factory: pytest.TempPathFactory, db_kind: str, request: pytest.FixtureRequest
) -> Iterator[Callable[..., HtcServer]]:
    """Factory: ``start_server(db_url=..., env=..., args=..., runtime=...)``; a fresh database by default.

    Every server it starts is stopped at the end of the test.
    """
    started: list[HtcServer] = []

    def start(
        *,
        db_url: str | bool | None = True,
        env: dict[str, str] | None = None,
        args: tuple[str, ...] = (),
        runtime: str = "process",
    ) -> HtcServer:
        url = _fresh_db_url(db_kind, request) if db_url is True else (db_url or None)
        srv = HtcServer(tmp_path_factory.mktemp("htc-data"), url, env=env, args=args, runtime=runtime)
        started.append(srv)
        return srv.start()

    yield start
    for srv in started:
        srv.stop()


@pytest.fixture
def server(start_server: Callable[..., HtcServer]) -> HtcServer:
    """A fresh server for this test, on the parametrized database."""
    return start_server()


@pytest.fixture(scope="module")
def module_server(
    tmp_path_factory: pytest.TempPathFactory, db_kind: str, request: pytest.FixtureRequest
) -> Iterator[HtcServer]:
    """One server shared by the tests of a module (per database)."""
    srv = HtcServer(tmp_path_factory.mktemp("htc-data"), _fresh_db_url(db_kind, request))
    try:
        srv.start()
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def api(module_server: HtcServer) -> Iterator[HtcApi]:
    """Admin-authenticated raw-HTTP helpers on the module's shared server.

    Jobs of the tasks created through it are cancelled when the test ends, so a failing test
    leaves no work occupying the shared executor.
    """
    helper = module_server.api()
    yield helper
    if module_server.alive:
        helper.cancel_created_tasks()


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


@pytest.fixture
def marker() -> Iterator[ProcessMarker]:
    """A fresh ProcessMarker; whatever still carries it at the end of the test is killed."""
    mark = ProcessMarker()
    yield mark
    mark.kill_leftovers()


# --------------------------------------------------------------------------------------------
# Reporting: show the server logs of a failing test
# --------------------------------------------------------------------------------------------


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """In CI nothing may be skipped: a skipped test there fails the run (CI installs every tool)."""
    if not IN_CI or exitstatus != 0:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter is not None else []
    if skipped:
        reporter.write_line(f"CI=true: {len(skipped)} test(s) skipped; in CI that is a failure", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for srv in _LIVE_SERVERS:
            report.sections.append((f"openhtc server log {srv!r}", srv.log_tail()))


def parse_instant(value: str) -> float:
    """Seconds since the epoch of an RFC 3339 UTC instant such as 2022-03-10T16:15:50.471Z."""
    from datetime import datetime

    assert isinstance(value, str) and value.endswith("Z"), f"not an RFC 3339 UTC instant: {value!r}"
    return datetime.fromisoformat(value[:-1] + "+00:00").timestamp()


@pytest.fixture
def instant() -> Callable[[str], float]:
    """parse_instant as a fixture, for test modules (which should not import conftest)."""
    return parse_instant
