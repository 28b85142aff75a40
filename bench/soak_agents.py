"""The agents' soak: N short jobs with logs, and function batches, through one ``htc server
--no-executor`` on PostgreSQL and two real ``htc agent`` processes (``--runtime``: process or
bwrap), sampling what the server and each agent hold (with their descendants) every N/10 jobs.

A leak per job passes every short test; here descriptors and threads must stay flat after the
first round (start-up noise allowed) and no job may fail, or ``python -m bench`` exits 1. The
report gives each figure's slope per 1,000 jobs (least squares over the rounds after the first).
Jobs print three lines each (shipped by the agents, kept in the database: ``log_store =
database``) and are submitted one per batch, as clients that submit a job per call do; each
round also maps a Python handler over a tenth as many events (warm workers on the agents, code
from a zip in the project's shared storage).
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import tempfile
import time
import uuid
import zipfile
from pathlib import Path
from typing import Any

from bench.common import log, machine
from bench.containers import IMAGE, _push_image
from bench.context import Context
from bench.server import TERMINAL, Api, OpenhtcServer, htc_binary
from openhtc.testing.agentproc import AgentProcess
from openhtc.testing.images import podman_import, podman_push, python_rootfs_tar
from openhtc.testing.soak import Sample, problems, slopes, soak, table

PY_IMAGE = "py:1"
HANDLER = "soakfn.double"
COMMAND = ["sh", "-c", "echo soak one; echo soak two; echo soak three"]


def _handlers_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("soakfn.py", 'def double(event, context):\n    return event["x"] * 2\n')
    return buf.getvalue()


def _push_python(api: Api, work: Path, registry: str, login: str) -> None:
    local = f"localhost/openhtc-bench-py:{uuid.uuid4().hex[:8]}"
    tar = python_rootfs_tar(work / "py.tar")
    podman_import(tar, local, changes=["ENV PATH=/usr/local/bin:/usr/bin:/bin"])
    try:
        podman_push(local, f"{registry}{PY_IMAGE}", login)
    finally:
        subprocess.run(["podman", "rmi", "-f", local], capture_output=True, check=False)


def run(ctx: Context, n: int, runtime: str, agents: int = 2, vcpus: int = 2) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="openhtc-bench-soak-agents-"))
    env = {"OPENHTC_LOG_STORE": "database"}
    url = ctx.database_url("postgres")
    server = OpenhtcServer(runtime=runtime, database_url=url, executor=False, env=env)
    started: list[AgentProcess] = []
    try:
        srv = server.start()
        with srv.api() as api:
            api.new_task("soak-agents")
            image = py_image = IMAGE  # the process runtime records the image and runs on the host
            if runtime != "process":
                registry, login = _push_image(api, work)
                _push_python(api, work, registry, login)
                py_image = PY_IMAGE
            code = f"/htc/storage/objects/projects/{api.project}/shared/handlers.zip"
            put = api.http.put(code, content=_handlers_zip())
            if put.status_code != 200:
                raise RuntimeError(f"uploading handlers.zip: {put.status_code} {put.text[:300]}")
            token = subprocess.run(
                [htc_binary(), "admin", "create-agent-token", "--agents", str(agents),
                 "--data-dir", str(srv.data_dir), "--database-url", str(srv.database_url)],
                capture_output=True, text=True, check=True,
            ).stdout.strip()  # fmt: skip
            for i in range(agents):
                where = work / f"agent-{i + 1}"
                started.append(
                    AgentProcess([htc_binary()], srv.base_url, token, where, runtime=runtime, vcpus=vcpus)
                )
            functions = f"{api.root}/openhtc/v1/projects/{api.project}/tasks/{api.task}/functions"

            def submit(k: int) -> int:
                # one job per batch, as clients that submit a job per call do: what an agent
                # keeps per batch (its environment) must not pile up either
                one = {"batchSize": 1, "htcJobDefinition": {"imageName": image, "commands": COMMAND,
                                                            "maxMemory": 64}}  # fmt: skip
                for start in range(0, k, 1000):
                    api.submit([one] * min(1000, k - start))
                calls = max(1, k // 10)
                body = {"image": py_image, "handler": HANDLER, "code": "handlers.zip",
                        "events": [{"x": i} for i in range(calls)]}  # fmt: skip
                api._ok(api.http.post(functions, json=body))
                return k + calls

            def finished() -> tuple[int, int]:
                counts = api.statuses()
                return sum(counts.get(s, 0) for s in TERMINAL), counts.get("FAILED", 0)

            def show(s: Sample) -> None:
                parts = [f"server fds {s.stats.fds} threads {s.stats.threads} RSS {s.stats.rss_mb:.0f} MB"]
                for name, st in s.others.items():
                    parts.append(
                        f"{name} fds {st.fds} threads {st.threads} RSS {st.rss_mb:.0f} MB "
                        f"(+{st.children} children: fds {st.child_fds} RSS {st.child_rss_mb:.0f} MB)"
                    )
                log(f"soak-agents {runtime}: {s.jobs:,} jobs, {s.jobs_per_s:.0f} jobs/s, {s.failed} failed; "
                    + "; ".join(parts))  # fmt: skip

            pids = {f"agent-{i + 1}": a.pid for i, a in enumerate(started)}
            began = time.monotonic()
            samples = soak(
                srv.pid, submit, finished, n, steps=10, timeout_per_job=0.5, on_sample=show, also=pids
            )
            seconds = time.monotonic() - began
            found = problems(samples, srv.pid, pids)
            page = api._ok(api.http.get(f"/htc/projects/{api.project}/tasks/{api.task}/jobs",
                                        params={"pageSize": 1000}))  # fmt: skip
            ran = {job.get("instanceId") for job in page["items"]}
            if len(ran) < agents:
                found.append(f"only {len(ran)} of the {agents} agents ran jobs")
    except BaseException:
        for a in started:
            log(f"{a.work_dir.name} log:\n{a.log(3000)}")
        log(f"server log:\n{server.log_tail()}")
        raise
    finally:
        for a in started:  # before the server: they drain through it
            a.stop()
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    return {
        "runtime": runtime,
        "n": n,
        "agents": agents,
        "seconds": round(seconds, 1),
        "jobs_per_s": round(n / seconds, 1),
        "failed": samples[-1].failed,
        "problems": found,
        "slopes_per_1000_jobs": slopes(samples),
        "tables": {who: table(samples, who) for who in ["server", *pids]},
    }


def markdown(outcome: dict[str, Any], meta: dict[str, Any]) -> str:
    lines = [f"# openhtc soak on agents, {meta['date']}", "", f"`{meta['command']}`", ""]
    lines.append(
        f"{outcome['runtime']}, N = {outcome['n']:,} jobs (plus a tenth as many function calls) through "
        f"{outcome['agents']} agents, {outcome['failed']} failed, {outcome['jobs_per_s']} jobs/s overall"
        f" ({outcome['seconds']} s). Problems: {'; '.join(outcome['problems']) or 'none'}."
    )
    lines += ["", "Slope per 1,000 jobs after the first round:", ""]
    lines += ["| process | fds | threads | RSS MB | child fds | child threads | child RSS MB |",
              "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for who, s in outcome["slopes_per_1000_jobs"].items():
        lines.append(
            f"| {who} | {s['fds']} | {s['threads']} | {s['rss_mb']} | {s['child_fds']} "
            f"| {s['child_threads']} | {s['child_rss_mb']} |"
        )
    for who, text in outcome["tables"].items():
        lines += ["", f"{who}:", "", text]
    return "\n".join(lines) + "\n"


def main(ctx: Context, n: int | None, runtime: str, command: str) -> int:
    n = n or (300 if ctx.smoke else 5_000)
    outcome = run(ctx, n, runtime)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": command, "machine": machine()}
    text = markdown(outcome, meta)
    ctx.out.mkdir(parents=True, exist_ok=True)
    (ctx.out / f"soak-agents-{ctx.stamp}.md").write_text(text)
    (ctx.out / f"soak-agents-{ctx.stamp}.json").write_text(json.dumps({**outcome, "meta": meta}, indent=1))
    print(text)
    if outcome["problems"]:
        log("soak-agents: " + "; ".join(outcome["problems"]))
        return 1
    return 0
