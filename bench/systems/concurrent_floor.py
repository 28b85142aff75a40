"""The concurrent floor of W3: the bare container command, as many at once as there are slots.

One loop of ``posix_spawn`` + ``waitpid`` per slot (``bench.spawn.parallel_spawn``), released
together: what the machine does when every CPU starts sandboxes, with nothing around them.
openhtc runs a job per executor slot and the peers a task per worker core, so this is the
floor they are measured against beside the sequential one (``spawn-floor``).
"""

from __future__ import annotations

from bench import spawn
from bench.common import Result
from bench.context import Context
from bench.runners import RunnerUnavailable


class ConcurrentFloor:
    name = "concurrent-floor"
    uses_db = False

    def supports(self, workload: str) -> bool:
        return workload == "containers"

    def run(self, workload: str, ctx: Context, db: str, n: int) -> Result:
        try:
            argv = ctx.runner.argv()
        except RunnerUnavailable as exc:
            return Result(workload, self.name, db, n, "", "", status="unavailable", notes=[str(exc)])
        spawn.spawn_loop(min(20, n), argv)  # warm-up
        seconds = spawn.parallel_spawn(n, ctx.slots, argv)
        return Result(
            workload,
            self.name,
            db,
            n,
            "jobs_per_s",
            "jobs/s",
            {"jobs_per_s": n / seconds, "seconds": seconds, "loops": ctx.slots},
            params={
                "command": " ".join(argv),
                "loop": f"{ctx.slots} loops of posix_spawn + waitpid at once, {n} spawns in all",
            },
        )
