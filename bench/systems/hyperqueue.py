"""HyperQueue (PyPI ``hyperqueue``: ``LocalCluster``, its Rust server and worker in-process) as a
benchmark system; measured by ``bench/drivers/hyperqueue_driver.py``."""

from __future__ import annotations

from bench.systems.peer import PipPeer


class HyperQueue(PipPeer):
    name, driver, module, requirement = "hyperqueue", "hyperqueue_driver", "hyperqueue", "hyperqueue"
    notes = {
        w: [
            "HyperQueue's Python client polls job state once a second (wait_for_jobs): its view of "
            "the end lags by up to 1 s; jobs_per_s_upper uses the last poll that saw work left"
        ]
        for w in ("e2e", "sleep", "containers")
    }
    notes["latency"] = [
        "p50/p99: as HyperQueue's Python client sees it (1 s poll); task_done_*: submit until the "
        "task itself ends (it writes a marker file, polled every 1 ms), its best case"
    ]
    max_calls = 500
    notes_cap = "each function task starts a Python process (~6 calls/s on 2 cores)"
    notes["functions"] = [
        "HyperQueue Python function tasks (Job.function) return nothing to the client: measured "
        "without results coming back (its best case); the client sees the end by a 1 s poll"
    ]
    notes["submit"] = [
        "accept only: server and client share one process (LocalCluster), no worker; "
        "the Python API has no summary or listing call"
    ]
