"""``python -m bench --workload agents``: the control plane holding a fleet of agents.

Part 1, the simulated fleet (``bench/fleet.py``): ``--agents`` simulated agents (default 1,000;
smoke 50) with 100 slots each speak the real agent protocol, with a no-op runtime, to two
``htc server --no-executor`` on one private PostgreSQL (everything on this machine, loopback
only). Measured: the idle cost (the servers' CPU while the fleet long-polls with nothing queued),
then N trivial jobs (default 100,000; smoke 2,000) submitted at once: jobs/s from the first
submit until all are SUCCEEDED, exchange round trips p50/p99 (calls that carried work), the
servers' CPU per job, and PostgreSQL's connections (peak of ``pg_stat_activity``).

Part 2, real agents (needs root: network namespaces): W1 (N ``true`` jobs, process runtime)
through 4 ``htc agent`` processes, each in its own namespace (``htc cluster``'s code), against
the embedded executor's W1 in the same run, on PostgreSQL both, with the CPU per job of each
process and the exchanges per job. ``--workload agents-w1`` runs this part alone (N 5,000;
``--agents``: how many agents, 4; ``--profile``: py-spy on agent 0 and the server).

Targets (never asserted, judged in the report): >= 5,000 jobs/s, p99 <= 1 s, idle <= 5 % of a
core, W1 through 4 agents >= 0.8x the embedded executor's.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench.common import Profiler, cpu_seconds, log, machine
from bench.context import Context
from bench.server import Api, OpenhtcServer, htc_binary
from openhtc.testing.procstats import descendants

REPO = Path(__file__).resolve().parent.parent
REGION = "AWS_US_EAST_1"
POLL_SECONDS = 20.0  # the servers' agent_poll_seconds (its default): the longest long poll


def mint_agent_token(server: OpenhtcServer, agents: int = 100000) -> str:
    cmd = [
        htc_binary(), "admin", "create-agent-token", "--region", REGION, "--name", "bench-fleet",
        "--agents", str(agents),  # one token for the whole simulated fleet
        "--data-dir", str(server.data_dir), "--database-url", str(server.database_url),
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENHTC_")}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60, check=False)
    lines = [line.strip() for line in out.stdout.splitlines() if line.strip()]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"htc admin create-agent-token failed: {out.stdout}{out.stderr}")
    return lines[-1]


def _cpu(pids: list[int]) -> float:
    return sum(cpu_seconds(pid) or 0.0 for pid in pids)


def _pg_cpu(ctx: Context) -> float:
    """CPU seconds of the PostgreSQL postmaster and its live backends (pooled: they stay)."""
    pg = ctx._pg
    if pg is None:
        return 0.0
    try:
        postmaster = int((pg.data / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0
    return _cpu([postmaster, *descendants(postmaster)])


class _PgConnections:
    """Samples ``pg_stat_activity`` (client backends of the bench's database) in a thread: the
    peak of connections, and what the backends were doing at each sample (10 a second): running
    (CPU), waiting on a lock (which one, in which statement), or idle inside a transaction (the
    server's Python holds it open: its row locks too)."""

    def __init__(self, url: str) -> None:
        self.url, self.peak, self._stop = url, 0, threading.Event()
        self.states: Counter[str] = Counter()
        self.samples = 0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as conn:
            while not self._stop.wait(0.1):
                rows = conn.execute(
                    "SELECT state, wait_event_type, wait_event,"
                    " left(regexp_replace(query, '\\s+', ' ', 'g'), 50)"
                    " FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
                ).fetchall()
                self.peak = max(self.peak, len(rows))
                self.samples += 1
                for state, wtype, wevent, query in rows:
                    if state == "active":
                        what = f"waiting {wtype}:{wevent}" if wtype else "running"
                        self.states[f"{what} | {query}"] += 1
                    elif state == "idle in transaction":
                        self.states[f"idle in transaction | {query}"] += 1

    def summary(self, top: int = 12) -> dict[str, float]:
        """Backends in each state, on average over the samples (the busiest first)."""
        n = max(1, self.samples)
        return {k: round(v / n, 2) for k, v in self.states.most_common(top)}

    def __enter__(self) -> _PgConnections:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def simulated_fleet(
    ctx: Context, agents: int, slots: int, n: int, servers: int, idle_s: float
) -> dict[str, Any]:
    url = ctx.database_url("postgres")
    srvs = [OpenhtcServer(runtime="process", database_url=url, executor=False) for _ in range(servers)]
    work = Path(tempfile.mkdtemp(prefix="openhtc-bench-fleet-"))
    fleet: subprocess.Popen[bytes] | None = None
    try:
        srvs[0].start()
        for srv in srvs[1:]:  # one signing key for all (as cluster mode shares it)
            shutil.copytree(srvs[0].data_dir / "keys", srv.data_dir / "keys", dirs_exist_ok=True)
            srv.start()
        token = mint_agent_token(srvs[0])
        pids = [s.pid for s in srvs]
        cmd = [sys.executable, "-m", "bench.fleet", "--token", token, "--agents", str(agents),
               "--slots", str(slots), "--region", REGION, "--out", str(work / "fleet.json"),
               "--ready", str(work / "ready")]  # fmt: skip
        for srv in srvs:
            cmd += ["--url", srv.base_url]
        fleet_log = open(work / "fleet.log", "wb")  # noqa: SIM115 (closed below)
        fleet = subprocess.Popen(
            cmd, cwd=REPO, stdout=fleet_log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + 300
        while not (work / "ready").exists():
            if fleet.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the fleet did not register: {(work / 'fleet.log').read_text()[-2000:]}")
            time.sleep(0.2)
        log(f"   {agents} simulated agents registered in {(work / 'ready').read_text()} s (servers {pids})")
        # the first long polls (all sent at once) settle: each agent's has ended and been renewed
        # once, so the window sees the fleet's steady state, not its start
        time.sleep(3.0 if idle_s < 10 else POLL_SECONDS + 5.0)
        cpu0, fleet0, t0 = _cpu(pids), _cpu([fleet.pid]), time.monotonic()
        time.sleep(idle_s)
        idle_pct = 100.0 * (_cpu(pids) - cpu0) / (time.monotonic() - t0)
        fleet_idle_pct = 100.0 * (_cpu([fleet.pid]) - fleet0) / (time.monotonic() - t0)
        log(f"   idle: servers use {idle_pct:.2f} % of a core (the fleet {fleet_idle_pct:.1f} %)")
        api = srvs[0].api()
        api.new_task("agents")
        profiler = Profiler(pids[0], ctx.profile_path("agents-server0"), rate=100) if ctx.profile else None
        with _PgConnections(url) as pg:
            cpu0, fleet0, pg0, began = _cpu(pids), _cpu([fleet.pid]), _pg_cpu(ctx), time.monotonic()
            api.submit_jobs(n)
            counts = api.wait_terminal(n, time.monotonic() + max(600.0, n / 50))
            wall = time.monotonic() - began
            cpu = _cpu(pids) - cpu0
            fleet_cpu = _cpu([fleet.pid]) - fleet0
            fleet_pct = 100.0 * fleet_cpu / wall
            pg_cpu = _pg_cpu(ctx) - pg0
        if profiler is not None and (out := profiler.stop()) is not None:
            log(f"   profile of server 0 under load: {out}")
        groups = _group_counts(srvs)
        fleet.send_signal(signal.SIGTERM)
        fleet.wait(timeout=120)
        fleet_log.close()
        stats = json.loads((work / "fleet.json").read_text())
        return {
            "agents": agents, "slots": slots, "servers": servers, "n": n,
            "jobs_per_s": round(n / wall, 1), "wall_s": round(wall, 2),
            "succeeded": counts.get("SUCCEEDED", 0), "failed": counts.get("FAILED", 0),
            "rtt_p50_ms": stats["rtt_p50_ms"], "rtt_p99_ms": stats["rtt_p99_ms"],
            "claim_rtt_p50_ms": stats.get("claim_rtt_p50_ms"),
            "claim_rtt_p99_ms": stats.get("claim_rtt_p99_ms"),
            "server_cpu_ms_per_job": round(1000 * cpu / n, 3), "server_cpu_s": round(cpu, 2),
            "pg_connections_peak": pg.peak, "pg_backends": pg.summary(),
            "idle_cpu_pct": round(idle_pct, 2), "idle_s": idle_s,
            "pg_cpu_ms_per_job": round(1000 * pg_cpu / n, 3),
            "fleet_cpu_pct": round(fleet_pct, 1), "fleet_idle_cpu_pct": round(fleet_idle_pct, 1),
            "fleet_cpu_ms_per_job": round(1000 * fleet_cpu / n, 3),
            "calls_per_group": groups, "fleet": stats,
        }  # fmt: skip
    finally:
        if fleet is not None and fleet.poll() is None:
            fleet.kill()
        for i, srv in enumerate(srvs):
            with contextlib.suppress(OSError):  # kept for reading: warnings, lost agents
                ctx.out.mkdir(parents=True, exist_ok=True)
                shutil.copy(srv.log_path, ctx.out / f"agents-{ctx.stamp}-server{i}.log")
            srv.stop()
        shutil.rmtree(work, ignore_errors=True)


def _group_counts(srvs: list[OpenhtcServer]) -> float | None:
    """Exchanges per group commit over the servers' lives (None: a server without one)."""
    groups = calls = 0.0
    key = (srvs[0].data_dir / "admin-api-key").read_text().strip()  # the first server made it
    for srv in srvs:
        with Api(srv.base_url, key) as api:
            text = api.http.get("/htc/metrics").text
        found = {
            line.split()[0]: float(line.split()[1])
            for line in text.splitlines()
            if line.startswith("openhtc_agent_exchange_group")
        }
        if "openhtc_agent_exchange_groups_total" not in found:
            return None
        groups += found["openhtc_agent_exchange_groups_total"]
        calls += found.get("openhtc_agent_exchange_group_calls_total", 0.0)
    return round(calls / groups, 2) if groups else None


def _w1(api: Api, n: int) -> float:
    api.new_task("w1")
    began = time.monotonic()
    api.submit_jobs(n, commands=["true"])
    counts = api.wait_terminal(n, time.monotonic() + max(600.0, n / 5))
    if counts.get("SUCCEEDED", 0) != n:
        raise RuntimeError(f"W1: not every job succeeded: {counts}")
    return n / (time.monotonic() - began)


def _own_and_children(pid: int) -> tuple[float, float]:
    """CPU seconds of a process alone, and of its live descendants (its job launchers, with the
    jobs they reaped): a process's own figure includes only the children it reaped itself."""
    return cpu_seconds(pid) or 0.0, _cpu(descendants(pid))


def _pg_cpu_at(data: Path) -> float:
    try:
        postmaster = int((data / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0
    return _cpu([postmaster, *descendants(postmaster)])


def _cpu_sample(procs: dict[str, int], pg_data: Path | None) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, pid in procs.items():
        out[name], out[f"{name} launchers+jobs"] = _own_and_children(pid)
    out["postgres"] = _pg_cpu_at(pg_data) if pg_data is not None else 0.0
    return out


def _per_job_ms(before: dict[str, float], after: dict[str, float], n: int) -> dict[str, float]:
    return {k: round(1000 * (after[k] - before.get(k, 0.0)) / n, 3) for k in after}


def _metric(url: str, key: str, name: str) -> float | None:
    with Api(url, key) as api:
        text = api.http.get("/htc/metrics").text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def _exchanges(url: str, key: str) -> float | None:
    """The exchanges a server served in groups (an idle agent's answered at once are not)."""
    return _metric(url, key, "openhtc_agent_exchange_group_calls_total")


def _wait_registered(url: str, key: str, agents: int, timeout: float = 120.0) -> None:
    """Until every agent has registered: the embedded executor has when its server answers, so
    the agents' start (their imports, a few seconds on a busy machine) is not timed either."""
    deadline = time.monotonic() + timeout
    while (_metric(url, key, 'openhtc_executors{state="online"}') or 0) < agents:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the {agents} agents did not register within {timeout:.0f} s")
        time.sleep(0.2)


def real_agents(ctx: Context, n: int, agents: int = 4) -> dict[str, Any]:
    """W1 through ``agents`` real agents in namespaces vs the embedded executor, same run: jobs/s,
    and CPU per job of each process (the server, each agent, their launchers with the jobs,
    PostgreSQL). ``--profile``: py-spy records agent 0 and the cluster's server."""
    from openhtc.cluster.local import ClusterSpec, LocalCluster

    if os.geteuid() != 0:
        return {"skipped": "network namespaces need root"}
    probe = subprocess.run([htc_binary(), "agent", "--help"], capture_output=True, check=False)
    if probe.returncode != 0:
        return {"skipped": "this installation has no `htc agent`"}
    embedded = OpenhtcServer(runtime="process", database_url=ctx.database_url("postgres"))
    pg_data = ctx._pg.data if ctx._pg is not None else None
    try:
        embedded.start()
        api = embedded.api()
        before = _cpu_sample({"server": embedded.pid}, pg_data)
        embedded_rate = _w1(api, n)
        embedded_cpu = _per_job_ms(before, _cpu_sample({"server": embedded.pid}, pg_data), n)
    finally:
        embedded.stop()
    log(f"   embedded: {embedded_rate:.1f} jobs/s; CPU per job (ms) {embedded_cpu}")
    work = Path(tempfile.mkdtemp(prefix="openhtc-bench-agents-"))
    cluster = LocalCluster(ClusterSpec(directory=work, agents=agents, servers=1, runtime="process"))
    profiles: list[Profiler] = []
    try:
        cluster.up()
        assert cluster.state is not None
        procs = {"server": cluster.state.server_pids[0]}
        procs.update({f"agent{i}": pid for i, pid in enumerate(cluster.state.agent_pids)})
        cluster_pg = Path(cluster.state.pg_base) / "data"
        api = Api(cluster.url, cluster.api_key)
        started = time.monotonic()
        _wait_registered(cluster.url, cluster.api_key, agents)
        start_s = time.monotonic() - started  # what the W1 figure timed before (no longer)
        if ctx.profile:  # where they work, and (--idle) where their threads wait too
            for name in ("agent0", "server"):
                out = f"agents-w1-{name}"
                profiles.append(Profiler(procs[name], ctx.profile_path(out), rate=250))
                profiles.append(Profiler(procs[name], ctx.profile_path(f"{out}-idle"), rate=100, idle=True))
        calls0 = _exchanges(cluster.url, cluster.api_key)
        before = _cpu_sample(procs, cluster_pg)
        rate = _w1(api, n)
        agents_cpu = _per_job_ms(before, _cpu_sample(procs, cluster_pg), n)
        calls1 = _exchanges(cluster.url, cluster.api_key)
        for profiler in profiles:
            if (out := profiler.stop()) is not None:
                log(f"   profile: {out}")
    finally:
        for profiler in profiles:
            profiler.stop()
        cluster.down()
        shutil.rmtree(work, ignore_errors=True)
    exchanges = round((calls1 - calls0) / n, 3) if calls0 is not None and calls1 is not None else None
    log(
        f"   agents: {rate:.1f} jobs/s; CPU per job (ms) {agents_cpu}; exchanges per job {exchanges}; "
        f"registered {start_s:.1f} s after the cluster was up"
    )
    return {
        "n": n, "agents": agents, "agents_jobs_per_s": round(rate, 1),
        "embedded_jobs_per_s": round(embedded_rate, 1), "ratio": round(rate / embedded_rate, 3),
        "embedded_cpu_ms_per_job": embedded_cpu, "agents_cpu_ms_per_job": agents_cpu,
        "exchanges_per_job": exchanges, "load": os.getloadavg()[0], "agents_start_s": round(start_s, 2),
    }  # fmt: skip


def main_w1(ctx: Context, n: int | None, agents: int | None, command: str) -> int:
    """``--workload agents-w1``: the real-agent part alone (W1 through 4 agents vs embedded)."""
    load = os.getloadavg()[0]
    real = real_agents(ctx, n or (1_000 if ctx.smoke else 5_000), agents or 4)
    real["load_at_start"] = round(load, 2)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": command, "machine": machine()}
    ctx.out.mkdir(parents=True, exist_ok=True)
    (ctx.out / f"agents-w1-{ctx.stamp}.json").write_text(json.dumps({"real": real, "meta": meta}, indent=1))
    print(json.dumps(real, indent=1))
    return 0 if "ratio" in real else 1


TARGETS = (
    ("jobs/s with the simulated fleet", "jobs_per_s", ">=", 5000.0),
    ("exchange p99 (ms)", "rtt_p99_ms", "<=", 1000.0),
    ("idle fleet: servers' CPU (% of a core)", "idle_cpu_pct", "<=", 5.0),
)


def markdown(fleet: dict[str, Any], real: dict[str, Any], meta: dict[str, Any]) -> str:
    lines = [f"# openhtc agents benchmark, {meta['date']}", "", f"`{meta['command']}`", ""]
    lines += ["| figure | value | target |", "|---|---|---|"]
    for text, key, op, value in TARGETS:
        got = fleet.get(key)
        ok = got is not None and (got >= value if op == ">=" else got <= value)
        lines.append(f"| {text} | {got} | {op} {value:g} {'met' if ok else 'MISSED'} |")
    lines.append(f"| exchange p50 (ms) | {fleet.get('rtt_p50_ms')} | |")
    lines.append(
        f"| a claim with no reports that got leases, p50 / p99 (ms; a long poll: its wait for work"
        f" included) | {fleet.get('claim_rtt_p50_ms')} / {fleet.get('claim_rtt_p99_ms')} | |"
    )
    lines.append(f"| servers' CPU per job (ms) | {fleet.get('server_cpu_ms_per_job')} | |")
    lines.append(f"| PostgreSQL connections (peak) | {fleet.get('pg_connections_peak')} | |")
    lines.append(f"| exchanges per group commit (the servers' lives) | {fleet.get('calls_per_group')} | |")
    lines.append(f"| PostgreSQL's CPU per job (ms) | {fleet.get('pg_cpu_ms_per_job')} | |")
    backends = "; ".join(f"{v} {k}" for k, v in (fleet.get("pg_backends") or {}).items())
    lines.append(f"| PostgreSQL backends under load (average at once) | {backends} | |")
    lines.append(
        f"| the fleet's own CPU, run / idle (% of a core) | {fleet.get('fleet_cpu_pct')} / "
        f"{fleet.get('fleet_idle_cpu_pct')} | (100: the load generator is the bottleneck) |"
    )
    lines.append(f"| the fleet's own CPU per job (ms) | {fleet.get('fleet_cpu_ms_per_job')} | |")
    if "ratio" in real:
        ok = real["ratio"] >= 0.8
        lines.append(
            f"| W1 through {real['agents']} agents / embedded | {real['agents_jobs_per_s']} / "
            f"{real['embedded_jobs_per_s']} jobs/s = {real['ratio']} | >= 0.8 {'met' if ok else 'MISSED'} |"
        )
    elif real:
        lines.append(f"| W1 through real agents | {real} | |")
    lines += ["", f"{fleet['agents']} agents x {fleet['slots']} slots, {fleet['servers']} servers, "
              f"N = {fleet['n']}, wall {fleet['wall_s']} s; fleet: {json.dumps(fleet['fleet'])}"]  # fmt: skip
    return "\n".join(lines) + "\n"


def main(ctx: Context, n: int | None, agents: int | None, command: str, idle_s: float | None = None) -> int:
    smoke = ctx.smoke
    agents = agents or (50 if smoke else 1000)
    n = n or (2_000 if smoke else 100_000)
    idle_s = idle_s or (3.0 if smoke else 60.0)
    fleet = simulated_fleet(ctx, agents, 100, n, servers=2, idle_s=idle_s)
    log(f"   fleet: {fleet['jobs_per_s']} jobs/s, p99 {fleet['rtt_p99_ms']} ms")
    real = {} if smoke else real_agents(ctx, 5_000)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": command, "machine": machine()}
    text = markdown(fleet, real, meta)
    ctx.out.mkdir(parents=True, exist_ok=True)
    (ctx.out / f"agents-{ctx.stamp}.md").write_text(text)
    (ctx.out / f"agents-{ctx.stamp}.json").write_text(
        json.dumps({"fleet": fleet, "real": real, "meta": meta}, indent=1)
    )
    print(text)
    bad = fleet["succeeded"] != n
    return 1 if bad else 0
