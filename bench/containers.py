"""W3 on openhtc: busybox `true` container jobs under ``htc server --runtime bwrap|podman``.

Two figures per run:

- jobs/s through the HTTP API: N jobs submitted at once to a server whose embedded registry
  holds the busybox image (pushed with the project's registry token, as a user would), from the
  first submit until all are terminal; the image pull is paid by a warm-up batch before.
- per-job overhead of the runtime itself: the same runtime driven in this process, one job
  after the other (no server, no HTTP), against a sequential loop of raw ``true`` spawns and of
  the bare container command of W3's runner (``bwrap ... /bin/true`` or ``podman run ...``):
  milliseconds per job and their ratios to ``true``. Twice for bwrap: with ``run`` (each job
  set up, run and tidied up before the next) and the way an executor slot drives it
  (``start(next, after=current)`` then ``finish(current)``: the next sandbox is set up while
  the current job runs).
"""

from __future__ import annotations

import io
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from bench import spawn
from bench.common import Profiler, Result, cpu_seconds, log
from bench.runners import RunnerUnavailable
from bench.server import Api, OpenhtcServer
from openhtc.runtimes.base import ImagePull, RunHandle
from openhtc.testing.images import busybox_rootfs_tar, podman_import, podman_push

IMAGE = "bb:1"


def _push_image(api: Api, work: Path) -> tuple[str, str]:
    """Push a busybox image into the project's namespace; returns (registry prefix, login token)."""
    project = api._ok(api.http.get(f"/htc/projects/{api.project}"))
    registry = project["containerRegistry"]  # host:port/{projectId}/
    token = api.http.get(f"/htc/projects/{api.project}/container-registry/token")
    token.raise_for_status()
    local = f"localhost/openhtc-bench-w3:{uuid.uuid4().hex[:8]}"
    podman_import(busybox_rootfs_tar(work / "rootfs.tar"), local)
    try:
        podman_push(local, f"{registry}{IMAGE}", token.text)
    finally:
        subprocess.run(["podman", "rmi", "-f", local], capture_output=True, check=False)
    return registry, token.text


class _ServerRegistry:
    """An ImageSource for an in-process runtime: pull tokens from the server's token endpoint."""

    def __init__(self, server: OpenhtcServer, registry: str, login: str) -> None:
        self.server, self.host, self.login = server, registry.split("/", 1)[0], login

    def pull_access(self, project_id: str, image_name: str) -> ImagePull:
        repo, _, tag = image_name.partition(":")
        repository = f"{project_id}/{repo}"
        resp = httpx.get(
            f"{self.server.base_url}/api/v1/htc/registry/token",
            params={"service": "openhtc-registry", "scope": f"repository:{repository}:pull"},
            auth=("AWS", self.login),
        )
        resp.raise_for_status()
        return ImagePull(
            f"http://{self.host}", f"{self.host}/{repository}:{tag}", repository, tag, "AWS",
            resp.json()["token"], True,
        )  # fmt: skip


def _launch(project_id: str, i: int) -> Any:
    from openhtc.domain.models import JobLaunch

    return JobLaunch(
        i, 1, f"bench:{i}", 1, i, project_id, "task", "local", IMAGE, ("true",), (), 1, 64, 1, 60, None
    )


