"""``python -m bench --workload crash``: kill -9 the server while it runs many short jobs.

N jobs (default 100,000, ``maxRetries`` 0) each leave one file per execution (``mktemp`` named
by the job and its attempt), so executions are counted from the host, not from what the server
says. The server
gets ``kill -9`` ``--kills`` times (default 5), evenly spread over the run (once that share of
the jobs has finished), and is restarted on the same data directory and database each time.
Once every job has ended, it reports, per database:

* lost jobs (submitted but missing from the job list) and counter mismatches (the task's
  summary against a count of the job list): both must be 0;
* executions per job; attempts executed more than once (must be 0: recovery never re-runs an
  attempt as itself); jobs executed more often than allowed, ``1 + maxRetries + the server's
  max_infrastructure_retries`` (must be 0); and jobs executed more than once whose events do not
  record a re-run after an infrastructure fault for each extra execution (must be 0);
* jobs re-run after an infrastructure fault (a kill while they may have started: no retry
  spent), and jobs failed with ``ErrorInfrastructureFault`` (their re-runs spent), split into
  those that had executed and those that had not yet (handed over, not yet spawned).

It exits non-zero if any job was lost or ran more often than allowed, or counters disagree.
Nothing here is timed against a target; the wall time is printed for information.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench.common import job_batches, log
from bench.context import Context
from bench.server import TERMINAL, Api, OpenhtcServer
from openhtc.config import Settings

MAX_RETRIES = 0
# the servers run with the default: re-runs after infrastructure faults spend no user retry
INFRA_RETRIES: int = Settings.model_fields["max_infrastructure_retries"].default


def run(ctx: Context, db: str, n: int, kills: int) -> dict[str, Any]:
    runs = Path(tempfile.mkdtemp(prefix="openhtc-bench-crash-"))
    srv = OpenhtcServer(runtime="process", database_url=ctx.database_url(db), vcpus=ctx.vcpus)
    began = time.monotonic()
    try:
        srv.start()
        api = srv.api()
        api.new_task("crash")
        body = job_batches(
            n,
            commands=[
                "sh",
                "-c",
                f'mktemp "{runs}/$RESCALE_JOB_ID.$AWS_BATCH_JOB_ATTEMPT.XXXXXX" >/dev/null',
            ],
        )
        for batch in body:
            batch["retryStrategy"] = {"maxRetries": MAX_RETRIES}
        parents = [(r["parentJobId"], b["batchSize"]) for r, b in zip(api.submit(body), body, strict=True)]
        deadline = time.monotonic() + max(600.0, n / 20)
        for k in range(1, kills + 1):
            target = n * k // (kills + 1)
            while _ended(api) < target:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{_ended(api)}/{n} jobs ended before kill {k}")
                time.sleep(0.02)
            srv.kill9()
            log(f"   kill -9 #{k} at {target} jobs ended; restarting")
            srv.restart()
            api = _reconnect(srv, api)
        api.wait_terminal(n, deadline)
        wall = time.monotonic() - began
        return _audit(api, runs, parents, n, kills, wall)
    finally:
        srv.stop()
        shutil.rmtree(runs, ignore_errors=True)


def _ended(api: Api) -> int:
    counts = api.statuses()
    return sum(counts.get(s, 0) for s in TERMINAL)


def _reconnect(srv: OpenhtcServer, old: Api) -> Api:
    old.close()
    api = srv.api()
    api.project, api.task = old.project, old.task
    return api


def _audit(
    api: Api, runs: Path, parents: list[tuple[str, int]], n: int, kills: int, wall: float
) -> dict[str, Any]:
    jobs = _list_jobs(api)
    summary = api.statuses()
    by_attempt = Counter(tuple(name.rsplit(".", 2)[:2]) for name in os.listdir(runs))
    ran: Counter[str] = Counter()
    for (job_id, _), count in by_attempt.items():
        ran[job_id] += count
    expected = {f"{parent}:{i}" for parent, size in parents for i in range(size)}
    rerun = [j for j in expected if ran[j] > 1]
    listed = Counter(j["status"] for j in jobs.values())
    mismatches = {s: (summary.get(s, 0), listed.get(s, 0)) for s in set(summary) | set(listed)}
    mismatches = {s: v for s, v in mismatches.items() if v[0] != v[1]}
    infra = [j for j in jobs.values() if j.get("failureCode") == "ErrorInfrastructureFault"]
    other_failures = Counter(
        j.get("failureCode") for j in jobs.values() if j["status"] == "FAILED" and j not in infra
    )
    return {
        "n": n,
        "kills": kills,
        "wall_s": round(wall, 1),
        "lost": len(expected - set(jobs)),
        "invented": len(set(jobs) - expected),
        "counter_mismatches": mismatches,
        "statuses": dict(listed),
        "executions_per_job": dict(sorted(Counter(ran[j] for j in expected).items())),
        "attempts_executed_twice": sum(1 for count in by_attempt.values() if count > 1),
        "over_allowed": sum(1 for j in expected if ran[j] > 1 + MAX_RETRIES + INFRA_RETRIES),
        "reruns_unrecorded": sum(1 for j in rerun if _infra_reruns(api, j) < ran[j] - 1),
        "executed_again_after_infra_fault": len(rerun),
        "succeeded_without_execution": sum(
            1 for j in expected if jobs.get(j, {}).get("status") == "SUCCEEDED" and not ran[j]
        ),
        "infra_fault_executed": sum(1 for j in infra if ran[j["jobUUID"]]),
        "infra_fault_not_executed": sum(1 for j in infra if not ran[j["jobUUID"]]),
        "other_failures": dict(other_failures),
    }


def _infra_reruns(api: Api, job_id: str) -> int:
    """How many re-runs after an infrastructure fault the job's events record."""
    url: str | None = f"/htc/projects/{api.project}/tasks/{api.task}/jobs/{job_id}/events?pageSize=1000"
    reruns = 0
    while url:
        page = api._ok(api.http.get(url))
        reruns += sum(
            1
            for e in page["items"]
            if e["status"] == "SUBMITTED_TO_RESCALE"
            and "after an infrastructure fault" in (e["statusReason"] or "")
        )
        url = page.get("next") or None
    return reruns


