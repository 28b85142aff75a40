"""Map a Lambda-style handler over 10,000 events in a container image and combine the results.

    export OPENHTC_URL=http://127.0.0.1:8080 OPENHTC_API_KEY=$(cat .htc-demo/admin-api-key)
    .venv/bin/python examples/functions/map_montecarlo.py --project PROJECT_ID --build-image

``--build-image`` makes a small python3 image offline (the host's python3 and standard library on
a busybox root filesystem: ``openhtc.testing.images.python_rootfs_tar``), imports it into podman
as ``localhost/mc-python:1`` and pushes it to the project's registry with ``htc image push``;
later runs can skip it. The handler (examples/functions/montecarlo.py) goes to the project's
shared storage as ``montecarlo.zip``, as HTC-Grid ships ``lambda.zip``. Each of the ``--events``
calls prices a European call option by Monte Carlo over ``--paths`` paths with its own seed; the
script combines them into one price with its standard error, beside the Black-Scholes value.
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from openhtc.client import FunctionError, HtcError, Session
from openhtc.client.storage import StorageClient

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from montecarlo import black_scholes_call  # noqa: E402  (the handler's module, beside this file)

OPTION = {"spot": 100.0, "strike": 105.0, "rate": 0.03, "vol": 0.2, "years": 1.0}


def build_image(project_id: str, local_name: str) -> None:
    """A python3 image made offline, imported into podman and pushed to the project's registry."""
    from openhtc.testing.images import podman_import, python_rootfs_tar

    with tempfile.TemporaryDirectory() as tmp:
        tar = python_rootfs_tar(Path(tmp) / "rootfs.tar")
        podman_import(tar, local_name, changes=["ENV PATH=/usr/bin:/bin"])
    htc = Path(sys.executable).parent / "htc"
    subprocess.run([str(htc), "image", "push", local_name, "-p", project_id], check=True)


def upload_handler(session: Session, project_id: str) -> str:
    """montecarlo.py, zipped into the project's shared storage; returns the zip's name there."""
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp) / "montecarlo.zip"
        with zipfile.ZipFile(archive, "w") as zf:
            zf.write(HERE / "montecarlo.py", "montecarlo.py")
        with StorageClient.for_project(session.connection, project_id) as store:
            store.upload(archive, store.resolve("montecarlo.zip"))
    return "montecarlo.zip"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--project", required=True, help="the project ID (its registry holds the image)")
    parser.add_argument("--image", default="localhost/mc-python:1", help="the image [localhost/mc-python:1]")
    parser.add_argument("--build-image", action="store_true", help="build and push the image first")
    parser.add_argument("--events", type=int, default=10_000, help="handler calls [10000]")
    parser.add_argument("--paths", type=int, default=200, help="Monte Carlo paths per call [200]")
    args = parser.parse_args()
    if args.build_image:
        build_image(args.project, args.image)
    image = args.image.removeprefix("localhost/")  # its name in the project's registry
    try:
        run(args, image)
    except HtcError as exc:  # one line, not a traceback: the server says what is wrong
        raise SystemExit(f"map_montecarlo: {exc}") from None
    except FunctionError as exc:
        raise SystemExit(f"map_montecarlo: {exc}") from None


def run(args: argparse.Namespace, image: str) -> None:
    with Session() as htc:
        code = upload_handler(htc, args.project)
        task = htc.project(args.project).create_task("montecarlo")
        events = [{"seed": seed, "paths": args.paths, **OPTION} for seed in range(args.events)]
        started = time.perf_counter()
        results = task.map(image, "montecarlo.lambda_handler", events, code=code, timeout=60)
        seconds = time.perf_counter() - started
    paths = sum(r["paths"] for r in results)
    mean = sum(r["sum"] for r in results) / paths
    variance = sum(r["sum_sq"] for r in results) / paths - mean * mean
    stderr = math.sqrt(max(variance, 0.0) / paths)
    exact = black_scholes_call(**OPTION)
    print(f"{len(results)} calls in {seconds:.1f} s ({len(results) / seconds:.0f} calls/s), {paths} paths")
    print(f"Monte Carlo price {mean:.4f} ± {stderr:.4f} (Black-Scholes {exact:.4f}) in task {task.id}")


if __name__ == "__main__":
    main()
