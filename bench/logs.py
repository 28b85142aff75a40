"""``python -m bench.logs``: the cost of one logs page against the size of the log.

A job's log is read with a seek from the page's cursor (``openhtc.services.logs``), so a page
of one line should cost the same for a 1 MB log as for a 100 MB one. For each size this starts
one job that writes a log of that size, then times pages of one line (newest first, as
``rescalehtc``'s ``last_n_lines`` asks; oldest first; and the page after the first, through its
``next``), and measures the server's peak memory while four clients read at once. Figures are
reported as ratios against the smallest log of the same run; nothing is asserted.

    python -m bench.logs                 # logs of 1, 10 and 100 MB
    python -m bench.logs --sizes 1,10    # a short run
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import log, peak_rss_mb
from bench.server import Api, OpenhtcServer

LINE_BYTES = 112  # "{stamp}\tline-NNNNNNN-{80 x}\n" as the job launcher writes it


def write_log_job(api: Api, megabytes: int) -> str:
    """Run one job whose log is about ``megabytes`` MB; returns its job id."""
    lines = max(1, megabytes * 1_000_000 // LINE_BYTES)
    command = f"seq -f 'line-%09.0f-{'x' * 78}' 1 {lines}"
    api.new_task(f"log-{megabytes}mb")
    [submitted] = api.submit_jobs(1, commands=["sh", "-c", command])
    api.wait_terminal(1, time.monotonic() + 600)
    return f"{submitted['parentJobId']}:0"


def timed(api: Api, url: str, params: dict[str, Any] | None, repeat: int) -> tuple[float, dict[str, Any]]:
    """Median milliseconds of ``repeat`` GETs, and the last body."""
    samples = []
    body: dict[str, Any] = {}
    for _ in range(repeat):
        start = time.perf_counter()
        resp = api.http.get(url, params=params)
        samples.append((time.perf_counter() - start) * 1000)
        resp.raise_for_status()
        body = resp.json()
    return statistics.median(samples), body


def measure(server: OpenhtcServer, api: Api, megabytes: int, repeat: int) -> dict[str, float]:
    job = write_log_job(api, megabytes)
    path = f"/htc/projects/{api.project}/tasks/{api.task}/jobs/{job}/logs"
    size = sum(f.stat().st_size for f in (server.data_dir / "logs" / api.task).rglob("*.log"))
    newest, _ = timed(api, path, {"pageSize": 1}, repeat)
    oldest, first = timed(api, path, {"pageSize": 1, "sort": "asc"}, repeat)
    second, _ = timed(api, first["next"], None, repeat)
    Path(f"/proc/{server.pid}/clear_refs").write_text("5")  # peak RSS := current RSS
    before = peak_rss_mb(server.pid) or 0.0
    readers = [
        threading.Thread(target=api.http.get, args=(path,), kwargs={"params": {"pageSize": 1, "sort": s}})
        for s in ("asc", "desc") * 2
    ]
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join()
    grown = (peak_rss_mb(server.pid) or 0.0) - before
    return {"mb": size / 1e6, "newest": newest, "oldest": oldest, "next": second, "rss": grown}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.logs", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1,10,100", help="log sizes in MB, a comma list")
    parser.add_argument("--repeat", type=int, default=20, help="requests timed per figure")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = []
    with OpenhtcServer(runtime="process") as server, server.api() as api:
        measure(server, api, sizes[0], args.repeat)  # warm-up: the first requests of a server are slower
        for megabytes in sizes:
            log(f"logs: a {megabytes} MB log")
            rows.append(measure(server, api, megabytes, args.repeat))
    base = rows[0]
    print("| log size | newest page (ms) | oldest page (ms) | second page (ms) | x smallest |", end="")
    print(" peak RSS +MiB (4 readers) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        ratio = max(row[k] / base[k] for k in ("newest", "oldest", "next"))
        print(
            f"| {row['mb']:.0f} MB | {row['newest']:.1f} | {row['oldest']:.1f} | {row['next']:.1f} "
            f"| {ratio:.2f} | {row['rss']:.1f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
