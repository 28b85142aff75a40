"""The workloads of the issue (W1-W5, plus openhtc's control-plane capacity), their sizes,
baselines and targets. Every system runs the same job command for a workload (``command``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Target:
    """A goal from the issue, judged on one result (never asserted).

    ``on`` is a metric of the result (default: its figure) or ``vs:<system>``: the result's
    advantage over that system's figure in the same run (>1 = better; see ``Result.ratios``).
    ``when`` limits where it applies: ``system``, ``db``, ``n``, ``min_n``, ``container``.
    """

    text: str
    op: str  # ">=" or "<="
    value: float
    on: str | None = None
    when: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Workload:
    name: str
    id: str  # w1-w5, cp
    title: str
    sizes: tuple[int, ...]  # N for a full run
    smoke_sizes: tuple[int, ...]  # N for --smoke
    n_means: str
    higher_is_better: bool  # of the figure: jobs/s yes, seconds and ms no
    baseline: str | None = "spawn-floor"  # the floor every other system's figure is set against
    targets: tuple[Target, ...] = ()


SQLITE, PG = {"system": "openhtc", "db": "sqlite"}, {"system": "openhtc", "db": "postgres"}
BWRAP = {"container": "bwrap"}

WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload(
            "e2e",
            "w1",
            "N trivial `true` jobs, submitted at once: jobs/s from the first submit until all are done",
            (5_000,),
            (300,),
            "jobs",
            True,
            targets=(
                Target(">= 80 % of the spawn floor (SQLite)", ">=", 0.80, "vs:spawn-floor", SQLITE),
                Target(">= 2x HyperQueue (SQLite)", ">=", 2.0, "vs:hyperqueue", SQLITE),
                Target(">= HyperQueue (PostgreSQL)", ">=", 1.0, "vs:hyperqueue", PG),
            ),
        ),
        Workload(
            "sleep",
            "w2",
            "N jobs that each run `sleep 0.05` and request 1 vCPU: jobs/s (ideal: vCPUs / 0.05 s)",
            (1_000,),
            (40,),
            "jobs",
            True,
        ),
        Workload(
            "containers",
            "w3",
            "N container jobs (busybox `true` under --container: bwrap or podman): jobs/s",
            (1_000,),
            (50,),
            "jobs",
            True,
            targets=(
                Target(
                    ">= 100 jobs/s with bwrap", ">=", 100.0, None, {"system": "openhtc", "container": "bwrap"}
                ),
                Target(
                    ">= 1.1x the fastest peer (SQLite)", ">=", 1.1, "vs:fastest-peer", {**SQLITE, **BWRAP}
                ),
                Target(">= the fastest peer (PostgreSQL)", ">=", 1.0, "vs:fastest-peer", {**PG, **BWRAP}),
                Target(
                    "runtime in process <= 1.2x the bare runner",
                    "<=",
                    1.2,
                    "runtime_vs_bare_runner",
                    {"system": "openhtc", **BWRAP},
                ),
            ),
        ),
        Workload(
            "submit",
            "w4",
            "One submission of N jobs (batches of 1,000 in one call): time to accept it, then "
            "summary statistics, one page of jobs and server RSS",
            (1_000_000,),
            (10_000,),
            "jobs in one call",
            False,
            baseline=None,
            targets=(
                Target("accepted <= 5 s", "<=", 5.0, None, {"system": "openhtc", "n": 1_000_000}),
                Target("summary <= 10 ms", "<=", 10.0, "summary_ms", {"system": "openhtc", "n": 1_000_000}),
                Target("page <= 50 ms", "<=", 50.0, "page_ms", {"system": "openhtc", "n": 1_000_000}),
                Target("RSS <= 500 MB", "<=", 500.0, "rss_mb", {"system": "openhtc", "n": 1_000_000}),
            ),
        ),
        Workload(
            "latency",
            "w5",
            "Submit -> SUCCEEDED latency of single `true` jobs on an idle system: p50 (and p99)",
            (200,),
            (20,),
            "samples",
            False,
            targets=(
                Target("p50 <= 50 ms", "<=", 50.0, None, {"system": "openhtc"}),
                Target("p99 <= 200 ms", "<=", 200.0, "p99_ms", {"system": "openhtc"}),
                Target("pushed p50 <= 5 ms", "<=", 5.0, "pushed_p50_ms", {"system": "openhtc"}),
                Target("pushed p99 <= 20 ms", "<=", 20.0, "pushed_p99_ms", {"system": "openhtc"}),
            ),
        ),
        Workload(
            "control-plane",
            "cp",
            "Control-plane capacity (openhtc in one process, no-op runtime, no HTTP): jobs/s",
            (10_000, 100_000),
            (2_000,),
            "jobs",
            True,
            baseline=None,
            targets=(
                Target(">= 10,000 jobs/s (SQLite)", ">=", 10_000.0, None, {**SQLITE, "min_n": 10_000}),
                Target(">= 5,000 jobs/s (PostgreSQL)", ">=", 5_000.0, None, {**PG, "min_n": 10_000}),
            ),
        ),
        Workload(
            "functions",
            "fn",
            'N trivial Python handler calls (`return event["x"] * 2`) with their results fetched '
            "back: calls/s from the submit until the last result is read; p50/p99 of one call on an "
            "idle system beside it",
            (100_000,),
            (1_000,),
            "calls",
            True,
            baseline="bare-loop",
            targets=(
                Target(">= 10,000 calls/s (SQLite)", ">=", 10_000.0, None, {**SQLITE, "min_n": 100_000}),
                Target(">= 5,000 calls/s (PostgreSQL)", ">=", 5_000.0, None, {**PG, "min_n": 100_000}),
                Target(">= Dask", ">=", 1.0, "vs:dask", {"system": "openhtc"}),
                Target(">= Ray", ">=", 1.0, "vs:ray", {"system": "openhtc"}),
                Target("one call p50 <= 10 ms", "<=", 10.0, "call_p50_ms", {"system": "openhtc"}),
                Target("one call p99 <= 50 ms", "<=", 50.0, "call_p99_ms", {"system": "openhtc"}),
            ),
        ),
        Workload(
            "soak",
            "soak",
            "N container jobs (busybox `true` under --runtime) through one server; descriptors, "
            "threads and RSS of the server and its children sampled every N/10 jobs must stay flat",
            (100_000,),
            (1_000,),
            "jobs",
            True,
            baseline=None,
        ),
    )
}
ALIASES = {w.id: w.name for w in WORKLOADS.values()}

# The command every system runs per job (W3's comes from bench.runners).
COMMANDS: dict[str, list[str]] = {
    "e2e": ["true"],
    "sleep": ["sleep", "0.05"],
    "submit": ["true"],
    "latency": ["true"],
    "control-plane": ["true"],
    "soak": ["true"],
    "functions": [],  # a Python handler, not a command (bench/functions.py)
}
SLEEP_S = 0.05


def resolve(names: str) -> list[Workload]:
    """'all' (W1-W5, cp and fn; the soak runs only when named), or a comma list of names or ids
    (w1-w5, cp, fn, soak), in the issue's order."""
    if names.strip() == "all":
        return [w for w in WORKLOADS.values() if w.name != "soak"]
    wanted = []
    for raw in names.split(","):
        name = ALIASES.get(raw.strip().lower(), raw.strip())
        if name not in WORKLOADS:
            raise ValueError(
                f"unknown workload {raw!r}; choose from {', '.join(WORKLOADS)}, {', '.join(ALIASES)} or all"
            )
        wanted.append(name)
    return [w for w in WORKLOADS.values() if w.name in wanted]


def targets_for(workload: Workload, system: str, db: str, n: int, container: str) -> list[dict[str, Any]]:
    """The targets that concern one result; those defined for another N are kept but not judged."""
    out = []
    for t in workload.targets:
        when = t.when
        if when.get("system", system) != system or when.get("db", db) != db:
            continue
        if when.get("container", container) != container:
            continue
        applies = when.get("n", n) == n and n >= when.get("min_n", 0)
        out.append({"text": t.text, "op": t.op, "value": t.value, "on": t.on, "applies": applies})
    return out
