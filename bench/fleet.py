"""A simulated agent fleet: many agents speaking the real agent protocol, with a no-op runtime.

``python -m bench.fleet --url U [--url U2] --token T --agents 1000 --slots 100 --out stats.json``
runs in a process of its own (so its CPU is not the measuring process's), one asyncio loop
(uvloop when installed), each agent on one keep-alive HTTP/1.1 connection of its own to URL
``K % len(urls)``, written and parsed by hand with orjson: the load generator must cost far less
per job than the servers it measures. (A shared ``httpx.AsyncClient`` scans its whole pool on
every request: with 500 connections each, the fleet was on CPU all the time and was the limit
at ~200 jobs/s.) Each agent
registers, then loops on ``/exchange``: it offers its free slots, long-polls when it has
nothing to report, and "runs" every lease at once: STARTING, RUNNING and SUCCEEDED go in its next call.
It stops on SIGTERM (or SIGINT) and writes what it measured to ``--out``: exchange round trips
(p50/p99 of the calls that carry reports, so wait for nothing), exchanges made, leases taken,
reports acknowledged, refusals, 409s and errors.
A file ``--ready`` is written once every agent has registered.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

STARTING, RUNNING, SUCCEEDED = 3, 4, 5
MEMORY_PER_SLOT_MB = 1024


@dataclass
class Stats:
    rtts: list[float] = field(default_factory=list)  # seconds, of the calls that carried reports
    claim_rtts: list[float] = field(default_factory=list)  # calls with no reports that got leases
    idle_rtts: int = 0  # long polls (they wait for work: their time is no round trip)
    exchanges: int = 0
    leases: int = 0
    acked: int = 0
    refused: int = 0
    kills: int = 0
    conflicts: int = 0
    errors: int = 0
    last_error: str = ""

    def summary(self) -> dict[str, Any]:
        rtts, claims = sorted(self.rtts), sorted(self.claim_rtts)

        def pct(values: list[float], p: float) -> float | None:
            return round(values[min(len(values) - 1, int(p * len(values)))] * 1000, 2) if values else None

        return {
            "exchanges": self.exchanges,
            "report_exchanges": len(rtts),
            "long_polls": self.idle_rtts,
            "rtt_p50_ms": pct(rtts, 0.50),
            "rtt_p99_ms": pct(rtts, 0.99),
            "rtt_max_ms": round(rtts[-1] * 1000, 2) if rtts else None,
            # a call with no reports that got leases: a claim (its time includes any wait for work)
            "claims_with_leases": len(claims),
            "claim_rtt_p50_ms": pct(claims, 0.50),
            "claim_rtt_p99_ms": pct(claims, 0.99),
            "leases": self.leases,
            "acked": self.acked,
            "refused": self.refused,
            "kills": self.kills,
            "conflicts": self.conflicts,
            "errors": self.errors,
            "last_error": self.last_error,
        }


class HttpError(Exception):
    """A failed call (connection lost, timeout, or an unexpected status)."""


class Connection:
    """One keep-alive HTTP/1.1 connection to a server, for one agent's calls (one at a time)."""

    def __init__(self, url: str, token: str, timeout: float = 120.0) -> None:
        host_port = url.split("://", 1)[-1].rstrip("/")
        host, _, port = host_port.partition(":")
        self.host, self.port, self.timeout = host, int(port or 80), timeout
        self.head = (
            f"Host: {host_port}\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\n"
        )
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: Any) -> tuple[int, Any]:
        """POST ``body`` as JSON; the answer's status and decoded JSON body."""
        data = orjson.dumps(body)
        request = f"POST {path} HTTP/1.1\r\n{self.head}Content-Length: {len(data)}\r\n\r\n".encode() + data
        reused = self.writer is not None
        try:
            return await asyncio.wait_for(self._roundtrip(request), self.timeout)
        except (OSError, asyncio.IncompleteReadError) as exc:
            self.close()
            # the server closed the idle keep-alive connection (uvicorn: after 5 s): once more,
            # on a new one (an exchange is safe to repeat: reports are idempotent)
            if not (reused and (isinstance(exc, OSError) or not exc.partial)):
                raise HttpError(f"{type(exc).__name__}: {exc}") from None
        except (asyncio.LimitOverrunError, TimeoutError) as exc:
            self.close()
            raise HttpError(f"{type(exc).__name__}: {exc}") from None
        try:
            return await asyncio.wait_for(self._roundtrip(request), self.timeout)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError) as exc:
            self.close()
            raise HttpError(f"{type(exc).__name__}: {exc}") from None

    async def _roundtrip(self, request: bytes) -> tuple[int, Any]:
        if self.writer is None or self.reader is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port, limit=1 << 22)
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        lines = head.lower().split(b"\r\n")
        length = next((int(line[15:]) for line in lines if line.startswith(b"content-length:")), None)
        if length is not None:
            payload = await self.reader.readexactly(length)
        else:  # chunked
            parts = []
            while size := int((await self.reader.readuntil(b"\r\n")).strip() or b"0", 16):
                parts.append(await self.reader.readexactly(size))
                await self.reader.readexactly(2)
            await self.reader.readuntil(b"\r\n")
            payload = b"".join(parts)
        if b"connection: close" in lines:
            self.close()
        return status, orjson.loads(payload) if payload else None

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


