"""``python -m bench.dashboards``: what 20 open dashboards cost a running W1 batch.

W1 (N trivial ``true`` jobs in one submit, jobs/s until all are done) runs twice in one
server: once with nobody watching, once while ``--viewers`` signed-in dashboards follow the
running task the way a browser does (htmx asks for the live part of the task page every 2 s,
the overview every 3 s; one viewer in four also keeps a job page open, polling its log every
2 s). The figure is the same-run ratio of the two throughputs; the target is at most 5 %
slower. ``--rounds 2`` runs the pair twice in alternating order, which cancels the drift of a
long run. Nothing is asserted.

    python -m bench.dashboards                  # N=100,000, 20 viewers, SQLite
    python -m bench.dashboards --db postgres
    python -m bench.dashboards --smoke          # N=2,000, 20 viewers: well under a minute
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field

import httpx

from bench.common import log
from bench.server import Api, OpenhtcServer
from openhtc.testing.postgres import PostgresCluster

CSRF = re.compile(r'name="csrf" value="([^"]+)"')


@dataclass
class Viewers:
    """Threads that each sign in to the dashboard and poll like an open browser tab."""

    base_url: str
    api_key: str
    count: int
    project: str
    task: str
    job: str
    stop: threading.Event = field(default_factory=threading.Event)
    latencies: list[float] = field(default_factory=list)
    errors: int = 0

    def __post_init__(self) -> None:
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(self.count)]

    def _sign_in(self, http: httpx.Client) -> None:
        page = http.get("/ui/login")
        token = CSRF.search(page.text)
        assert token is not None, page.text[:300]
        resp = http.post("/ui/login", data={"api_key": self.api_key, "csrf": token[1]})
        assert resp.status_code == 303, resp.text[:300]

    def _run(self, index: int) -> None:
        task = f"/ui/projects/{self.project}/tasks/{self.task}"
        polls = [(task, 2.0), ("/ui/", 3.0)]
        if index % 4 == 0:
            polls.append((f"{task}/jobs/{self.job}/log", 2.0))
        with httpx.Client(base_url=self.base_url, timeout=60) as http:
            self._sign_in(http)
            for path, _ in polls:  # the page loads, then its polls
                http.get(path)
            due = {path: time.monotonic() + (index % 10) * every / 10 for path, every in polls}
            while not self.stop.is_set():
                path = min(due, key=due.__getitem__)
                if self.stop.wait(max(0.0, due[path] - time.monotonic())):
                    return
                start = time.perf_counter()
                resp = http.get(path, headers={"HX-Request": "true"})
                elapsed = time.perf_counter() - start
                with self.lock:
                    self.latencies.append(elapsed)
                    self.errors += resp.status_code >= 400
                due[path] += dict(polls)[path]

    def __enter__(self) -> Viewers:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=60)


def w1(api: Api, n: int, name: str, server: OpenhtcServer, viewers: int) -> dict[str, float]:
    api.new_task(name)
    [first] = api.submit_jobs(1)  # the job the log viewers follow (a page a browser has open)
    api.wait_terminal(1, time.monotonic() + 60)
    key = (server.data_dir / "admin-api-key").read_text().strip()
    watchers = Viewers(server.base_url, key, viewers, api.project, api.task, f"{first['parentJobId']}:0")
    with watchers if viewers else _Nothing():
        time.sleep(1.0 if viewers else 0.0)  # every viewer signed in and polling before the clock starts
        start = time.perf_counter()
        api.submit_jobs(n)
        api.wait_terminal(n + 1, time.monotonic() + 120 + n / 20)
        seconds = time.perf_counter() - start
    lat = sorted(watchers.latencies)
    return {
        "jobs_per_s": n / seconds,
        "seconds": seconds,
        "polls": len(lat),
        "poll_p50_ms": 1000 * statistics.median(lat) if lat else 0.0,
        "poll_p95_ms": 1000 * lat[int(0.95 * (len(lat) - 1))] if lat else 0.0,
        "errors": watchers.errors,
    }


class _Nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.dashboards", description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100_000, help="W1's jobs per run [100000]")
    parser.add_argument("--viewers", type=int, default=20, help="open dashboards [20]")
    parser.add_argument("--db", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--rounds", type=int, default=1, help="pairs of runs, in alternating order [1]")
    parser.add_argument("--smoke", action="store_true", help="N=2,000: a short check that it all works")
    args = parser.parse_args(argv)
    n = 2_000 if args.smoke else args.n
    cluster = None
    url = None
    if args.db == "postgres":
        cluster = PostgresCluster()
        cluster.start()
        url = cluster.new_database()
    rows: list[tuple[str, dict[str, float]]] = []
    try:
        with OpenhtcServer(runtime="process", database_url=url) as server, server.api() as api:
            api.new_task("warmup")
            api.submit_jobs(200)
            api.wait_terminal(200, time.monotonic() + 120)
            for round_ in range(args.rounds):
                order = [0, args.viewers] if round_ % 2 == 0 else [args.viewers, 0]
                for viewers in order:
                    label = f"{viewers} dashboards" if viewers else "nobody watching"
                    log(f"dashboards: W1 N={n}, {label} (round {round_ + 1})")
                    rows.append((label, w1(api, n, f"w1-{viewers}-{round_}", server, viewers)))
    finally:
        if cluster is not None:
            cluster.stop()
    alone = statistics.mean(r["jobs_per_s"] for label, r in rows if label == "nobody watching")
    watched = statistics.mean(r["jobs_per_s"] for label, r in rows if label != "nobody watching")
    print(f"W1 N={n} on {args.db}, {args.viewers} dashboards, {args.rounds} round(s)")
    print("| run | jobs/s | seconds | dashboard polls | poll p50 (ms) | poll p95 (ms) | errors |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, r in rows:
        print(
            f"| {label} | {r['jobs_per_s']:.0f} | {r['seconds']:.1f} | {r['polls']:.0f} "
            f"| {r['poll_p50_ms']:.1f} | {r['poll_p95_ms']:.1f} | {r['errors']:.0f} |"
        )
    ratio = watched / alone
    print(f"\nwatched / alone: {ratio:.3f} ({100 * (1 - ratio):+.1f} % slower; target <= 5 %)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
