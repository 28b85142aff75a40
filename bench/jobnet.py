"""What ``--job-network openhtc`` costs a bwrap job: ``python -m bench.jobnet [N]``.

A bare sandbox as the bwrap runtime starts one (``bwrap --unshare-all`` over the host's root,
``--info-fd``/``--block-fd``, running ``true``) is started N times with no job network and N
times with ``openhtc`` (two endpoints, the API's and the S3 store's, as with SeaweedFS),
interleaved so drift hits both alike. Printed: milliseconds per job of each, their ratio, and
the set-up step alone (``JobNetwork.attach``: enter the job's netns, open the listeners, come
back, hand them to the forwarder), median and 95th percentile. Closing the listeners happens in
the forwarder thread when the sandbox ends, off the job's path.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time

from openhtc.runtimes.jobnet import Endpoint, JobNetwork


def _sandbox(bwrap: str, network: JobNetwork | None) -> tuple[float, float]:
    """Seconds for one sandbox from spawn to exit, and for its attach step (0 without)."""
    info_r, info_w = os.pipe()
    block_r, block_w = os.pipe()
    args = [
        bwrap, "--unshare-all", "--die-with-parent", "--new-session", "--ro-bind", "/", "/",
        "--proc", "/proc", "--dev", "/dev", "--info-fd", str(info_w), "--block-fd", str(block_r),
        "--", "/bin/true",
    ]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.Popen(args, pass_fds=(info_w, block_r), stdin=subprocess.DEVNULL)
    os.close(info_w)
    os.close(block_r)
    data = b""
    while chunk := os.read(info_r, 4096):
        data += chunk
    os.close(info_r)
    attach = 0.0
    if network is not None:
        t0 = time.perf_counter()
        network.attach(int(json.loads(data)["child-pid"]))
        attach = time.perf_counter() - t0
    os.write(block_w, b"go")
    os.close(block_w)
    if proc.wait() != 0:
        raise RuntimeError("the sandbox failed")
    return time.perf_counter() - start, attach


def main(n: int = 200) -> dict[str, float]:
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise SystemExit("bwrap is not installed")
    listeners = [socket.create_server(("127.0.0.1", 0)) for _ in range(2)]  # the API and S3
    network = JobNetwork("openhtc", [Endpoint("127.0.0.1", s.getsockname()[1]) for s in listeners])
    try:
        for _ in range(10):  # warm-up
            _sandbox(bwrap, None)
            _sandbox(bwrap, network)
        plain, forwarded, attach = [], [], []
        for _ in range(n):
            plain.append(_sandbox(bwrap, None)[0])
            total, step = _sandbox(bwrap, network)
            forwarded.append(total)
            attach.append(step)
    finally:
        network.close()
        for sock in listeners:
            sock.close()
    attach.sort()
    result = {
        "jobs": n,
        "none_ms_per_job": 1000 * statistics.mean(plain),
        "openhtc_ms_per_job": 1000 * statistics.mean(forwarded),
        "openhtc_vs_none": statistics.mean(forwarded) / statistics.mean(plain),
        "attach_ms_median": 1000 * statistics.median(attach),
        "attach_ms_p95": 1000 * attach[int(0.95 * (len(attach) - 1))],
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 200)
