"""``python -m bench.htcctl_calls``: what one ``htcctl`` call costs, on local and SeaweedFS storage.

Starts an ``htc server`` per backend (``--storage local``, ``--storage seaweedfs``), bundles
``htcctl`` (``htc htcctl-bundle``) and runs each of ``upload``, ``list`` and ``download`` N times
as a job would (``/usr/bin/python3`` or this interpreter, a job's bearer token in the
environment). Prints the median wall time and client CPU time per call, and both as a ratio to
``python3 -c pass`` measured in the same run (the interpreter's own start: what no client can
save), so figures from a loaded machine stay comparable.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.common import stop_process
from bench.server import htc_binary
from openhtc.testing.postgres import free_port


def _start(storage: str, data_dir: Path) -> tuple[subprocess.Popen[bytes], str, str]:
    port = free_port()
    cmd = [htc_binary(), "server", "--data-dir", str(data_dir), "--port", str(port), "--storage", storage]
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENHTC_")}
    log = open(data_dir / "server.log", "wb")  # noqa: SIM115 - open while the server runs
    proc = subprocess.Popen(
        [*cmd, "--runtime", "process"], stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url, (data_dir / "admin-api-key").read_text().strip()
        except httpx.HTTPError:
            time.sleep(0.1)
    stop_process(proc)
    raise RuntimeError(f"htc server --storage {storage} did not start: see {data_dir}/server.log")


def _measure(cmd: list[str], env: dict[str, str], cwd: Path, n: int) -> tuple[float, float]:
    """Median wall and client CPU milliseconds of ``cmd``."""
    walls, cpus = [], []
    for _ in range(n):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        subprocess.run(cmd, env=env, cwd=cwd, check=True, capture_output=True)
        walls.append((time.perf_counter() - start) * 1000)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append((after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime) * 1000)
    return statistics.median(walls), statistics.median(cpus)


def run(n: int, python: str) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    work = Path(tempfile.mkdtemp(prefix="openhtc-bench-htcctl-"))
    try:
        bundle = work / "htcctl"
        subprocess.run([htc_binary(), "htcctl-bundle", str(bundle)], check=True, capture_output=True)
        (work / "in.txt").write_bytes(b"x" * 4096)
        for storage in ("local", "seaweedfs"):
            data = work / storage
            data.mkdir()
            proc, url, key = _start(storage, data)
            try:
                bearer = httpx.get(url + "/auth/token", headers={"Authorization": f"Token {key}"}).json()
                token = bearer["tokenValue"]
                auth = {"Authorization": f"Bearer {token}"}
                project = httpx.post(url + "/api/v1/htc/projects", json={"projectName": "b"}, headers=auth)
                pid = project.json()["projectId"]
                task = httpx.post(
                    f"{url}/api/v1/htc/projects/{pid}/tasks", json={"taskName": "t"}, headers=auth
                )
                env = {
                    "PATH": "/usr/bin:/bin", "HOME": str(work), "OPENHTC_API_URL": url + "/api/v1",
                    "RESCALE_HTC_BEARER_TOKEN": token, "RESCALE_HTC_PROJECT_ID": pid,
                    "RESCALE_HTC_TASK_ID": task.json()["taskId"],
                }  # fmt: skip
                base_wall, base_cpu = _measure([python, "-c", "pass"], env, work, n)
                for args in (["upload", "in.txt"], ["list"], ["download", "in.txt", "-d", "out"]):
                    wall, cpu = _measure([python, str(bundle), *args], env, work, n)
                    rows.append(
                        {
                            "storage": storage, "call": args[0], "wall_ms": round(wall, 1),
                            "cpu_ms": round(cpu, 1), "wall_vs_start": round(wall / base_wall, 2),
                            "cpu_vs_start": round(cpu / base_cpu, 2), "start_wall_ms": round(base_wall, 1),
                        }
                    )  # fmt: skip
            finally:
                stop_process(proc)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=20, help="calls of each kind (default 20)")
    default = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable
    parser.add_argument("--python", default=default, help=f"interpreter of the calls ({default})")
    parser.add_argument("--json", action="store_true", help="print JSON rows")
    args = parser.parse_args()
    rows = run(args.n, args.python)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'storage':10} {'call':9} {'wall ms':>8} {'cpu ms':>7} {'wall/start':>11} {'cpu/start':>10}")
    for r in rows:
        print(
            f"{r['storage']!s:10} {r['call']!s:9} {r['wall_ms']:>8} {r['cpu_ms']:>7} "
            f"{r['wall_vs_start']:>11} {r['cpu_vs_start']:>10}"
        )
    print(f"python3 -c pass (the start): {rows[0]['start_wall_ms']} ms wall")
    print(f"load average: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
