"""The raw ``os.posix_spawn`` baseline: what this machine can do with nothing around the jobs.

- W1, W3: a sequential loop of posix_spawn + waitpid of the workload's command (the issue's
  "physical floor"); one loop per slot is reported beside it as the machine's ceiling.
- W2: one loop per slot (each job holds a vCPU for 50 ms, so the floor runs them side by side,
  like every system does); the ideal is slots / 0.05 s.
- W5: one spawn + wait round trip per sample.
"""

from __future__ import annotations

from bench import spawn
from bench.common import Result, percentile
from bench.context import Context
from bench.runners import RunnerUnavailable
from bench.workloads import COMMANDS, SLEEP_S


class SpawnFloor:
    name = "spawn-floor"
    uses_db = False

    def supports(self, workload: str) -> bool:
        return workload in ("e2e", "sleep", "containers", "latency")

    def run(self, workload: str, ctx: Context, db: str, n: int) -> Result:
        if workload == "latency":
            samples = max(n, 200)
            ms = [s * 1000 for s in spawn.spawn_latencies(samples)]
            return Result(
                workload,
                self.name,
                db,
                n,
                "p50_ms",
                "ms",
                {"p50_ms": percentile(ms, 50), "p99_ms": percentile(ms, 99), "max_ms": max(ms)},
                params={"loop": "one posix_spawn(true) + waitpid per sample", "samples": samples},
            )
        if workload == "containers":
            try:
                argv = ctx.runner.argv()
            except RunnerUnavailable as exc:
                return Result(workload, self.name, db, n, "", "", status="unavailable", notes=[str(exc)])
        else:
            argv = COMMANDS[workload]
        params = {"command": " ".join(argv)}
        if workload == "sleep":  # jobs hold a vCPU each: the floor is one loop per slot
            seconds = spawn.parallel_spawn(n, ctx.slots, argv)
            metrics = {
                "jobs_per_s": n / seconds,
                "seconds": seconds,
                "ideal_jobs_per_s": ctx.slots / SLEEP_S,
                "efficiency": n / seconds / (ctx.slots / SLEEP_S),
            }
            params["loop"] = f"{ctx.slots} parallel loops of posix_spawn + waitpid"
            return Result(workload, self.name, db, n, "jobs_per_s", "jobs/s", metrics, params=params)
        figures = spawn.floor(n, argv, loops=ctx.slots)
        params["loop"] = "posix_spawn + waitpid, sequential"
        return Result(
            workload,
            self.name,
            db,
            n,
            "jobs_per_s",
            "jobs/s",
            dict(figures),
            params=params,
            notes=[
                f"{figures['parallel_loops']} parallel loops: "
                f"{figures['parallel_jobs_per_s']:.0f} jobs/s (the machine's ceiling)"
            ],
        )
