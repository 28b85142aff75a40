"""Command line of ``python -m bench``."""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from bench import agents, crash, report
from bench.common import DEFAULT_OUT, Result, log, machine
from bench.context import Context
from bench.runners import RUNNERS
from bench.systems import PEERS, SYSTEMS
from bench.workloads import WORKLOADS, Workload, resolve
from openhtc.testing.postgres import PostgresUnavailable

DEFAULT_SYSTEMS = "openhtc,spawn-floor,concurrent-floor,bare-loop"  # the last two: W3, fn only


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="openhtc benchmarks, side by side with peers (HyperQueue, Dask, Ray, Slurm) "
        "on the same machine in the same run. Each reports figures and ratios to the other "
        "systems measured in that run; none asserts a time.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="workloads:\n"
        + "\n".join(
            f"  {w.id:<3} {w.name:<14} {w.title} [N: {', '.join(map(str, w.sizes))}; "
            f"smoke {', '.join(map(str, w.smoke_sizes))} {w.n_means}]"
            for w in WORKLOADS.values()
        )
        + "\n  crash          N short jobs (maxRetries 0), --kills x kill -9 and restart: lost jobs, "
        "counter mismatches, executions per job from marker files; exits 1 if the guarantee broke "
        "[N: 100000; smoke 2000]\n  agents         --agents simulated agents (100 slots each) on two servers "
        "--no-executor: jobs/s, exchange p50/p99, CPU per job, idle cost; W1 via 4 real agents in "
        "namespaces vs embedded [N: 100000, 1000 agents; smoke 2000, 50 agents]"
        "\n  agents-w1      the agents workload's real-agent part alone: W1 through --agents (4) "
        "htc agent processes in namespaces vs the embedded executor, CPU per job of each process "
        "(--profile: py-spy on agent 0 and the server) [N: 5000; smoke 1000]"
        "\n  soak-agents    N short jobs with logs and function batches through one server --no-executor "
        "on PostgreSQL and 2 real agents (--runtime process|bwrap): fds, threads, RSS of the server and "
        "each agent every N/10 jobs, slopes per 1,000 jobs; exits 1 if they grow [N: 5000; smoke 300]"
        "\n  slurm-pilots   N `true` jobs on Slurm pilots, cold and warm, vs a plain Slurm array in a "
        "private Slurm (bench/slurm_pilots.py; root) [N: 2000; smoke 200]",
    )
    p.add_argument(
        "--workload",
        default="all",
        help="all (not soak), or a comma list of names or ids (w1-w5, cp, fn, soak)",
    )
    p.add_argument("--n", help="N for every chosen workload, a comma list (e.g. 200 or 10000,100000)")
    p.add_argument("--db", choices=("sqlite", "postgres", "both"), default="both", help="openhtc's database")
    p.add_argument(
        "--systems", default=DEFAULT_SYSTEMS, help=f"comma list of: {', '.join(SYSTEMS)} [{DEFAULT_SYSTEMS}]"
    )
    p.add_argument(
        "--peers",
        action="store_true",
        help=f"add every peer ({', '.join(PEERS)}) to --systems; a missing one is installed first "
        "(pip into bench/.peers-venv, apt-get for Slurm)",
    )
    p.add_argument("--container", choices=RUNNERS, default="bwrap", help="W3's container runner [bwrap]")
    p.add_argument(
        "--runtime",
        choices=("bwrap", "podman", "process"),
        default="bwrap",
        help="the soak and soak-agents workloads' runtime [bwrap]",
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results directory [bench/results/]")
    p.add_argument("--chart", type=Path, help="also copy the run's PNG chart here (e.g. docs/img/peers.png)")
    p.add_argument("--smoke", action="store_true", help="small N everywhere (CI); well under a minute")
    p.add_argument("--vcpus", type=int, help="CPUs every system may use (openhtc executor vCPUs, peer cores)")
    p.add_argument("--profile", action="store_true", help="py-spy record openhtc's measured process")
    p.add_argument("--agents", type=int, help="agents workload: simulated agents [1000; smoke 50]")
    p.add_argument("--idle", type=float, help="agents workload: idle fleet window, s [60; smoke 3]")
    p.add_argument("--kills", type=int, default=5, help="crash workload: kill -9s spread over the run [5]")
    return p.parse_args(argv)


def sizes(args: argparse.Namespace, workload: Workload) -> list[int]:
    if args.n:
        return [int(x.replace("_", "")) for x in args.n.split(",") if x.strip()]
    return list(workload.smoke_sizes if args.smoke else workload.sizes)


def run_one(system: str, workload: Workload, ctx: Context, db: str, n: int) -> Result:
    log(f"{workload.id.upper()} {workload.name} / {system} / {db} / N={n}")
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


def choose_systems(args: argparse.Namespace) -> list[str]:
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    if args.peers:
        floors = ("openhtc", "spawn-floor", "concurrent-floor", "bare-loop")
        systems += [s for s in (*floors, *PEERS) if s not in systems]
    return systems


def run_crash(args: argparse.Namespace) -> int:
    n = int(args.n.replace("_", "")) if args.n else (2_000 if args.smoke else 100_000)
    ctx = Context(out=args.out, stamp=time.strftime("%Y%m%d-%H%M%S"), smoke=args.smoke, vcpus=args.vcpus)
    try:
        return crash.main(ctx, ["sqlite", "postgres"] if args.db == "both" else [args.db], n, args.kills)
    finally:
        ctx.close()


def run_agents(args: argparse.Namespace, argv: list[str] | None) -> int:
    n = int(args.n.replace("_", "")) if args.n else None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    ctx = Context(out=args.out, stamp=stamp, smoke=args.smoke, profile=args.profile)
    command = " ".join(["python -m bench", *(shlex.quote(a) for a in (argv or sys.argv[1:]))])
    try:
        return agents.main(ctx, n, args.agents, command, args.idle)
    finally:
        ctx.close()


def run_agents_w1(args: argparse.Namespace, argv: list[str] | None) -> int:
    n = int(args.n.replace("_", "")) if args.n else None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    ctx = Context(out=args.out, stamp=stamp, smoke=args.smoke, profile=args.profile)
    command = " ".join(["python -m bench", *(shlex.quote(a) for a in (argv or sys.argv[1:]))])
    try:
        return agents.main_w1(ctx, n, args.agents, command)
    finally:
        ctx.close()


def run_soak_agents(args: argparse.Namespace, argv: list[str] | None) -> int:
    from bench import soak_agents

    n = int(args.n.replace("_", "")) if args.n else None
    ctx = Context(out=args.out, stamp=time.strftime("%Y%m%d-%H%M%S"), smoke=args.smoke, runtime=args.runtime)
    command = " ".join(["python -m bench", *(shlex.quote(a) for a in (argv or sys.argv[1:]))])
    try:
        return soak_agents.main(ctx, n, args.runtime, command)
    finally:
        ctx.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.workload == "soak-agents":  # a resource soak of the agent path, not a side-by-side run
        return run_soak_agents(args, argv)
    if args.workload == "agents":  # the control plane and a fleet of agents, not a side-by-side run
        return run_agents(args, argv)
    if args.workload == "agents-w1":  # the real agents alone, against the embedded executor
        return run_agents_w1(args, argv)
    if args.workload == "crash":  # a correctness run, not a figure side by side with peers
        return run_crash(args)
    if args.workload == "slurm-pilots":  # openhtc on Slurm pilots against a plain Slurm array
        from bench import slurm_pilots

        jobs = args.n.replace("_", "") if args.n else ("200" if args.smoke else "2000")
        args.out.mkdir(parents=True, exist_ok=True)
        return slurm_pilots.main(["--jobs", jobs, "--json", str(args.out / "slurm-pilots.json")])
    try:
        workloads = resolve(args.workload)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    systems = choose_systems(args)
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown:
        print(f"unknown system(s): {', '.join(unknown)}; choose from {', '.join(SYSTEMS)}", file=sys.stderr)
        return 2
    dbs = ["sqlite", "postgres"] if args.db == "both" else [args.db]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    ctx = Context(
        out=args.out,
        stamp=stamp,
        smoke=args.smoke,
        profile=args.profile,
        vcpus=args.vcpus,
        container=args.container,
        runtime=args.runtime,
    )
    results: list[Result] = []
    began = time.monotonic()
    try:
        for workload in workloads:
            chosen = [s for s in systems if SYSTEMS[s].supports(workload.name)]
            for floor in ("concurrent-floor", workload.baseline):  # the floors run first
                if floor in chosen:
                    chosen.remove(floor)
                    chosen.insert(0, floor)
            for n in sizes(args, workload):
                for system in chosen:
                    for db in dbs if SYSTEMS[system].uses_db else ["-"]:
                        results.append(run_one(system, workload, ctx, db, n))
    finally:
        ctx.close()
    report.compare(results)
    for result in results:
        report.judge(result, args.container)
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": " ".join(["python -m bench", *(shlex.quote(a) for a in (argv or sys.argv[1:]))]),
        "machine": machine(),
        "args": {k: str(v) for k, v in vars(args).items()},
        "slots": ctx.slots,
        "wall_s": round(time.monotonic() - began, 1),
        "notes": [*ctx.notes, f"every system may use {ctx.slots} CPUs; W3 runs under {args.container}"],
    }
    md_path, json_path, png = report.write(args.out, stamp, results, meta, args.chart)
    print(report.markdown(results, meta))
    log(f"wrote {md_path}, {json_path}" + (f" and {png}" if png else "") + f" ({meta['wall_s']} s)")
    errors = [r for r in results if r.status == "error"]
    if errors:  # a benchmark that broke, never a missed target nor a peer that is unavailable, fails
        log(f"{len(errors)} benchmark(s) failed: " + "; ".join(f"{r.workload}/{r.label}" for r in errors))
        return 1
    return 0