def _runtime_ms(
    kind: str, work: str, source: _ServerRegistry, project_id: str, n: int
) -> tuple[float, float | None]:
    """Milliseconds per job of the runtime run in-process, one job after the other (image
    already cached): with ``run``, and pipelined as an executor slot drives it (None if the
    runtime is not pipelined)."""
    from openhtc.runtimes import build_runtime
    from openhtc.runtimes.base import Outcome, Pipelined

    runtime = build_runtime(kind, work, source)
    runtime.adopt(f"bench-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex)

    def check(out: Outcome) -> None:
        if not out.succeeded:
            raise RuntimeError(f"in-process {kind} job failed: {out}")

    try:

        def one(i: int) -> None:
            check(runtime.run(_launch(project_id, i), RunHandle(), io.StringIO, lambda: None))

        for i in range(min(5, n)):  # warm-up: the pull and the first scratch disks
            one(i)
        start = time.perf_counter()
        for i in range(n):
            one(100 + i)
        sequential = 1000 * (time.perf_counter() - start) / n
        if not isinstance(runtime, Pipelined):
            return sequential, None

        def begin(i: int, after: Any) -> Any:
            started = runtime.start(_launch(project_id, i), RunHandle(), io.StringIO, lambda: None, after)
            if isinstance(started, Outcome):
                check(started)
            return started

        start = time.perf_counter()
        current = begin(10_000, None)
        for i in range(1, n):
            following = begin(10_000 + i, current)
            check(runtime.finish(current))
            current = following
        check(runtime.finish(current))
        return sequential, 1000 * (time.perf_counter() - start) / n
    finally:
        runtime.close()


def openhtc_containers(ctx: Any, db: str, n: int) -> Result:
    work = Path(tempfile.mkdtemp(prefix="openhtc-bench-w3-"))
    try:
        return _measure(ctx, db, n, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _measure(ctx: Any, db: str, n: int, work: Path) -> Result:
    kind = ctx.container
    url = ctx.database_url(db)
    timeout = 120 + n / 5
    with OpenhtcServer(runtime=kind, database_url=url, vcpus=ctx.vcpus) as srv, srv.api() as api:
        api.new_task("warmup")
        registry, login = _push_image(api, work)
        api.submit_jobs(20, image=IMAGE)  # pulls and unpacks the image; not measured
        warm = api.wait_terminal(20, time.monotonic() + 300)
        if warm.get("SUCCEEDED", 0) != 20:
            raise RuntimeError(f"warm-up jobs did not succeed: {warm}\n{srv.log_tail()}")
        api.new_task("containers")
        profiler = Profiler(srv.pid, ctx.profile_path(f"containers-{kind}-{db}-{n}")) if ctx.profile else None
        try:
            cpu0 = cpu_seconds(srv.pid)
            start = time.perf_counter()
            api.submit_jobs(n, image=IMAGE)
            submitted = time.perf_counter()
            counts = api.wait_terminal(n, time.monotonic() + timeout)
            seconds = time.perf_counter() - start
            cpu1 = cpu_seconds(srv.pid)
        finally:
            if profiler is not None:
                profiler.stop()
        rss = srv.peak_rss_mb()
        # Per-job overhead, sequential and in-process, against raw spawns of `true`.
        per = max(20, min(200, n // 5)) if kind == "bwrap" else 20
        log(f"W3: {kind} runtime in-process, {per} sequential jobs")
        runtime_ms, pipelined_ms = _runtime_ms(
            kind, str(work / "runtime"), _ServerRegistry(srv, registry, login), api.project, per
        )
    true_ms = 1000 * spawn.spawn_loop(per * 5) / (per * 5)
    try:
        bare_ms: float | None = 1000 * spawn.spawn_loop(per, ctx.runner.argv()) / per
    except RunnerUnavailable:
        bare_ms = None
    cpu = cpu1 - cpu0 if cpu0 is not None and cpu1 is not None else None
    metrics = {
        "jobs_per_s": n / seconds,
        "seconds": seconds,
        "submit_s": submitted - start,
        "failed": counts.get("FAILED", 0),
        "peak_rss_mb": rss,
        "server_cpu_ms_per_job": 1000 * cpu / n if cpu is not None else None,
        "runtime_ms_per_job": runtime_ms,
        "bare_runner_ms_per_job": bare_ms,
        "true_ms_per_spawn": true_ms,
        "runtime_vs_true": runtime_ms / true_ms,
        "bare_runner_vs_true": bare_ms / true_ms if bare_ms else None,
        "runtime_vs_bare_runner": runtime_ms / bare_ms if bare_ms else None,
        "runtime_pipelined_ms_per_job": pipelined_ms,
        "runtime_pipelined_vs_bare_runner": pipelined_ms / bare_ms if bare_ms and pipelined_ms else None,
    }
    result = Result(
        "containers",
        "openhtc",
        db,
        n,
        "jobs_per_s",
        "jobs/s",
        metrics,
        params={
            "runtime": kind,
            "image": "busybox (podman import, pushed to the embedded registry)",
            "job": "commands ['true'], maxMemory 64, maxDiskGiB 10",
            "overhead": f"{per} jobs through the runtime in-process, one after the other (run; "
            "and pipelined: start(next, after=current), finish(current)); bare runner and true: "
            "posix_spawn + waitpid loops",
        },
    )
    if profiler is not None:
        result.params["profile"] = str(profiler.out)
    if counts.get("FAILED", 0):
        result.notes.append(f"{counts['FAILED']} job(s) FAILED")
    return result