class SimAgent:
    def __init__(self, index: int, client: Connection, slots: int, region: str, stats: Stats) -> None:
        self.agent_id = f"sim-{os.getpid()}-{index}"
        self.client = client
        self.slots = slots
        self.region = region
        self.stats = stats
        self.incarnation = ""
        self.poll = 10.0
        self.seq: dict[tuple[int, int], int] = {}
        self.pending: list[dict[str, Any]] = []  # reports not acknowledged yet
        self.held: set[tuple[int, int]] = set()

    async def register(self) -> None:
        self.incarnation = uuid.uuid4().hex
        body = {
            "agent_id": self.agent_id, "incarnation": self.incarnation, "region": self.region,
            "architectures": ["X86"],
            "capacity": {"vcpus": self.slots, "memory_mb": self.slots * MEMORY_PER_SLOT_MB},
            "labels": {"fleet": "sim"}, "version": "sim", "host": "sim", "runtime": "noop",
            "running": [list(k) for k in self.held], "may_have_started": [],
        }  # fmt: skip
        status, answer = await self.client.post("/openhtc/v1/agents/register", body)
        if status != 200:
            raise HttpError(f"register: HTTP {status}: {answer}")
        self.poll = float(answer.get("poll_seconds") or 10.0)
        for key in answer.get("kill", []):
            self.held.discard((key[0], key[1]))

    def _report(self, key: tuple[int, int], status: int) -> None:
        seq = self.seq.get(key, 0) + 1
        self.seq[key] = seq
        self.pending.append({
            "job_id": key[0], "attempt": key[1], "seq": seq, "status": status, "at": time.time(),
            "exit_code": 0 if status == SUCCEEDED else None, "failure_code": None, "reason": None,
        })  # fmt: skip

    async def exchange(self) -> float:
        """One call; returns how long to wait before the next."""
        free = self.slots - len(self.held)
        reports = self.pending
        body = {
            "incarnation": self.incarnation,
            "free": {"vcpus": free, "memory_mb": free * MEMORY_PER_SLOT_MB},
            "max_jobs": free, "held": [list(k) for k in self.held], "reports": reports,
            "wait_seconds": 0.0 if reports else self.poll, "draining": False,
        }  # fmt: skip
        started = time.perf_counter()
        status, answer = await self.client.post(f"/openhtc/v1/agents/{self.agent_id}/exchange", body)
        rtt = time.perf_counter() - started
        self.stats.exchanges += 1
        if status == 409:
            self.stats.conflicts += 1
            await self.register()
            return 0.0
        if status != 200:
            raise HttpError(f"exchange: HTTP {status}: {answer}")
        acked = {(a[0], a[1], a[2]) for a in answer.get("acked", [])}
        refused = {(r[0], r[1]) for r in answer.get("refused", [])}
        self.stats.acked += len(acked)
        self.stats.refused += len(refused)
        done = {(r["job_id"], r["attempt"], r["seq"]) for r in reports} & acked
        self.pending = [
            r
            for r in self.pending
            if (r["job_id"], r["attempt"], r["seq"]) not in done
            and (r["job_id"], r["attempt"]) not in refused
        ]
        for r in reports:
            key = (r["job_id"], r["attempt"])
            if r["status"] == SUCCEEDED and ((*key, r["seq"]) in acked or key in refused):
                self.held.discard(key)
                self.seq.pop(key, None)
        for key in answer.get("kill", []):
            self.stats.kills += 1
            self.held.discard((key[0], key[1]))
            self.pending = [r for r in self.pending if (r["job_id"], r["attempt"]) != (key[0], key[1])]
        leases = answer.get("leases", [])
        for lease in leases:  # the no-op runtime: started and ended at once
            key = (lease["job_id"], lease["attempt"])
            self.held.add(key)
            for status in (STARTING, RUNNING, SUCCEEDED):  # as the executor core reports them
                self._report(key, status)
        self.stats.leases += len(leases)
        if reports:  # a call that waits for nothing: its time is the server's answer
            self.stats.rtts.append(rtt)
        else:  # a long poll: its time is mostly the wait for work
            self.stats.idle_rtts += 1
            if leases:
                self.stats.claim_rtts.append(rtt)
        if self.pending or leases or rtt >= 1.0:
            return 0.0  # more to report, maybe more to take, or the server held the call: again
        return float(answer.get("next_call_seconds", 1.0))  # answered at once, empty: as told

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                delay = await self.exchange()
            except (HttpError, ValueError, KeyError) as exc:
                self.stats.errors += 1
                self.stats.last_error = f"{type(exc).__name__}: {exc}"[:300]
                delay = 1.0
            if delay:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    stats = Stats()
    clients = [Connection(args.url[i % len(args.url)], args.token) for i in range(args.agents)]
    agents = [SimAgent(i, clients[i], args.slots, args.region, stats) for i in range(args.agents)]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    sem = asyncio.Semaphore(50)  # registrations at once

    async def register(agent: SimAgent) -> None:
        async with sem:
            await agent.register()

    began = time.perf_counter()
    await asyncio.gather(*(register(a) for a in agents))
    registered_s = time.perf_counter() - began
    if args.ready:
        Path(args.ready).write_text(str(registered_s))
    tasks = [asyncio.create_task(a.run(stop)) for a in agents]
    await stop.wait()
    # a long poll in flight ends when the server answers or the client closes
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for client in clients:
        client.close()
    return {
        "agents": args.agents,
        "slots": args.slots,
        "register_s": round(registered_s, 2),
        **stats.summary(),
    }


def _runner() -> Callable[[Any], Any]:
    try:
        import uvloop
    except ImportError:
        return asyncio.run
    return uvloop.run  # type: ignore[no-any-return]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fleet", description=__doc__)
    p.add_argument("--url", action="append", required=True, help="a server's base URL (repeat for more)")
    p.add_argument("--token", required=True, help="an agent token (htc admin create-agent-token)")
    p.add_argument("--agents", type=int, default=1000)
    p.add_argument("--slots", type=int, default=100)
    p.add_argument("--region", default="AWS_US_EAST_1")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--ready", type=Path)
    args = p.parse_args(argv)
    result = _runner()(main_async(args))
    args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
