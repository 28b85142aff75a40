"""Clients that wait, at the server's edges: a SIGTERM with streams and long polls open, the bound
on open waits, where log streams start, and log watches woken only by their own job's files."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from openhtc.client import Connection, Session
from openhtc.client import live as client_live
from openhtc.services.logwatch import LogWatch
from openhtc.testing.server import HtcApi, HtcServer

LIVE = "/openhtc/v1/projects/{p}/tasks/{t}"


def _open(url: str, path: str, token: str, headers: str = "") -> tuple[socket.socket, bytes]:
    """A raw GET left open; its answer's head (streams) or nothing yet (long polls)."""
    host, _, port = url.removeprefix("http://").partition(":")
    sock = socket.create_connection((host, int(port)))
    sock.sendall(
        f"GET {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n{headers}\r\n".encode()
    )
    if "/wait" in path:
        return sock, b""
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(4096)
    return sock, head


def test_sigterm_ends_open_streams_and_long_polls(start_server: Callable[..., HtcServer]) -> None:
    server = start_server()
    api = server.api()
    p, t = api.project_and_task()
    job = api.submit_one(p, t, api.job_request(["sh", "-c", "echo hi; sleep 300"]))["parentJobId"] + ":0"
    api.wait_jobs(p, t, lambda jobs: jobs[0]["status"] == "RUNNING", what="the job to run")
    base, token = LIVE.format(p=p, t=t), server.token()
    paths = [f"{base}/stream", f"{base}/jobs/{job}/logs/stream", f"{base}/wait?timeout=60"]
    socks = [_open(server.url, path, token)[0] for path in paths]
    paths.append(f"{base}/jobs/{job}/wait?timeout=60")
    socks.append(_open(server.url, paths[-1], token)[0])
    deadline = time.monotonic() + 20
    while api.get(f"{server.url}/openhtc/v1/live")["subscriptions"] < 4:  # all four are waiting
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert server.proc is not None
    server.proc.terminate()
    try:
        # Without the fix uvicorn waits for every response in progress: 60 s for the long polls,
        # for ever for the counts stream.
        assert server.proc.wait(timeout=20) == 0
    except subprocess.TimeoutExpired:
        pytest.fail(f"the server did not stop with open streams\n{server.log_tail()}")
    finally:
        for sock in socks:
            sock.close()
    log = server.log_path.read_text()
    assert "executor stopped" in log and "openhtc stopped in" in log  # the clean stop ran


def test_past_max_live_subscriptions_a_wait_is_refused_and_the_client_polls(
    start_server: Callable[..., HtcServer],
) -> None:
    server = start_server(env={"OPENHTC_MAX_LIVE_SUBSCRIPTIONS": "2"})
    api = server.api()
    p, t = api.project_and_task()
    job = api.submit_one(p, t, api.job_request(["sh", "-c", "sleep 300"]))["parentJobId"] + ":0"
    base, token = LIVE.format(p=p, t=t), server.token()
    socks = [_open(server.url, f"{base}/stream", token)[0] for _ in range(2)]
    try:
        deadline = time.monotonic() + 20
        while api.get(f"{server.url}/openhtc/v1/live")["subscriptions"] < 2:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        for path in (f"{base}/stream", f"{base}/wait", f"{base}/jobs/{job}/logs/stream"):
            refused = api.request("GET", server.url + path, params={"timeout": "1"}, expect=503)
            assert refused.headers["Retry-After"] and "poll" in refused.text
        # openhtc's client falls back to polling for this call, and keeps the routes for later
        with Session(connection=Connection(server.url, api_key=server.api_key)) as htc:
            with pytest.raises(client_live.Busy):
                client_live.wait_task(htc.connection, p, t, timeout=1)
            assert htc.connection.live_supported  # busy now, not without the routes
            api.cancel(p, t)
            task = htc.task(p, t)
            assert task.job(job).wait(timeout=60, poll=0.2).status == "FAILED"  # polled
            assert task.wait(timeout=60, poll=0.2).done
    finally:
        for sock in socks:
            sock.close()


def test_log_stream_tail_0_sends_only_new_lines_and_offsets_are_bounded(
    module_server: HtcServer, api: HtcApi, tmp_path: Path
) -> None:
    p, t = api.project_and_task()
    go = tmp_path / "go"
    script = f"echo old; while [ ! -e {go} ]; do sleep 0.05; done; echo new"
    job = api.submit_one(p, t, api.job_request(["sh", "-c", script]))["parentJobId"] + ":0"
    api.wait_jobs(p, t, lambda _: api.log_lines(p, t, job) == ["old"], what="the first line")
    url = module_server.url + LIVE.format(p=p, t=t) + f"/jobs/{job}/logs/stream"
    messages = []
    with api.client.stream("GET", url, params={"tail": "0"}, timeout=60) as resp:
        assert resp.status_code == 200  # its start was fixed before this answer
        go.touch()  # only now is "new" written
        for line in resp.iter_lines():
            if line.startswith("data: "):
                messages.append(json.loads(line[6:]).get("message"))
            if line == "event: end":
                break
    assert messages[0] == "new", messages
    # a resume offset past any file is refused before the stream starts
    huge = base64.urlsafe_b64encode(json.dumps([1, 2**63 - 1]).encode()).decode().rstrip("=")
    api.request("GET", url, params={"from": huge}, expect=400)
    api.request("GET", url, headers={"Last-Event-ID": huge}, expect=400)


