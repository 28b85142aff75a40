"""An ``htc server`` subprocess on a free port, and a thin HTTP client for the benchmarks."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from bench.common import job_batches, peak_rss_mb, stop_process
from openhtc.testing.postgres import free_port

TERMINAL = ("SUCCEEDED", "FAILED")


def htc_binary() -> str:
    beside = Path(sys.executable).parent / "htc"
    if beside.is_file():
        return str(beside)
    found = shutil.which("htc")
    if not found:
        raise RuntimeError("the 'htc' console script is not installed (pip install -e .)")
    return found


def parse_time(value: str | None) -> float | None:
    """The API's RFC 3339 timestamps ('...T03:04:05.678Z') -> epoch seconds."""
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


class OpenhtcServer:
    """``htc server`` in its own session, killed by PID (never by name) on exit."""

    def __init__(
        self,
        *,
        runtime: str = "process",
        database_url: str | None = None,
        executor: bool = True,
        vcpus: int | None = None,
        memory_mb: int | None = None,
        start_timeout: float = 90.0,
        env: dict[str, str] | None = None,
        command_prefix: list[str] | None = None,
    ) -> None:
        self.command_prefix = command_prefix  # runs ``htc``'s arguments instead (bench/lonetrace.py)
        self.extra_env = dict(env or {})  # settings beyond the above (OPENHTC_*), and SLURM_CONF
        self.runtime = runtime
        self.database_url = database_url
        self.executor = executor
        self.vcpus = vcpus
        self.memory_mb = memory_mb
        self.start_timeout = start_timeout
        self.data_dir = Path(tempfile.mkdtemp(prefix="openhtc-bench-srv-"))
        self.log_path = self.data_dir / "server.log"
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> OpenhtcServer:
        try:
            return self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> OpenhtcServer:
        self.port = free_port()
        cmd = [
            *(self.command_prefix or [htc_binary()]),
            "server",
            "--data-dir",
            str(self.data_dir),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--runtime",
            self.runtime,
        ]
        if self.database_url:
            cmd += ["--database-url", self.database_url]
        if not self.executor:
            cmd.append("--no-executor")
        env = {k: v for k, v in os.environ.items() if not k.startswith("OPENHTC_")}
        if self.vcpus:
            env["OPENHTC_EXECUTOR_VCPUS"] = str(self.vcpus)
        if self.memory_mb:
            env["OPENHTC_EXECUTOR_MEMORY_MB"] = str(self.memory_mb)
        env.update(self.extra_env)
        with open(self.log_path, "ab") as logf:  # a restart appends
            self.proc = subprocess.Popen(
                cmd,
                stdout=logf,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"htc server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.base_url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"htc server did not answer /health in {self.start_timeout}s:\n{self.log_tail()}")

    def kill9(self) -> None:
        """SIGKILL the server process only (its job launchers and jobs are left), as a crash."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def restart(self) -> OpenhtcServer:
        """Start again on the same data directory and database (on a new port)."""
        return self.start()

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def rows_pending(self) -> int:
        """Jobs accepted whose rows the server has yet to write (late materialization), read
        from its database directly: the API shows no difference, by design."""
        from sqlalchemy import create_engine, text

        from openhtc.config import Settings

        url = Settings(data_dir=self.data_dir, database_url=self.database_url).resolved_database_url()
        engine = create_engine(url)
        try:
            with engine.connect() as conn:
                pending = conn.execute(
                    text(
                        "SELECT COALESCE(SUM(batch_size - pending_from), 0) FROM batches"
                        " WHERE pending_from IS NOT NULL"
                    )
                ).scalar_one()
        finally:
            engine.dispose()
        return int(pending)

    def peak_rss_mb(self) -> float | None:
        return peak_rss_mb(self.pid) if self.proc is not None else None

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
        shutil.rmtree(self.data_dir, ignore_errors=True)

    def api(self) -> Api:
        key = (self.data_dir / "admin-api-key").read_text().strip()
        return Api(self.base_url, key)

    def __enter__(self) -> OpenhtcServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Api:
    """The few Rescale HTC calls the benchmarks make, over one keep-alive connection."""

    def __init__(self, base_url: str, api_key: str) -> None:
        self.http = httpx.Client(base_url=base_url, timeout=300.0)
        self.root = base_url.removesuffix("/").removesuffix("/api/v1")  # openhtc's /openhtc/v1 routes
        token = self.http.get("/auth/token", headers={"Authorization": f"Token {api_key}"})
        token.raise_for_status()
        self.http.headers["Authorization"] = f"Bearer {token.json()['tokenValue']}"
        self.project = ""
        self.task = ""

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Api:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _ok(self, response: httpx.Response) -> Any:
        if response.status_code >= 400:
            raise RuntimeError(
                f"{response.request.method} {response.request.url.path}: "
                f"{response.status_code} {response.text[:500]}"
            )
        return response.json()

    def new_task(self, name: str = "bench") -> str:
        """Create a project (on first use) and a task; returns the task id."""
        if not self.project:
            body = {"projectName": "bench", "projectDescription": "openhtc benchmarks"}
            self.project = self._ok(self.http.post("/htc/projects", json=body))["projectId"]
        body = {"taskName": name, "taskDescription": "benchmark"}
        self.task = self._ok(self.http.post(f"/htc/projects/{self.project}/tasks", json=body))["taskId"]
        return self.task

    @property
    def _jobs(self) -> str:
        return f"/htc/projects/{self.project}/tasks/{self.task}/jobs"

    def submit(self, body: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return self._ok(self.http.post(self._jobs + "/batch", json=body))  # type: ignore[no-any-return,unused-ignore]

    def submit_jobs(self, n: int, max_memory: int | None = 64, **definition: Any) -> list[dict[str, Any]]:
        """n jobs in batches of 1,000; ``definition``: job_batches' commands, image, max_vcpus."""
        return self.submit(job_batches(n, max_memory, **definition))

    def job(self, job_uuid: str) -> httpx.Response:
        return self.http.get(f"{self._jobs}/{job_uuid}")

    def wait_job(self, job_uuid: str, timeout: float = 30.0) -> httpx.Response:
        """openhtc's pushed wait: answers the moment the job has ended (or at ``timeout``)."""
        url = f"{self.root}/openhtc/v1/projects/{self.project}/tasks/{self.task}/jobs/{job_uuid}/wait"
        return self.http.get(url, params={"timeout": timeout})

    def run_job(self, request: dict[str, Any], timeout: float = 30.0) -> httpx.Response:
        """openhtc's submit-and-wait: one job submitted, answered once it has ended (404 on a
        server without the route)."""
        url = f"{self.root}/openhtc/v1/projects/{self.project}/tasks/{self.task}/jobs/run"
        return self.http.post(url, params={"timeout": timeout}, json=[request])

    def jobs_page(self, page_size: int = 100) -> httpx.Response:
        """The first page of the task's jobs (what a client's job listing fetches first)."""
        return self.http.get(self._jobs, params={"pageSize": page_size})

    def statuses(self) -> dict[str, int]:
        url = f"/htc/projects/{self.project}/tasks/{self.task}/summary-statistics"
        return self._ok(self.http.get(url))["jobStatuses"]  # type: ignore[no-any-return,unused-ignore]

    def wait_terminal(self, n: int, deadline: float) -> dict[str, int]:
        """Poll the task's counters until n jobs are SUCCEEDED or FAILED (or the deadline).

        Every poll costs the server a request, so the interval grows with the elapsed time
        (0.5 % of it, 10-100 ms): the end is seen to within 0.5 % without loading the server.
        """
        start = time.perf_counter()
        while True:
            counts = self.statuses()
            if sum(counts.get(s, 0) for s in TERMINAL) >= n:
                return counts
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {sum(counts.get(s, 0) for s in TERMINAL)}/{n} terminal: {counts}")
            time.sleep(min(0.1, max(0.01, 0.005 * (time.perf_counter() - start))))
