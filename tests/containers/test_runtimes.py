"""The bwrap and podman runtimes against a real registry, real bubblewrap, podman and cgroups.

Each runtime is driven in-process (``runtime.run(launch, ...)``) with images pushed to a plain
``docker-registry``; the limits are checked the way a user notices them (a job past its memory
fails with ErrorNotEnoughMemory, writing past its disk fails) and on the host (cgroup files,
leftover processes, mounts and cgroups after a crash).
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import tarfile
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from runtime_support import (
    PlainRegistry,
    StaticSource,
    busybox_layer,
    launch,
    pids_with_env,
    require_tool,
    run_job,
    tar_layer,
    wait_for,
)

from openhtc.executor.local import embedded_executor_id
from openhtc.runtimes import RuntimeUnavailable, build_runtime, choose_runtime
from openhtc.runtimes.base import RunHandle
from openhtc.runtimes.bwrap import BwrapRuntime
from openhtc.runtimes.cgroups import Cgroups
from openhtc.runtimes.images import ImageCache, ImageError
from openhtc.runtimes.images.unpack import LayerUnpacker
from openhtc.runtimes.podman import PodmanRuntime

# Nothing here depends on the database: run on the first of --db only.
pytestmark = pytest.mark.one_db

CONF_CHANGES = [
    'ENTRYPOINT ["/bin/sh", "-c"]',
    'CMD ["echo greeting=$GREETING; pwd; id -u; id -g"]',
    "ENV GREETING=hello",
    "WORKDIR /work",
    "USER 65534",
]


# --------------------------------------------------------------------------------------------
# Fixtures: images in the registry, one runtime of each kind per module
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PlainRegistry]:
    """A plain docker-registry (no auth) for the module."""
    require_tool("docker-registry")
    reg = PlainRegistry(tmp_path_factory.mktemp("registry")).start()
    yield reg
    reg.stop()


@pytest.fixture(scope="module")
def images(registry: PlainRegistry, tmp_path_factory: pytest.TempPathFactory) -> PlainRegistry:
    """bb:1 (busybox, no config), conf:1 (podman import with ENTRYPOINT/CMD/ENV/WORKDIR/USER),
    empty:1 (busybox without entrypoint or command)."""
    require_tool("podman")
    tmp = tmp_path_factory.mktemp("images")
    registry.push_layers("proj/bb", "1", [busybox_layer()])
    registry.push_layers("proj/empty", "1", [busybox_layer()], {"Env": ["A=1"]})
    registry.push_busybox(tmp, "proj/conf:1", CONF_CHANGES)
    return registry


def _owner() -> str:
    return f"test-{uuid.uuid4().hex[:8]}@{os.getpid()}"


@pytest.fixture(scope="module")
def bwrap_runtime(images: PlainRegistry, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BwrapRuntime]:
    require_tool("bwrap")
    runtime = BwrapRuntime(str(tmp_path_factory.mktemp("bwrap-work")), StaticSource(images))
    runtime.adopt(_owner(), uuid.uuid4().hex)
    yield runtime
    runtime.close()


@pytest.fixture(scope="module")
def podman_runtime(
    images: PlainRegistry, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PodmanRuntime]:
    runtime = PodmanRuntime(str(tmp_path_factory.mktemp("podman-work")), StaticSource(images))
    runtime.adopt(_owner(), uuid.uuid4().hex)
    yield runtime
    runtime.close()


@pytest.fixture(params=["bwrap", "podman"])
def runtime(request: pytest.FixtureRequest) -> Any:
    return request.getfixturevalue(f"{request.param}_runtime")


def _marker() -> tuple[str, str]:
    return ("HTC_RUNTIME_TEST", uuid.uuid4().hex)


def _cgroup_file(pid: int, controller: str, name: str) -> list[str]:
    """The values of a cgroup file for ``pid`` from its own cgroup up to the root (v1 or v2)."""
    mounts = [line.split() for line in Path("/proc/self/mounts").read_text().splitlines()]
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controller in controllers.split(",") or (controllers == "" and name.startswith(controller + ".")):
            kind = "cgroup2" if controllers == "" else "cgroup"
            root = next(
                m[1] for m in mounts if m[2] == kind and (kind == "cgroup2" or controller in m[3].split(","))
            )
            values = []
            current = Path(root + path)
            while str(current).startswith(root):
                file = current / name
                if file.exists():
                    values.append(file.read_text().strip())
                current = current.parent
            if values:
                return values
    raise AssertionError(f"no {controller} cgroup file {name} for pid {pid}")


# --------------------------------------------------------------------------------------------
# Both runtimes
# --------------------------------------------------------------------------------------------


def test_output_goes_to_the_log_and_exit_codes_are_kept(runtime: Any) -> None:
    ok = run_job(runtime, launch("bb:1", ["sh", "-c", "echo hello; echo world >&2"]))
    assert ok.outcome.succeeded and ok.running, ok.outcome
    assert ok.lines == ["hello", "world"]
    failed = run_job(runtime, launch("bb:1", ["sh", "-c", "echo before; exit 3"]))
    assert (failed.outcome.exit_code, failed.outcome.failure_code) == (3, "ErrorNonZeroContainerExitCode")
    assert failed.lines == ["before"]


def test_the_image_config_is_honoured(runtime: Any) -> None:
    """ENTRYPOINT + CMD run when the job gives no commands, with the image's ENV, WORKDIR, USER."""
    ran = run_job(runtime, launch("conf:1"))
    assert ran.outcome.succeeded, (ran.outcome, ran.lines)
    assert ran.lines == ["greeting=hello", "/work", "65534", "65534"]