def test_the_dashboards_live_log_starts_at_its_tail(module_server: HtcServer, api: HtcApi) -> None:
    from test_live import dashboard  # the live tests' signed-in browser-like client

    p, t = api.project_and_task()
    job = api.submit_one(p, t, api.job_request(["sh", "-c", "seq 1 600"]))["parentJobId"] + ":0"
    api.wait_terminal(p, t, 1)
    client = dashboard(module_server)
    try:
        messages: list[str] = []
        path = f"/ui/projects/{p}/tasks/{t}/jobs/{job}/log/stream"
        with client.stream("GET", path, timeout=60) as resp:
            assert resp.status_code == 200
            for line in resp.iter_lines():
                if line.startswith("data: ") and '"message"' in line:
                    messages.append(json.loads(line[6:])["message"])
                if line == "event: end":
                    break
        assert messages == [str(i) for i in range(101, 601)]  # the last 500 (LOG_LINES)
    finally:
        client.close()


def test_a_log_watch_wakes_only_for_its_own_files_and_all_on_overflow(tmp_path: Path) -> None:
    limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())

    async def run() -> tuple[int, int, int]:
        watch = LogWatch()
        woken = {"0.": 0, "1.": 0}

        def hook(prefix: str) -> Callable[[], None]:
            return lambda: woken.__setitem__(prefix, woken[prefix] + 1)

        async def settle() -> None:
            for _ in range(20):
                await asyncio.sleep(0.01)

        async with (
            watch.watch(str(tmp_path), hook("0."), prefix="0.") as ok0,
            watch.watch(str(tmp_path), hook("1."), prefix="1."),
        ):
            assert ok0
            (tmp_path / "1.1.log").write_text("another job's line\n")
            await settle()
            other = woken["0."]
            (tmp_path / "0.1.log").write_text("its line\n")
            await settle()
            own = woken["0."]
            # more events than the kernel queues, read at once: the queue overflows
            before = woken["0."]
            loop = asyncio.get_running_loop()
            assert watch._fd is not None
            loop.remove_reader(watch._fd)
            for i in range(limit + 100):
                (tmp_path / f"x{i}").touch()
            loop.add_reader(watch._fd, watch._readable)
            await settle()
            overflow = woken["0."] - before
        watch.close()
        return other, own, overflow

    other, own, overflow = asyncio.run(run())
    assert other == 0  # another job's write (same batch, same directory) does not wake it
    assert own >= 1
    assert overflow >= 1  # lost events: every follower looks again


@pytest.mark.unit
def test_task_waits_coalesce_a_burst_of_reports_job_waits_do_not() -> None:
    from openhtc.api.routes.live import TASK_GAP, _wait
    from openhtc.services.notify import Subscription

    class Request:  # a client that stays
        async def receive(self) -> dict[str, str]:
            await asyncio.Event().wait()
            return {}

    async def checks_during_burst(gap: float) -> int:
        sub = Subscription(frozenset())
        reads = [0]
        ended = [False]

        def check() -> tuple[bool, int]:
            reads[0] += 1
            return ended[0], reads[0]

        async def reports() -> None:  # 100 reports of the task's jobs, a few ms apart
            for _ in range(100):
                await asyncio.sleep(0.003)
                sub.fire()
            ended[0] = True
            sub.fire()

        burst = asyncio.create_task(reports())
        got = await _wait(Request(), sub, 60, check, gap)  # type: ignore[arg-type]
        await burst
        return got

    coalesced = asyncio.run(checks_during_burst(TASK_GAP))
    immediate = asyncio.run(checks_during_burst(0.0))
    # each report wakes the wait; a task wait reads at most every TASK_GAP s, a job wait each time
    assert coalesced < immediate / 3, (coalesced, immediate)


def test_a_followed_log_resumes_across_a_server_restart(
    start_server: Callable[..., HtcServer], tmp_path: Path
) -> None:
    import threading

    server = start_server()
    api = server.api()
    p, t = api.project_and_task()
    go = tmp_path / "go"
    script = f"echo first; while [ ! -e {go} ]; do sleep 0.05; done; echo second"
    job = api.submit_one(p, t, api.job_request(["sh", "-c", script]))["parentJobId"] + ":0"
    events: list[client_live.Event] = []
    failed: list[BaseException] = []
    first = threading.Event()

    def follow() -> None:
        try:
            with Session(connection=Connection(server.url, api_key=server.api_key)) as htc:
                for event in client_live.follow_log(htc.connection, p, t, job):
                    events.append(event)
                    first.set()
        except BaseException as exc:  # reported below
            failed.append(exc)

    follower = threading.Thread(target=follow, daemon=True)
    follower.start()
    assert first.wait(60), server.log_tail()
    server.restart()  # SIGTERM: the stream ends without its `end` event
    go.touch()
    follower.join(90)
    assert not follower.is_alive() and not failed, failed
    messages = [e.data["message"] for e in events if e.name == "line"]
    assert messages[0] == "first" and messages[-1] == "second", messages
    assert events[-1].name == "end"  # without the resume the follow ended silently at the stop
