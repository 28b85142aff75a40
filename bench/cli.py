"""Command line of ``python -m bench``."""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from bench import report
from bench.common import DEFAULT_OUT, Result, log, machine
from bench.context import Context
from bench.systems import SYSTEMS
from bench.workloads import WORKLOADS, Workload, resolve, target_for
from openhtc.testing.postgres import PostgresUnavailable

RATIO_MEANING = {
    "e2e": "(b) openhtc jobs/s ÷ spawn-floor jobs/s (1.00 = as fast as a bare sequential spawn loop)",
    "latency": "(d) openhtc p50 ÷ spawn-floor p50 (how many bare spawn round trips one job's latency is)",
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="openhtc benchmarks. Each reports figures (and ratios to a baseline measured in "
        "the same run); none asserts a time.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="workloads:\n"
        + "\n".join(
            f"  {w.letter}  {w.name:<14} {w.title} [N: {', '.join(map(str, w.sizes))}; "
            f"smoke {', '.join(map(str, w.smoke_sizes))} {w.describe_n()}]"
            for w in WORKLOADS.values()
        ),
    )
    p.add_argument("--workload", default="all", help="all, or a comma list of names or letters a-d")
    p.add_argument("--n", help="N for every chosen workload, a comma list (e.g. 10000,100000)")
    p.add_argument("--db", choices=("sqlite", "postgres", "both"), default="both")
    p.add_argument("--systems", default="openhtc,spawn-floor", help=f"comma list of: {', '.join(SYSTEMS)}")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results directory [bench/results/]")
    p.add_argument("--smoke", action="store_true", help="small N everywhere (CI); well under 2 minutes")
    p.add_argument("--vcpus", type=int, help="executor vCPUs of the process-runtime servers (b, d)")
    p.add_argument("--profile", action="store_true", help="py-spy record the measured process of each run")
    return p.parse_args(argv)


def sizes(args: argparse.Namespace, workload: Workload) -> list[int]:
    if args.n:
        return [int(x.replace("_", "")) for x in args.n.split(",") if x.strip()]
    return list(workload.smoke_sizes if args.smoke else workload.sizes)


def run_one(system: str, workload: Workload, ctx: Context, db: str, n: int) -> Result:
    log(f"{workload.letter}) {workload.name} / {system} / {db} / N={n}")
    started = time.monotonic()
    try:
        result = SYSTEMS[system].run(workload.name, ctx, db, n)
    except PostgresUnavailable as exc:
        result = Result(workload.name, system, db, n, "", "", status="skipped", notes=[f"PostgreSQL: {exc}"])
    except Exception as exc:
        result = Result(
            workload.name, system, db, n, "", "", status="error", notes=[f"{type(exc).__name__}: {exc}"]
        )
    result.params.setdefault("wall_s", round(time.monotonic() - started, 1))
    shown = report.fmt(result.value, result.unit) if result.status == "ok" else result.status
    log(f"   -> {shown}" + (f" {'; '.join(result.notes)[:500]}" if result.status != "ok" else ""))
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workloads = resolve(args.workload)
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown:
        print(f"unknown system(s): {', '.join(unknown)}; choose from {', '.join(SYSTEMS)}", file=sys.stderr)
        return 2
    dbs = ["sqlite", "postgres"] if args.db == "both" else [args.db]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    ctx = Context(out=args.out, stamp=stamp, smoke=args.smoke, profile=args.profile, vcpus=args.vcpus)
    results: list[Result] = []
    began = time.monotonic()
    try:
        for workload in workloads:
            chosen = [s for s in systems if SYSTEMS[s].supports(workload.name)]
            if workload.baseline in chosen:  # the baseline runs first, right before what it judges
                chosen.remove(workload.baseline)
                chosen.insert(0, workload.baseline)
            for n in sizes(args, workload):
                baseline: Result | None = None
                for system in chosen:
                    for db in dbs if SYSTEMS[system].uses_db else ["-"]:
                        result = run_one(system, workload, ctx, db, n)
                        if system == workload.baseline:
                            baseline = result if result.status == "ok" else None
                        elif baseline is not None and result.status == "ok":
                            result.baseline = {
                                "system": baseline.system,
                                "figure": baseline.figure,
                                "value": baseline.value,
                                "unit": baseline.unit,
                            }
                            if baseline.value:
                                result.ratio = result.value / baseline.value
                                result.ratio_meaning = RATIO_MEANING.get(workload.name)
                        result.target = target_for(workload, system, db, n)
                        report.judge(result)
                        results.append(result)
    finally:
        ctx.close()
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": " ".join(["python -m bench", *(shlex.quote(a) for a in (argv or sys.argv[1:]))]),
        "machine": machine(),
        "args": {k: str(v) for k, v in vars(args).items()},
        "wall_s": round(time.monotonic() - began, 1),
        "notes": ctx.notes,
    }
    md_path, json_path = report.write(args.out, stamp, results, meta)
    print(report.markdown(results, meta))
    log(f"wrote {md_path} and {json_path} ({meta['wall_s']} s)")
    errors = [r for r in results if r.status == "error"]
    if errors:  # a benchmark that broke, never a missed target, fails the run
        log(
            f"{len(errors)} benchmark(s) failed: "
            + "; ".join(f"{r.workload}/{r.system}/{r.db}" for r in errors)
        )
        return 1
    return 0
