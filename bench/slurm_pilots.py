"""``python -m bench --workload slurm-pilots`` (or ``python -m bench.slurm_pilots``): N ``true``
jobs through openhtc on Slurm pilots, cold (no pilot running) and then warm (the pilots of the cold
run still alive), against the same jobs as a plain Slurm job array, all in one run on one private
single-node Slurm (bench/drivers/slurm_driver.py, which starts openhtc.testing.slurm's).

Figures: time from submit to the first job started (openhtc: the first job seen RUNNING or done),
jobs/s from submit to the last job done, and the time from the end of the work until the last
pilot has left ``squeue`` (scale to zero; the idle timeout is ``--idle-timeout``). Needs root and
Debian's slurm-wlm and munge. Nothing is asserted.

    python -m bench --workload slurm-pilots             # N=2,000; figures also in bench/results/
    python -m bench --workload slurm-pilots --smoke     # N=200
    python -m bench.slurm_pilots --jobs 200 --pilots 4  # its own options
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.common import log
from bench.server import OpenhtcServer, htc_binary

sys.path.insert(0, str(Path(__file__).parent / "drivers"))
from slurm_driver import Slurm

TERMINAL = ("SUCCEEDED", "FAILED")


def plain_array(slurm: Slurm, n: int) -> dict[str, float]:
    start = time.perf_counter()
    job = slurm.sbatch(f"--array=0-{n - 1}", "--wrap", "true")
    first = None
    while True:
        states = slurm.states(job)
        if first is None and any(s in ("RUNNING", "COMPLETING", "COMPLETED") for s in states):
            first = time.perf_counter() - start
        if not slurm.active(job):
            break
        time.sleep(0.05)
    elapsed = time.perf_counter() - start
    return {"first_start_s": first or elapsed, "jobs_per_s": n / elapsed, "seconds": elapsed}


def through_pilots(api: httpx.Client, project: str, n: int) -> dict[str, float]:
    task = api.post(f"/htc/projects/{project}/tasks", json={"taskName": "p", "taskDescription": "b"}).json()
    jobs = f"/htc/projects/{project}/tasks/{task['taskId']}"
    definition = {
        "imageName": "busybox:latest",
        "maxVCpus": 1,
        "maxMemory": 64,
        "commands": ["true"],
        "execTimeoutSeconds": 600,
        "architecture": "X86",
        "priority": "ON_DEMAND_PRIORITY",
    }
    body = [  # batches of at most 1,000 (the API's limit)
        {
            "jobName": "true",
            "batchSize": min(1000, n - i),
            "regions": ["AWS_US_EAST_1"],
            "htcJobDefinition": definition,
        }
        for i in range(0, n, 1000)
    ]
    start = time.perf_counter()
    api.post(jobs + "/jobs/batch", json=body).raise_for_status()
    first = None
    while True:
        counts = api.get(jobs + "/summary-statistics").json()["jobStatuses"]
        if first is None and counts.get("RUNNING", 0) + sum(counts.get(s, 0) for s in TERMINAL):
            first = time.perf_counter() - start
        if sum(counts.get(s, 0) for s in TERMINAL) >= n:
            break
        time.sleep(0.05)
    elapsed = time.perf_counter() - start
    return {
        "first_start_s": first or elapsed,
        "jobs_per_s": n / elapsed,
        "seconds": elapsed,
        "failed": counts.get("FAILED", 0),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=2000)
    p.add_argument("--pilots", type=int, default=2, help="--max-pilots (each offers --pilot-vcpus)")
    p.add_argument("--pilot-vcpus", type=int, default=1)
    p.add_argument("--idle-timeout", default="10s")
    p.add_argument("--json", type=Path, help="write the figures here too")
    args = p.parse_args(argv)
    n = args.jobs
    work = tempfile.mkdtemp(prefix="openhtc-bench-slurm-")
    Path(work).chmod(0o755)
    slurm = Slurm(work, cpus=2, max_array=n)
    out: dict[str, Any] = {"jobs": n, "pilots": args.pilots, "pilot_vcpus": args.pilot_vcpus}
    try:
        slurm.start()
        log("plain Slurm array")
        out["array"] = plain_array(slurm, n)
        env = {
            "SLURM_CONF": slurm.env["SLURM_CONF"],
            "PATH": slurm.env["PATH"],
            "OPENHTC_ALLOC_PERIOD_SECONDS": "0.5",
            "OPENHTC_ALLOC_AGENT_COMMAND": f"{shlex.quote(htc_binary())} agent --runtime process",
        }
        with OpenhtcServer(executor=False, env=env) as srv:
            key = (srv.data_dir / "admin-api-key").read_text().strip()
            subprocess.run(
                [htc_binary(), "alloc", "add", "slurm", "--region", "AWS_US_EAST_1", "--time-limit", "30m",
                 "--max-pilots", str(args.pilots), "--backlog", str(args.pilots),
                 "--pilot-vcpus", str(args.pilot_vcpus), "--idle-timeout", args.idle_timeout],
                env={**slurm.full_env, "OPENHTC_URL": srv.base_url, "OPENHTC_API_KEY": key}, check=True,
            )  # fmt: skip
            token = httpx.get(f"{srv.base_url}/api/v1/auth/token", headers={"Authorization": f"Token {key}"})
            headers = {"Authorization": f"Bearer {token.json()['tokenValue']}"}
            with httpx.Client(base_url=srv.base_url + "/api/v1", headers=headers, timeout=300) as api:
                body = {"projectName": "bench", "projectDescription": "slurm pilots"}
                project = api.post("/htc/projects", json=body).json()["projectId"]
                log("openhtc on pilots, cold")
                out["cold"] = through_pilots(api, project, n)
                log("openhtc on pilots, warm")
                out["warm"] = through_pilots(api, project, n)
                done = time.perf_counter()
                # every job in this private Slurm is a pilot now: wait until none is left
                while slurm.cmd("squeue", "-h", "-o", "%j").strip():
                    time.sleep(0.2)
                out["last_pilot_left_s"] = time.perf_counter() - done
    finally:
        slurm.stop()
    out["warm_vs_array"] = out["warm"]["jobs_per_s"] / out["array"]["jobs_per_s"]
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
