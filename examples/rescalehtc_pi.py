"""The pi sweep with Rescale's own Python client, the unmodified PyPI package ``rescalehtc``.

    pip install rescalehtc==1.1.0        # already in openhtc's dev extra
    OPENHTC_URL=http://127.0.0.1:8080 OPENHTC_API_KEY=... OPENHTC_PROJECT=<project ID> \\
        .venv/bin/python examples/rescalehtc_pi.py

The project must hold the image pi-demo:1 (examples/demo.sh builds it; push it with
``htc image push localhost/pi-demo:1 -p <project ID>``).

The client always talks to https://htc.rescale.com/api/v1; the one change is its base URL,
which is replaced the way the client's own tests do it. Everything else is the client as
Rescale ships it. Its status calls refresh at most every 15 seconds (a flood guard built into
the client), so this takes a little longer than examples/pi_sweep.py.
"""

from __future__ import annotations

import math
import os
import platform
import time

from pi_sweep import JOB  # the same job as examples/pi_sweep.py
from rescalehtc import HtcSession, htcjobs, htcprojects, htctasks

BASE_URL = os.environ.get("OPENHTC_URL", "http://127.0.0.1:8080").rstrip("/").removesuffix("/api/v1")
HtcSession.get_rescale_api_base_url = staticmethod(lambda: f"{BASE_URL}/api/v1")

# openhtc's executors offer the host's architecture; the client defaults to AARCH64.
ARCHITECTURE = "AARCH64" if platform.machine().lower() in ("aarch64", "arm64") else "X86"


def main() -> None:
    rescale = HtcSession(api_key=os.environ["OPENHTC_API_KEY"])
    project = htcprojects.get_project_with_id(rescale, os.environ["OPENHTC_PROJECT"])
    task = htctasks.create_task_with_name(rescale, project, "pi-sweep")
    batch = htcjobs.create_job_batch(
        rescale,
        task,
        batch_size=16,
        priority="ON_DEMAND_PRIORITY",
        image_name="pi-demo:1",
        exec_timeout_seconds=600,
        max_memory_mib=64,
        commands=["sh", "-c", JOB],
        envs=[{"name": "SAMPLES", "value": "500000"}],
        architecture=ARCHITECTURE,
    )
    print(f"submitted {batch.json['batchSize']} jobs, parent job {batch.json['parentJobId']}")
    while batch.is_still_running(rescale):
        print("  ", task.get_task_summary(rescale)["jobStatuses"])
        time.sleep(5)

    inside = samples = 0
    for job in batch.to_jobs():
        line = list(job.get_logs(rescale))[-1]
        print(f"{job.json['jobUUID']:40} {line}")
        fields = dict(item.split("=", 1) for item in line.split())
        inside += int(fields["inside"])
        samples += int(fields["samples"])
    estimate = 4 * inside / samples
    print(f"{samples} samples: pi ~ {estimate:.6f} (off by {abs(estimate - math.pi):.6f})")


if __name__ == "__main__":
    main()