def _list_jobs(api: Api) -> dict[str, dict[str, Any]]:
    jobs: dict[str, dict[str, Any]] = {}
    url: str | None = f"/htc/projects/{api.project}/tasks/{api.task}/jobs?pageSize=1000"
    while url:
        page = api._ok(api.http.get(url))
        for job in page["items"]:
            jobs[job["jobUUID"]] = job
        url = page.get("next") or None
    return jobs


def failed(result: dict[str, Any]) -> list[str]:
    """What breaks the guarantee in one result (empty: it held)."""
    problems = []
    if result["lost"] or result["invented"]:
        problems.append(f"{result['lost']} job(s) lost, {result['invented']} invented")
    if result["counter_mismatches"]:
        problems.append(f"counters disagree with the job list: {result['counter_mismatches']}")
    if result["attempts_executed_twice"]:
        problems.append(f"{result['attempts_executed_twice']} attempt(s) executed more than once")
    if result["over_allowed"]:
        allowed = 1 + MAX_RETRIES + INFRA_RETRIES
        problems.append(
            f"{result['over_allowed']} job(s) executed more than {allowed} times"
            " (1 + maxRetries + max_infrastructure_retries)"
        )
    if result["reruns_unrecorded"]:
        problems.append(
            f"{result['reruns_unrecorded']} job(s) executed again without a re-run in their events"
        )
    if result["succeeded_without_execution"]:
        problems.append(f"{result['succeeded_without_execution']} job(s) SUCCEEDED without executing")
    return problems


def main(ctx: Context, dbs: list[str], n: int, kills: int) -> int:
    code = 0
    results = {}
    for db in dbs:
        log(f"CRASH / openhtc / {db} / N={n}, {kills} x kill -9")
        result = run(ctx, db, n, kills)
        results[db] = result
        problems = failed(result)
        log(f"   -> {json.dumps(result)}")
        if problems:
            code = 1
            log("   GUARANTEE BROKEN: " + "; ".join(problems))
    ctx.out.mkdir(parents=True, exist_ok=True)
    path = ctx.out / f"{ctx.stamp}-crash.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    log(f"wrote {path}")
    return code
