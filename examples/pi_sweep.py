"""The pi sweep of examples/pi-sweep.yaml, driven from Python with ``openhtc.client``.

    OPENHTC_URL=http://127.0.0.1:8080 OPENHTC_API_KEY=$(cat ~/.local/share/openhtc/admin-api-key) \\
        .venv/bin/python examples/pi_sweep.py --project PROJECT_ID --jobs 16

Credentials come from the environment (``OPENHTC_URL``, ``OPENHTC_API_KEY``) or from
``htc login``. The project must hold the image (``--image``, default ``pi-demo:1``, which
examples/demo.sh builds; push it with ``htc image push localhost/pi-demo:1 -p PROJECT_ID``).
Creates a task, submits one batch whose jobs use ``AWS_BATCH_JOB_ARRAY_INDEX`` as their random
seed, waits, and combines the results.
"""

from __future__ import annotations

import argparse
import math

from openhtc.client import HtcError, NotFound, Session, StatusCounts

# The same job as examples/pi-sweep.yaml: one line of output per seed; needs only sh and awk.
JOB = (
    'awk -v seed="$AWS_BATCH_JOB_ARRAY_INDEX" -v n="$SAMPLES" \'BEGIN { srand(seed + 1);'
    " for (i = 0; i < n; i++) { x = rand(); y = rand(); if (x * x + y * y <= 1) inside++ }"
    ' printf "seed=%d samples=%d inside=%d pi=%.6f\\n", seed, n, inside, 4 * inside / n }\''
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=16, help="jobs in the sweep (one seed each)")
    parser.add_argument("--samples", type=int, default=500_000, help="random points per job")
    parser.add_argument("--project", required=True, help="the project ID holding the image")
    parser.add_argument("--image", default="pi-demo:1", help="imageName (default: pi-demo:1)")
    args = parser.parse_args()

    try:
        sweep(args)
    except HtcError as exc:  # one line, not a traceback: the server says what is wrong
        raise SystemExit(f"pi_sweep: {exc}") from None


def sweep(args: argparse.Namespace) -> None:
    with Session() as htc:
        project = htc.project(args.project)
        task = project.create_task("pi-sweep")
        try:
            batch = task.submit(
                args.image,
                ["sh", "-c", JOB],
                batch_size=args.jobs,
                envs={"SAMPLES": str(args.samples)},
                max_memory=64,
                exec_timeout=600,
                retries=1,
            )
        except NotFound as exc:
            task.delete()
            raise SystemExit(
                f"pi_sweep: {exc}\npush the image first: htc image push localhost/pi-demo:1 -p {project.id} "
                "(examples/demo.sh builds it)"
            ) from None
        print(f"submitted {batch.batch_size} jobs to task {task.id} (project {project.id})")

        seen: list[int] = []

        def progress(counts: StatusCounts) -> None:
            if not seen or counts.finished != seen[-1]:
                print(f"  {counts.finished}/{counts.total} finished, {counts.failed} failed")
                seen.append(counts.finished)

        counts = batch.wait(poll=0.5, on_progress=progress)
        if counts.failed:
            raise SystemExit(f"{counts.failed} job(s) failed; see `htc jobs -p {project.id} -t {task.id}`")

        inside = samples = 0
        for job in batch.jobs():
            line = job.logs()[-1]
            print(f"{job.id:40} {line}")
            fields = dict(item.split("=", 1) for item in line.split())
            inside += int(fields["inside"])
            samples += int(fields["samples"])
        estimate = 4 * inside / samples
        off = abs(estimate - math.pi)
        print(f"{batch.batch_size} jobs, {samples} samples: pi ~ {estimate:.6f} (off by {off:.6f})")


if __name__ == "__main__":
    main()