def test_job_commands_and_envs_override_the_image(runtime: Any) -> None:
    job = launch("conf:1", ["sh", "-c", "echo $GREETING $OTHER; pwd"], envs={"GREETING": "bye", "OTHER": "x"})
    ran = run_job(runtime, job)
    assert ran.outcome.succeeded, (ran.outcome, ran.lines)
    assert ran.lines == ["bye x", "/work"]
    elsewhere = run_job(runtime, launch("conf:1", ["pwd"], working_dir="/tmp"))
    assert elsewhere.lines == ["/tmp"]


def test_the_host_is_invisible(runtime: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret_file = Path("/root") / f"openhtc-test-{uuid.uuid4().hex}"
    secret_file.write_text("host secret\n")
    data_file = tmp_path / "data-secret"
    data_file.write_text("data secret\n")
    monkeypatch.setenv("OPENHTC_S3_SECRET_KEY", "server-secret-value")
    try:
        script = f"cat {secret_file} {data_file} /etc/shadow; env"
        ran = run_job(runtime, launch("bb:1", ["sh", "-c", script]))
    finally:
        secret_file.unlink()
    assert "host secret" not in ran.text and "data secret" not in ran.text
    assert "server-secret-value" not in ran.text and "OPENHTC_" not in ran.text
    assert ran.text.count("No such file or directory") == 3, ran.lines
    listing = set(run_job(runtime, launch("bb:1", ["ls", "/"])).lines)
    assert {"bin", "proc", "tmp"} <= listing and not listing & {"usr", "home", "var", "root", "boot", "opt"}


def test_memory_limit_fails_the_job_with_not_enough_memory(runtime: Any) -> None:
    # tail keeps a whole newline-free input in memory: 300 MiB against a 64 MiB limit.
    ran = run_job(runtime, launch("bb:1", ["sh", "-c", "head -c 300m /dev/zero | tail"], memory_mb=64))
    assert ran.outcome.failure_code == "ErrorNotEnoughMemory", (ran.outcome, ran.lines)
    assert "maxMemory=64" in ran.outcome.reason


def test_cpu_quota_and_memory_limit_are_set_on_the_job(runtime: Any) -> None:
    name, value = _marker()
    job = launch("bb:1", ["sleep", "60"], envs={name: value}, vcpus=2, memory_mb=300)
    handle = RunHandle()
    thread = threading.Thread(target=run_job, args=(runtime, job, handle))
    thread.start()
    try:

        def sleeping() -> list[int]:  # the job's own process, not bwrap's
            return [p for p in pids_with_env(name, value) if Path(f"/proc/{p}/comm").read_text() == "sleep\n"]

        pid = wait_for(sleeping, what="the job's process")[0]
        if Path("/sys/fs/cgroup/cgroup.controllers").exists():
            quotas = [v.split()[0] for v in _cgroup_file(pid, "cpu", "cpu.max")]
            limits = _cgroup_file(pid, "memory", "memory.max")
        else:
            quotas = _cgroup_file(pid, "cpu", "cpu.cfs_quota_us")
            limits = _cgroup_file(pid, "memory", "memory.limit_in_bytes")
        assert min(int(q) for q in quotas if q not in ("-1", "max")) == 200_000  # 2 vCPUs of 100 ms
        assert min(int(v) for v in limits if v != "max") == 300 << 20
    finally:
        handle.stop()
        thread.join(30)


def test_writing_past_max_disk_fails(runtime: Any) -> None:
    # podman's tmpfs counts against memory: give it room so the disk cap is what stops dd.
    memory = 2048 if isinstance(runtime, PodmanRuntime) else 256
    big = "dd if=/dev/zero of=/tmp/big bs=1M count=1200 && echo wrote-it-all"
    ran = run_job(runtime, launch("bb:1", ["sh", "-c", big], disk_gib=1, memory_mb=memory))
    assert ran.outcome.failure_code == "ErrorNonZeroContainerExitCode", (ran.outcome, ran.lines)
    assert "wrote-it-all" not in ran.lines
    assert any("No space left on device" in line for line in ran.lines), ran.lines
    small = "dd if=/dev/zero of=/tmp/small bs=1M count=100 2>/dev/null && echo ok"
    assert run_job(runtime, launch("bb:1", ["sh", "-c", small], disk_gib=1, memory_mb=memory)).lines == ["ok"]


def test_timeout_kills_the_whole_tree(runtime: Any) -> None:
    name, value = _marker()
    script = "sleep 300 & sleep 300 & echo started; wait"
    ran = run_job(runtime, launch("bb:1", ["sh", "-c", script], envs={name: value}, timeout_s=2))
    assert ran.outcome.failure_code == "ErrorTimeout", ran.outcome
    assert ran.lines == ["started"]
    wait_for(lambda: not pids_with_env(name, value), timeout=10, what="the job's processes to be gone")


def test_cancel_stops_a_running_job(runtime: Any) -> None:
    name, value = _marker()
    handle = RunHandle()
    result: list[Any] = []
    job = launch("bb:1", ["sh", "-c", "sleep 300 & wait"], envs={name: value})
    thread = threading.Thread(target=lambda: result.append(run_job(runtime, job, handle)))
    thread.start()
    wait_for(lambda: pids_with_env(name, value), what="the job to run")
    handle.stop()
    thread.join(30)
    assert result and result[0].outcome.failure_code == "ErrorUnknownFailure", result
    wait_for(lambda: not pids_with_env(name, value), timeout=10, what="the job's processes to be gone")


def test_an_image_that_cannot_be_pulled_fails_to_start(runtime: Any) -> None:
    ran = run_job(runtime, launch("nosuch:1", ["true"]))
    assert ran.outcome.failure_code == "ErrorStartingContainer", ran.outcome
    assert "nosuch:1" in ran.outcome.reason and not ran.running


def test_nothing_to_run_fails_to_start(runtime: Any) -> None:
    empty = run_job(runtime, launch("empty:1"))
    assert empty.outcome.failure_code == "ErrorStartingContainer"
    assert "no entrypoint or command" in empty.outcome.reason
    missing = run_job(runtime, launch("bb:1", ["no-such-program"]))
    assert missing.outcome.failure_code == "ErrorStartingContainer", missing.outcome
    assert "no-such-program" in missing.outcome.reason


def test_mounts_are_bound_and_named_in_the_environment(runtime: Any, tmp_path: Path) -> None:
    shared, task = tmp_path / "shared", tmp_path / "task"
    shared.mkdir()
    task.mkdir()
    (shared / "input.txt").write_text("from the project\n")
    mounts = [
        ("PROJECT_SHARED_FOLDER", str(shared), "/mnt/shared", True),
        ("TASK_SHARED_FOLDER", str(task), "/mnt/task", False),
    ]
    script = (
        'cat "$PROJECT_SHARED_FOLDER/input.txt"; echo out > "$TASK_SHARED_FOLDER/out.txt" && echo wrote; '
        '(echo no > "$PROJECT_SHARED_FOLDER/x") 2>/dev/null || echo read-only; echo $TASK_SHARED_FOLDER'
    )
    ran = run_job(runtime, launch("bb:1", ["sh", "-c", script], mounts=mounts))
    assert ran.lines == [
        "from the project", "wrote", "read-only", "/mnt/task",
    ]  # fmt: skip
    assert (task / "out.txt").read_text() == "out\n"
    assert not (shared / "x").exists()


def test_jobs_have_no_network_by_default(runtime: Any) -> None:
    ran = run_job(runtime, launch("bb:1", ["cat", "/proc/net/dev"]))
    interfaces = {line.split(":")[0].strip() for line in ran.lines[2:]}
    assert interfaces <= {"lo"}, ran.lines


# --------------------------------------------------------------------------------------------
# bwrap: writable root, image cache
# --------------------------------------------------------------------------------------------


def test_bwrap_root_is_writable_and_nothing_carries_over(bwrap_runtime: BwrapRuntime) -> None:
    """Jobs of one image share a mounted overlay while they leave it untouched; whatever a job
    changes (files, an empty directory, the mode of /) is gone for the next one."""
    for change in ("echo x > /etc/leak", "echo y > /tmp/leak", "mkdir /empty-dir", "chmod 700 /"):
        first = run_job(bwrap_runtime, launch("bb:1", ["sh", "-c", change]))
        assert first.outcome.succeeded, (change, first.lines)
        check = "test -e /etc/leak || test -e /tmp/leak || test -e /empty-dir || ls -ld /"
        second = run_job(bwrap_runtime, launch("bb:1", ["sh", "-c", check]))
        assert second.lines and second.lines[0].startswith("drwxr-xr-x "), (change, second.lines)


def test_a_reused_disk_gives_the_next_job_its_whole_max_disk(
    images: PlainRegistry, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A mount namespace made on the host (by any process: a service, a container, a test)
    while a job's overlay is mounted keeps a copy of that overlay, and through it the files a
    later job writes there after they are deleted on our side. The next job on that disk must
    still get its whole maxDiskGiB, and the disk its space back (its files are emptied before
    they are removed, so it need not be replaced)."""
    require_tool("bwrap")
    require_tool("unshare")
    runtime = BwrapRuntime(str(tmp_path / "work"), StaticSource(images))  # a pool of its own
    runtime.adopt(_owner(), uuid.uuid4().hex)
    holder = None
    try:
        # A job that writes nothing leaves its overlay mounted for the next job of the image.
        assert run_job(runtime, launch("bb:1", ["true"])).outcome.succeeded
        holder = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", "echo ready; exec sleep 600"],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert holder.stdout is not None and holder.stdout.readline() == "ready\n"
        fill = "dd if=/dev/zero of=/tmp/big bs=1M count=1200 2>&1; echo done"
        filled = run_job(runtime, launch("bb:1", ["sh", "-c", fill], disk_gib=1))
        assert any("No space left on device" in line for line in filled.lines), filled.lines
        near_cap = 'out=$(dd if=/dev/zero of=/tmp/big bs=1M count=900 2>&1) && echo ok || echo "$out"'
        for _ in range(2):
            assert run_job(runtime, launch("bb:1", ["sh", "-c", near_cap], disk_gib=1)).lines == ["ok"]
        assert "replacing it" not in caplog.text
    finally:
        if holder is not None:
            holder.kill()
            holder.wait()
        runtime.close()


def test_two_jobs_on_a_cold_cache_pull_once(bwrap_runtime: BwrapRuntime, images: PlainRegistry) -> None:
    layer = tar_layer(("dir", "data", None), ("file", "data/cold.txt", "cold\n"))
    images.push_layers("proj/cold", "1", [busybox_layer(), layer])
    before = bwrap_runtime.cache.pulls
    results: list[Any] = [None, None]
    barrier = threading.Barrier(2)

    def job(i: int) -> None:
        barrier.wait()
        results[i] = run_job(bwrap_runtime, launch("cold:1", ["cat", "/data/cold.txt"]))

    threads = [threading.Thread(target=job, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [r.lines for r in results] == [["cold"], ["cold"]], [r.outcome for r in results]
    assert bwrap_runtime.cache.pulls == before + 1


def test_a_tag_is_resolved_once_per_ttl_and_a_repush_is_picked_up(
    images: PlainRegistry, tmp_path: Path
) -> None:
    source = StaticSource(images)
    runtime = BwrapRuntime(str(tmp_path / "work"), source)
    runtime.adopt(_owner(), uuid.uuid4().hex)
    try:
        version = lambda text: tar_layer(("file", "version", text))  # noqa: E731
        images.push_layers("proj/moving", "1", [busybox_layer(), version("one\n")])
        assert run_job(runtime, launch("moving:1", ["cat", "/version"])).lines == ["one"]
        calls = source.calls
        for _ in range(3):
            run_job(runtime, launch("moving:1", ["true"]))
        assert source.calls == calls  # within the TTL: no registry work at all
        images.push_layers("proj/moving", "1", [busybox_layer(), version("two\n")])
        runtime.cache.clock = lambda: time.monotonic() + runtime.cache.tag_ttl + 1  # the TTL has passed
        assert run_job(runtime, launch("moving:1", ["cat", "/version"])).lines == ["two"]
    finally:
        runtime.close()


def test_oci_index_docker_manifests_and_whiteouts(bwrap_runtime: BwrapRuntime, images: PlainRegistry) -> None:
    lower = tar_layer(
        ("dir", "a", None), ("file", "a/gone", "x"), ("file", "a/kept", "k"),
        ("dir", "opq", None), ("file", "opq/old", "o"), ("file", "f", "f"),
    )  # fmt: skip
    upper = tar_layer(
        ("file", "a/.wh.gone", ""), ("dir", "opq", None), ("file", "opq/.wh..wh..opq", ""),
        ("file", "opq/new", "n"), ("file", ".wh.f", ""),
    )  # fmt: skip
    images.push_layers("proj/layered", "index", [busybox_layer(), lower, upper], index=True)
    images.push_layers("proj/layered", "docker", [busybox_layer(), lower, upper], docker=True)
    for tag in ("index", "docker"):
        script = "ls /a; ls /opq; ls /f || echo no-f"
        ran = run_job(bwrap_runtime, launch(f"layered:{tag}", ["sh", "-c", script]))
        assert ran.outcome.succeeded, (tag, ran.outcome, ran.lines)
        assert ran.lines[:2] == ["kept", "new"] and ran.lines[-1] == "no-f", (tag, ran.lines)


def test_a_registry_refusing_the_token_is_reported(bwrap_runtime: BwrapRuntime, tmp_path: Path) -> None:
    """A registry with token auth answers 401 and a challenge: the job fails and says so."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "token")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(1).not_valid_before(now).not_valid_after(now.replace(year=now.year + 1))
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    (tmp_path / "token.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    auth = (
        "auth:\n  token:\n    realm: http://127.0.0.1:9/token\n    service: reg\n"
        f"    issuer: openhtc\n    rootcertbundle: {tmp_path / 'token.crt'}\n"
    )
    secured = PlainRegistry(tmp_path / "registry", extra_config=auth).start()
    try:
        runtime = BwrapRuntime(str(tmp_path / "work"), StaticSource(secured))
        runtime.adopt(_owner(), uuid.uuid4().hex)
        ran = run_job(runtime, launch("bb:1", ["true"]))
        runtime.close()
    finally:
        secured.stop()
    assert ran.outcome.failure_code == "ErrorStartingContainer"
    assert "refused the pull token" in ran.outcome.reason
    assert 'realm="http://127.0.0.1:9/token"' in ran.outcome.reason


def test_no_image_source_fails_jobs_clearly(tmp_path: Path) -> None:
    require_tool("bwrap")
    runtime = BwrapRuntime(str(tmp_path / "work"), None)
    runtime.adopt(_owner(), uuid.uuid4().hex)
    ran = run_job(runtime, launch("bb:1", ["true"]))
    runtime.close()
    assert ran.outcome.failure_code == "ErrorStartingContainer" and "registry" in ran.outcome.reason


def test_eviction_removes_the_least_recently_used_image_not_one_in_use(
    images: PlainRegistry, tmp_path: Path
) -> None:
    for name in ("ev1", "ev2", "ev3"):
        images.push_layers(f"proj/{name}", "1", [busybox_layer(), tar_layer(("file", "name", name))])
    cache = ImageCache(str(tmp_path / "cache"), max_bytes=3 << 20)  # room for one busybox image
    source = StaticSource(images)
    first = cache.acquire("proj", "ev1:1", source)
    second = cache.acquire("proj", "ev2:1", source)  # ev1 is in use: both stay
    assert Path(first.rootfs, "name").read_text() == "ev1" and Path(second.rootfs, "name").exists()
    cache.release(first)
    cache.release(second)
    third = cache.acquire("proj", "ev3:1", source)  # over the limit: ev1 (least recent), then ev2 go
    assert not Path(first.rootfs).exists() and not Path(second.rootfs).exists()
    assert Path(third.rootfs, "name").read_text() == "ev3"
    cache.release(third)
    again = cache.acquire("proj", "ev1:1", source)  # evicted images are pulled again
    assert Path(again.rootfs, "name").read_text() == "ev1"


# --------------------------------------------------------------------------------------------
# The layer unpacker
# --------------------------------------------------------------------------------------------


def _apply(root: Path, *layers: bytes) -> LayerUnpacker:
    unpacker = LayerUnpacker(str(root))
    for layer in layers:
        unpacker.apply(io.BytesIO(layer))
    unpacker.finish()
    return unpacker


def test_whiteouts_delete_and_opaque_dirs_hide_lower_layers(tmp_path: Path) -> None:
    lower = tar_layer(
        ("dir", "a", None), ("file", "a/x", "x"), ("file", "a/y", "y"), ("dir", "d", None),
        ("file", "d/1", "1"), ("dir", "d/sub", None), ("file", "d/sub/deep", "z"), ("file", "f", "f"),
        ("symlink", "s", "/a/x"),
    )  # fmt: skip
    upper = tar_layer(
        ("file", "a/.wh.x", ""), ("dir", "d", None), ("file", "d/2", "2"), ("file", "d/.wh..wh..opq", ""),
        ("file", ".wh.f", ""), ("file", ".wh.s", ""), ("link", "a/y2", "a/y"),
    )  # fmt: skip
    root = tmp_path / "rootfs"
    _apply(root, lower, upper)
    assert sorted(os.listdir(root / "a")) == ["y", "y2"]
    assert sorted(os.listdir(root / "d")) == ["2"]  # 1 and sub/ hidden; 2 (same layer) kept
    assert not (root / "f").exists() and not os.path.lexists(root / "s")
    assert os.stat(root / "a/y").st_ino == os.stat(root / "a/y2").st_ino
    assert {"proc", "dev", "sys", "tmp", "etc"} <= set(os.listdir(root))
    assert not any(name.startswith(".wh.") for _, dirs, files in os.walk(root) for name in dirs + files)


@pytest.mark.parametrize(
    "entries",
    [
        [("file", "../escape", "x")],
        [("file", "/etc/escape", "x")],
        [("file", "a/../../escape", "x")],
        [("symlink", "link", "{outside}"), ("file", "link/escape", "x")],
        [("link", "hard", "../../../../etc/passwd")],
    ],
    ids=["dotdot", "absolute", "nested-dotdot", "through-symlink", "hardlink-out"],
)
def test_unsafe_layer_entries_reject_the_image(tmp_path: Path, entries: list[tuple[str, str, str]]) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    resolved = [(kind, name, str(value).replace("{outside}", str(outside))) for kind, name, value in entries]
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w") as tar:  # tar_layer would refuse nothing either
        for kind, name, value in resolved:
            info = tarfile.TarInfo(name)
            if kind == "file":
                info.size = len(value)
                tar.addfile(info, io.BytesIO(value.encode()))
                continue
            info.type = tarfile.SYMTYPE if kind == "symlink" else tarfile.LNKTYPE
            info.linkname = value
            tar.addfile(info)
    with pytest.raises(ImageError):
        _apply(tmp_path / "rootfs", layer.getvalue())
    assert os.listdir(outside) == [] and not (tmp_path / "escape").exists()


def test_device_nodes_are_skipped(tmp_path: Path) -> None:
    unpacker = _apply(tmp_path / "rootfs", tar_layer(("chr", "dev/null2", None), ("file", "ok", "1")))
    assert not os.path.lexists(tmp_path / "rootfs/dev/null2") and (tmp_path / "rootfs/ok").exists()
    assert unpacker.skipped == ["dev/null2"]


# --------------------------------------------------------------------------------------------
# Choosing a runtime; crash recovery
# --------------------------------------------------------------------------------------------


def test_auto_prefers_bwrap_and_never_picks_process_silently(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    require_tool("bwrap")
    assert choose_runtime("auto") == "bwrap"
    assert choose_runtime("process") == "process"
    monkeypatch.setenv("PATH", str(tmp_path))  # neither bwrap nor podman to be found
    with pytest.raises(RuntimeUnavailable, match=r"install bubblewrap.*--runtime process"):
        build_runtime("auto", str(tmp_path / "work"))


def test_htc_server_refuses_to_start_without_a_container_runtime(tmp_path: Path) -> None:
    empty = tmp_path / "empty-path"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENHTC_")}
    env["PATH"] = str(empty)  # neither bwrap nor podman (the htc script names its python itself)
    htc = Path(sys.executable).parent / "htc"
    done = subprocess.run(
        [str(htc), "server", "--data-dir", str(tmp_path / "data"), "--port", "0"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "install bubblewrap" in done.stderr and "--runtime process" in done.stderr
    assert "Traceback" not in done.stderr


CRASH_SCRIPT = textwrap.dedent(
    """
    import sys, threading, time
    sys.path.insert(0, {support!r})
    from runtime_support import PlainRegistry, StaticSource, launch, run_job
    from openhtc.runtimes import build_runtime
    registry = PlainRegistry.__new__(PlainRegistry)
    registry.url, registry.host = {url!r}, {host!r}
    runtime = build_runtime({kind!r}, {work!r}, StaticSource(registry))
    runtime.adopt({owner!r}, "first")
    job = launch("bb:1", ["sh", "-c", "sleep 300 & sleep 300; wait"], envs={{{name!r}: {value!r}}})
    for i in range(2):
        threading.Thread(target=run_job, args=(runtime, job._replace(job_id=i + 1))).start()
    print("started", flush=True)
    time.sleep(600)
    """
)


@pytest.mark.parametrize("kind", ["bwrap", "podman"])
def test_nothing_leaks_after_the_executor_is_killed(kind: str, images: PlainRegistry, tmp_path: Path) -> None:
    """kill -9 of a process running two jobs; a new incarnation's adopt() leaves nothing behind."""
    require_tool("bwrap" if kind == "bwrap" else "podman")
    name, value = _marker()
    owner, work = _owner(), str(tmp_path / "work")
    script = CRASH_SCRIPT.format(
        support=str(Path(__file__).parent), url=images.url, host=images.host, kind=kind,
        work=work, owner=owner, name=name, value=value,
    )  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, start_new_session=True)
    try:
        # Two jobs of sh and two sleeps each (bwrap's own processes carry the variable too).
        wait_for(lambda: len(pids_with_env(name, value)) >= 6, timeout=60, what="both jobs to run")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        runtime = build_runtime(kind, work, StaticSource(images))
        runtime.adopt(owner, "second")
        wait_for(lambda: not pids_with_env(name, value), timeout=15, what="the jobs' processes to die")
        if isinstance(runtime, BwrapRuntime):
            leftovers = runtime.cgroups.leftovers(runtime_owner(owner))
            assert leftovers == [], leftovers
            mounts = [line for line in Path("/proc/self/mountinfo").read_text().splitlines() if work in line]
            assert mounts == []
        else:
            ps = subprocess.run(
                ["podman", "ps", "-a", "--filter", f"label=openhtc.owner={runtime_owner(owner)}", "-q"],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            assert ps.stdout.strip() == ""
            assert runtime.cgroups.leftovers(runtime_owner(owner)) == []
        runtime.close()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        for pid in pids_with_env(name, value):
            os.kill(pid, signal.SIGKILL)


def runtime_owner(owner: str) -> str:
    from openhtc.runtimes.bwrap import owner_tag

    return owner_tag(owner)


# --------------------------------------------------------------------------------------------
# Through the server: `htc server --runtime bwrap` with its embedded registry
# --------------------------------------------------------------------------------------------

FAST_LEASES = {"OPENHTC_LEASE_SECONDS": "10", "OPENHTC_HEARTBEAT_SECONDS": "2"}


def _server_owner(server: Any) -> str:

    executor_id = embedded_executor_id(Path(server.data_dir))
    return runtime_owner(f"{executor_id}@{Path(server.data_dir).resolve()}")


def test_server_runs_container_jobs_under_bwrap(
    registry_server: Any, registry_project: Any, busybox_image: str
) -> None:
    require_tool("bwrap")
    server = registry_server(runtime="bwrap", executor=True)
    project = registry_project(server)
    project.push(busybox_image, "bb:1")
    api = project.api
    tid = api.create_task(project.project_id)["taskId"]
    ok = api.job_request(
        ["sh", "-c", "echo job $AWS_BATCH_JOB_ARRAY_INDEX; ls /root"], batch_size=3, imageName="bb:1"
    )
    image_cmd = api.job_request([], imageName="bb:1")  # the image's CMD: echo hello from busybox
    hog = api.job_request(["sh", "-c", "head -c 300m /dev/zero | tail"], imageName="bb:1", maxMemory=64)
    parents = [r["parentJobId"] for r in api.submit(project.project_id, tid, ok, image_cmd, hog)]
    jobs = {j["jobUUID"]: j for j in api.wait_terminal(project.project_id, tid, 5, timeout=120)}
    for i in range(3):
        job = jobs[f"{parents[0]}:{i}"]
        assert job["status"] == "SUCCEEDED", job
        assert api.log_lines(project.project_id, tid, job["jobUUID"]) == [f"job {i}"]
    assert api.log_lines(project.project_id, tid, f"{parents[1]}:0") == ["hello from busybox"]
    hog_job = jobs[f"{parents[2]}:0"]
    assert (hog_job["status"], hog_job["failureCode"]) == ("FAILED", "ErrorNotEnoughMemory"), hog_job
    assert "executor runtime: bwrap" in Path(server.log_path).read_text()
    server.stop()  # SIGTERM: a clean stop unmounts the executor's scratch disks
    data_dir = str(Path(server.data_dir).resolve())
    assert [line for line in Path("/proc/self/mountinfo").read_text().splitlines() if data_dir in line] == []


def test_kill_9_of_the_server_leaks_no_container_job(
    registry_server: Any, registry_project: Any, busybox_image: str
) -> None:
    """Two bwrap jobs RUNNING when the server gets SIGKILL: after the restart no process, cgroup
    or mount of theirs is left, and neither stays RUNNING (nor is re-run: no infrastructure re-run)."""
    require_tool("bwrap")
    server = registry_server(
        runtime="bwrap", executor=True, env={**FAST_LEASES, "OPENHTC_MAX_INFRASTRUCTURE_RETRIES": "0"}
    )
    project = registry_project(server)
    project.push(busybox_image, "bb:1")
    api, pid = project.api, project.project_id
    tid = api.create_task(pid)["taskId"]
    name, value = _marker()
    long = api.job_request(
        ["sh", "-c", "sleep 300 & sleep 300; wait"], batch_size=2, imageName="bb:1",
        envs=[{"name": name, "value": value}], max_retries=0,
    )  # fmt: skip
    api.submit(pid, tid, long)
    api.wait_jobs(pid, tid, lambda js: all(j["status"] == "RUNNING" for j in js), timeout=60, what="RUNNING")
    wait_for(lambda: len(pids_with_env(name, value)) >= 6, what="the jobs' processes")
    server.kill9()
    server.restart()
    try:
        jobs = api.wait_terminal(pid, tid, 2, timeout=120)
        assert {(j["status"], j["failureCode"]) for j in jobs} == {("FAILED", "ErrorInfrastructureFault")}
        wait_for(lambda: not pids_with_env(name, value), timeout=15, what="the jobs' processes to die")
        cgroups = Cgroups.detect()
        assert cgroups.leftovers(_server_owner(server)) == []
        scratch = str(Path(server.data_dir).resolve() / "work")
        mounts = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
        # The new incarnation may keep a pooled scratch disk; none of the old one's overlays stay.
        assert not [m for m in mounts if m.startswith(scratch) and m.endswith("/root")], mounts
    finally:
        for leftover in pids_with_env(name, value):
            os.kill(leftover, signal.SIGKILL)
