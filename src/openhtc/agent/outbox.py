"""The agent's report buffer: reports on disk until the server acknowledges them.

An append-only file of JSON lines in the work directory: ``{"r": report}`` when a report is
made (with its per-attempt ``seq``), ``{"a": [[job, attempt, seq], ...]}`` when the server
acknowledged (or refused) some. A restart replays it: what was never acknowledged is sent
again (the server acknowledges a duplicate without applying it twice), so a job's end survives
a lost connection, a server restart and an agent crash. The file is rewritten with only the
pending reports when it has grown well past them. Bounded: past ``max_reports`` pending, the
oldest non-terminal reports (STARTING, RUNNING) are dropped; an end is never dropped.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from openhtc.domain.enums import JobStatus
from openhtc.domain.models import AttemptReport
from openhtc.executor import protocol as wire

Key = tuple[int, int, int]  # job, attempt, seq
_TERMINAL = (int(JobStatus.SUCCEEDED), int(JobStatus.FAILED))


class Outbox:
    def __init__(self, path: Path, max_reports: int = 100000) -> None:
        self.path = path
        self.max_reports = max_reports
        self._pending: dict[Key, wire.Report] = {}
        self._seqs: dict[tuple[int, int], int] = {}
        self._lines = 0
        self._lock = threading.Lock()
        self._fh: Any = None
        self._torn = False  # the last write failed: it may have left a partial line

    def open(self) -> None:
        """Replay the file (what was never acknowledged is pending again) and compact it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            for line in self.path.read_text(errors="replace").splitlines():
                try:
                    entry = json.loads(line)
                except ValueError:  # a line cut short by a crash
                    continue
                if "r" in entry:
                    report = wire.Report.model_validate(entry["r"])
                    self._pending[(report.job_id, report.attempt, report.seq)] = report
                    key = (report.job_id, report.attempt)
                    self._seqs[key] = max(self._seqs.get(key, 0), report.seq)
                for acked in entry.get("a", ()):
                    self._pending.pop((acked[0], acked[1], acked[2]), None)
        self._rewrite()

    def close(self) -> None:
        with self._lock:
            if self._fh is not None:
                self._fh.close()
                self._fh = None

    def add(
        self,
        reports: Sequence[AttemptReport],
        results: Mapping[tuple[int, int], wire.FunctionResult] | None = None,
    ) -> None:
        """Buffer reports (numbered per attempt), on disk before this returns. ``results``:
        function calls' results, by attempt, each sent with its attempt's terminal report."""
        with self._lock:
            lines = []
            seqs: dict[tuple[int, int], int] = {}
            items: dict[Key, wire.Report] = {}
            for report in reports:
                key = (report.job_id, report.attempt)
                seq = seqs.get(key, self._seqs.get(key, 0)) + 1
                seqs[key] = seq
                result = results.get(key) if results and int(report.status) in _TERMINAL else None
                item = wire.report_to_wire(report, seq, result)
                items[(report.job_id, report.attempt, seq)] = item
                lines.append(json.dumps({"r": item.model_dump()}))
            # pending once on disk: if the write fails (a full disk), nothing is, and the
            # caller's retry numbers them the same
            self._append(lines, sync=any(int(r.status) in _TERMINAL for r in reports))
            self._seqs.update(seqs)
            self._pending.update(items)
            self._bound()

    def pending(self, limit: int = 5000, max_bytes: int = 8 << 20) -> list[wire.Report]:
        """The oldest reports not acknowledged: at most ``limit``, and results of at most about
        ``max_bytes`` (at least one report): an exchange's body stays bounded."""
        out: list[wire.Report] = []
        size = 0
        with self._lock:
            for key in sorted(self._pending)[:limit]:
                report = self._pending[key]
                if report.result is not None:
                    size += sum(len(v or "") for v in (report.result.result, report.result.error))
                    if out and size > max_bytes:
                        break
                out.append(report)
        return out

    def attempts(self) -> set[tuple[int, int]]:
        """The attempts with reports not yet acknowledged."""
        with self._lock:
            return {(k[0], k[1]) for k in self._pending}

    def ended(self) -> set[tuple[int, int]]:
        """The attempts with a terminal report not yet acknowledged."""
        with self._lock:
            return {(k[0], k[1]) for k, r in self._pending.items() if r.status in _TERMINAL}

    def __len__(self) -> int:
        return len(self._pending)

    def done(self, keys: Iterable[Key]) -> None:
        """The server acknowledged (or refused) these: they are not sent again."""
        with self._lock:
            gone = []
            for k in keys:
                report = self._pending.pop((k[0], k[1], k[2]), None)
                if report is not None:
                    gone.append(list(k))
                    if int(report.status) in _TERMINAL:  # its last: no seq to number after it
                        self._seqs.pop((k[0], k[1]), None)  # (kept: an entry per job ever run)
            if not gone:
                return
            self._append([json.dumps({"a": gone})], sync=False)
            if self._lines > 1000 and self._lines > 10 * len(self._pending):
                self._rewrite_locked()

    def forget_attempt(self, attempts: Iterable[tuple[int, int]]) -> None:
        """Refused attempts: every report of theirs is dropped."""
        dropped = set(attempts)
        self.done([k for k in list(self._pending) if (k[0], k[1]) in dropped])
        with self._lock:
            for key in dropped:
                self._seqs.pop(key, None)

    # -- file -----------------------------------------------------------------------------------

    def _append(self, lines: list[str], sync: bool) -> None:
        if not lines:
            return
        if self._fh is None:
            self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (kept open)
        # after a failed write, a newline ends what part of it reached the file (replay skips it)
        text = ("\n" if self._torn else "") + "".join(line + "\n" for line in lines)
        try:
            self._fh.write(text)
            self._fh.flush()
            if sync:
                os.fdatasync(self._fh.fileno())
        except BaseException:
            self._torn = True
            fh, self._fh = self._fh, None  # reopened next time: its buffer holds no stale part
            with contextlib.suppress(OSError):
                fh.close()
            raise
        self._torn = False
        self._lines += len(lines)

    def _rewrite(self) -> None:
        with self._lock:
            self._rewrite_locked()

    def _rewrite_locked(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            for key in sorted(self._pending):
                fh.write(json.dumps({"r": self._pending[key].model_dump()}) + "\n")
            fh.flush()
            os.fdatasync(fh.fileno())
        os.replace(tmp, self.path)
        self._lines = len(self._pending)

    def _bound(self) -> None:
        excess = len(self._pending) - self.max_reports
        if excess <= 0:
            return
        drop = [k for k in sorted(self._pending) if self._pending[k].status not in _TERMINAL][:excess]
        for key in drop:
            del self._pending[key]
        self._rewrite_locked()
