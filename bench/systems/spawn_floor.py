"""The raw ``os.posix_spawn`` baseline: e2e throughput floor and single-spawn latency."""

from __future__ import annotations

from bench import spawn
from bench.common import Result, percentile
from bench.context import Context


class SpawnFloor:
    name = "spawn-floor"
    uses_db = False

    def supports(self, workload: str) -> bool:
        return workload in ("e2e", "latency")

    def run(self, workload: str, ctx: Context, db: str, n: int) -> Result:
        if workload == "e2e":
            figures = spawn.floor(n)
            return Result(
                workload,
                self.name,
                db,
                n,
                "jobs_per_s",
                "jobs/s",
                dict(figures),
                params={"loop": "posix_spawn(true) + waitpid, sequential", "binary": spawn.true_path()},
                notes=[
                    f"{figures['parallel_loops']} parallel loops: "
                    f"{figures['parallel_jobs_per_s']:.0f} jobs/s (the machine's ceiling)"
                ],
            )
        samples = spawn.spawn_latencies(max(n, 200))
        ms = [s * 1000 for s in samples]
        return Result(
            workload,
            self.name,
            db,
            len(ms),
            "p50_ms",
            "ms",
            {"p50_ms": percentile(ms, 50), "p99_ms": percentile(ms, 99), "max_ms": max(ms)},
            params={"loop": "one posix_spawn(true) + waitpid per sample"},
        )
