"""The workloads of the issue, their default sizes, baselines and targets."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Workload:
    name: str
    letter: str
    title: str
    sizes: tuple[int, ...]  # N for a full run
    smoke_sizes: tuple[int, ...]  # N for --smoke
    baseline: str | None  # the system whose figure every other system's is divided by
    target: dict[str, Any] | None  # see Result.target; "when" limits where it applies

    def describe_n(self) -> str:
        return {
            "control-plane": "jobs",
            "e2e": "jobs",
            "submit": "jobs in one call",
            "latency": "samples",
        }[self.name]


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload(
            "control-plane",
            "a",
            "Control-plane capacity, in-process no-op executor: jobs/s from submit to terminal",
            (10_000, 100_000),
            (2_000,),
            None,
            {
                "on": "value",
                "op": ">=",
                "value": 10_000,
                "text": ">= 10,000 jobs/s on SQLite",
                "when": {"db": "sqlite", "system": "openhtc", "min_n": 10_000},
            },
        ),
        Workload(
            "e2e",
            "b",
            "End-to-end `true` jobs over HTTP, process runtime: jobs/s and ratio to the spawn floor",
            (5_000,),
            (300,),
            "spawn-floor",
            {
                "on": "ratio",
                "op": ">=",
                "value": 0.80,
                "text": ">= 80 % of the spawn floor",
                "when": {"system": "openhtc"},
            },
        ),
        Workload(
            "submit",
            "c",
            "Time to submit a 100k-job batch (100 x batchSize 1000 in one call)",
            (100_000,),
            (10_000,),
            None,
            {
                "on": "value",
                "op": "<=",
                "value": 2.0,
                "text": "<= 2 s for 100k jobs",
                "when": {"system": "openhtc", "n": 100_000},
            },
        ),
        Workload(
            "latency",
            "d",
            "Submit -> SUCCEEDED latency of one `true` job on an idle server (p50, p99)",
            (200,),
            (20,),
            "spawn-floor",
            {"on": "value", "op": "<=", "value": 50.0, "text": "p50 <= 50 ms", "when": {"system": "openhtc"}},
        ),
    )
}
ALIASES = {w.letter: w.name for w in WORKLOADS.values()}


def resolve(names: str) -> list[Workload]:
    """'all', or a comma list of names or letters (a, b, c, d), in the issue's order."""
    if names.strip() == "all":
        return list(WORKLOADS.values())
    wanted = []
    for raw in names.split(","):
        name = ALIASES.get(raw.strip(), raw.strip())
        if name not in WORKLOADS:
            raise ValueError(f"unknown workload {raw!r}; choose from {', '.join(WORKLOADS)} or all")
        wanted.append(name)
    return [w for w in WORKLOADS.values() if w.name in wanted]


def target_for(workload: Workload, system: str, db: str, n: int) -> dict[str, Any] | None:
    target = workload.target
    if target is None:
        return None
    when = target.get("when", {})
    if "system" in when and when["system"] != system:
        return None
    if "db" in when and when["db"] != db:
        return None
    out = {k: v for k, v in target.items() if k != "when"}
    if ("n" in when and when["n"] != n) or ("min_n" in when and n < when["min_n"]):
        out["applies"] = False  # shown, but not judged: the target is defined for another N
    return out
