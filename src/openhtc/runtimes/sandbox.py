"""One bwrap sandbox's process: spawned held, released, its output copied, reaped.

bwrap is started with ``os.posix_spawn`` (no ``fork`` of the big, multi-threaded server, no
``Popen`` bookkeeping) and waits twice. First for its ``--args`` (read before it does anything):
meanwhile the runtime moves it into the job's cgroup, so the sandbox is born there (one cgroup
migration, overlapping bwrap's own start, instead of one after it). ``proceed`` lets it go on;
it reports the sandbox's pid on ``--info-fd`` and waits on ``--block-fd`` (the runtime joins
the job's network then). ``release`` lets it run the job: at once, or the moment the job ahead
of it in the same slot ends (its pump releases it), so a slot's next sandbox is set up while
the current job still runs.

bwrap reads ``--block-fd`` until a byte or EOF, and EOF would come if the server died while a
sandbox is held: the sandbox keeps the write end itself (``--sync-fd``, closed before the job's
command runs), so a held sandbox never runs its job unless told; bwrap's outer process dies
with the server (``--die-with-parent``) and the restarted executor kills what its cgroup holds.

The output is copied to the job's log by whichever thread calls ``pump`` (the executor's worker
for this slot), with the rules of ``output.pump_output``: the job ends when bwrap does (its
main process exited); what is left holding the pipe ``grace`` seconds later is killed.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import select
import signal
import threading
import time
from collections.abc import Callable

from openhtc.runtimes.output import CHUNK, LogSink

RESTORED_SIGNALS = (signal.SIGPIPE, signal.SIGXFSZ)  # Python ignores them; the job must not
GRACE = 0.05  # seconds the rest of the sandbox gets to close the pipe once bwrap has exited


class SandboxGone(Exception):
    """The sandbox ended before it was set up (a cancel, bwrap failing): why."""


class Sandbox:
    """A bwrap process from ``spawn`` to ``reap``. ``kill`` may come from any thread; the rest
    is called from the slot's worker thread."""

    def __init__(
        self, bwrap_args: list[str], command: list[str], env: dict[str, str], kill_also: Callable[[], object]
    ) -> None:
        self._lock = threading.Lock()
        self._kill_also = kill_also
        self.code: int | None = None  # bwrap's exit status once reaped (Popen.returncode style)
        self.killed = False
        self.released = False
        self.successor: Sandbox | None = None  # released the moment this one's job ends
        self.on_release: Callable[[], None] | None = None
        self.over = False  # bwrap has exited (seen by the pump): the job's main process is gone
        self.ended = False  # ... and the output is copied
        self.child: int | None = None  # the sandbox's init (bwrap's child), once known
        self._child_fd: int | None = None
        self._sink: LogSink | None = None
        self._deadline: float | None = None
        args_r, self._args_w = os.pipe()
        info_r, info_w = os.pipe()
        block_r, self._block_w = os.pipe()
        out_r, out_w = os.pipe()
        try:
            argv = [bwrap_args[0], "--args", str(args_r), *bwrap_args[1:], "--info-fd", str(info_w)]
            argv += ["--block-fd", str(block_r), "--sync-fd", str(self._block_w), "--", *command]
            self.pid = os.posix_spawn(
                argv[0],
                argv,
                env,
                file_actions=[
                    (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                    (os.POSIX_SPAWN_DUP2, out_w, 1),
                    (os.POSIX_SPAWN_DUP2, out_w, 2),
                    # dup2 onto itself clears close-on-exec: bwrap gets these, and nothing else
                    *((os.POSIX_SPAWN_DUP2, fd, fd) for fd in (args_r, info_w, block_r, self._block_w)),
                ],
                setsid=True,
                setsigdef=RESTORED_SIGNALS,
            )
        except BaseException:
            for fd in (self._args_w, info_r, self._block_w, out_r):
                os.close(fd)
            raise
        finally:
            for fd in (args_r, info_w, block_r, out_w):
                os.close(fd)
        self.out: int | None = out_r
        self._info = info_r
        self.exited = os.pidfd_open(self.pid)
        self._poller = select.poll()
        self._poller.register(out_r, select.POLLIN)
        self._poller.register(self.exited, select.POLLIN)

    # -- set-up ---------------------------------------------------------------------------------

    def proceed(self) -> None:
        """Let bwrap go on past its ``--args`` (it has none more) and set the sandbox up."""
        if self._args_w >= 0:
            os.close(self._args_w)
            self._args_w = -1

    def wait_ready(self) -> int:
        """The sandbox's init pid, once bwrap has set it up and waits for ``release``."""
        try:
            data = b""
            while chunk := os.read(self._info, 4096):
                data += chunk
            self.child = int(json.loads(data)["child-pid"])
            self._child_fd = os.pidfd_open(self.child)
        except (ValueError, KeyError, TypeError, OSError) as exc:
            raise SandboxGone(self._early_output() or "bwrap failed") from exc
        finally:
            if self._info >= 0:  # _early_output's reap closed it
                os.close(self._info)
                self._info = -1
        return self.child

    def _early_output(self) -> str:
        """What bwrap said before it gave up (it has exited, or is killed now)."""
        self.kill()
        self.reap()  # never pumped: reap keeps what bwrap said as the sink's last output
        return self.last_output.strip()

    # -- running --------------------------------------------------------------------------------

    def release(self) -> None:
        """Let the sandbox run the job (once; not after a kill)."""
        with self._lock:
            if self.released or self.killed:
                return
            self.released = True
            block_w, self._block_w = self._block_w, -1
        try:
            with contextlib.suppress(OSError):  # bwrap died meanwhile: the pump sees it
                os.write(block_w, b"go")
        finally:
            os.close(block_w)
        if self.on_release is not None:
            self.on_release()

    def kill(self) -> None:
        """SIGKILL bwrap's process group and what else the job has (its cgroup)."""
        with self._lock:
            self.killed = True
            alive = self.code is None
            kill_also = self._kill_also
        if alive:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)
        kill_also()

    def retire(self) -> None:
        """The job is over and its cgroup goes back to the pool: a late kill (a cancel just
        after the end) must not reach the next job that gets that cgroup."""
        with self._lock:
            self._kill_also = _nothing

    def pump(self, sink: LogSink, timeout: float | None) -> bool:
        """Copy output to ``sink`` until the job has ended (True) or ``timeout`` passed (False).

        The successor is released as soon as bwrap has exited: the job's main process is gone.
        """
        self._sink = sink
        until = None if timeout is None else time.monotonic() + timeout
        while not self.ended:
            now = time.monotonic()
            waits = [t for t in (self._deadline, until) if t is not None]
            wait_ms = None if not waits else max(0, int((min(waits) - now) * 1000) + 1)
            events = dict(self._poller.poll(wait_ms))
            if self.out is not None and self.out in events:
                data = os.read(self.out, CHUNK)
                if data:
                    sink.feed(data)
                    continue
                self._close_out()  # EOF: bwrap, which holds the pipe too, has exited
                self._bwrap_exited()
            elif self.exited in events and self._deadline is None:
                self._poller.unregister(self.exited)
                self._bwrap_exited()
                self._deadline = time.monotonic() + GRACE
            if self.out is not None and self._deadline is not None and time.monotonic() >= self._deadline:
                self._kill_also()  # the rest of the sandbox kept the pipe open: it goes now
                os.set_blocking(self.out, False)
                with contextlib.suppress(BlockingIOError):
                    while data := os.read(self.out, CHUNK):
                        sink.feed(data)
                self._close_out()
            if self.out is None:
                self.ended = True
            elif until is not None and time.monotonic() >= until:
                return False
        return True

    def _bwrap_exited(self) -> None:
        self.over = True
        successor, self.successor = self.successor, None
        if successor is not None:
            successor.release()

    def _close_out(self) -> None:
        if self.out is not None:
            self._poller.unregister(self.out)
            os.close(self.out)
            self.out = None

    @property
    def last_output(self) -> str:
        return self._sink.last.decode("utf-8", "replace") if self._sink is not None else ""

    def wait_init(self, timeout: float = 2.0) -> None:
        """Wait for the sandbox's init to be gone: it dies right after bwrap (parent-death
        signal); waiting for that beats polling the cgroup."""
        if self._child_fd is not None:
            poller = select.poll()
            poller.register(self._child_fd, select.POLLIN)
            poller.poll(timeout * 1000)

    def reap(self) -> int:
        """bwrap's exit status; closes every descriptor. The output must be copied (or the
        process killed) first, or this waits for the job."""
        if self.code is None:
            if self.out is not None:  # never pumped: read what bwrap said (why it failed)
                sink = LogSink(io.StringIO, None)  # kept only as ``last``: why bwrap failed
                with contextlib.suppress(OSError):
                    while data := os.read(self.out, CHUNK):
                        sink.feed(data)
                sink.close()
                self._sink = sink
                self._close_out()
            _, status = os.waitpid(self.pid, 0)
            with self._lock:
                self.code = os.waitstatus_to_exitcode(status)
        # _info too: a set-up that never read it (the cgroup move failed before wait_ready)
        for fd in (self.exited, self._child_fd, self._block_w, self._args_w, self._info):
            if fd is not None and fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.exited, self._child_fd, self._block_w, self._args_w, self._info = -1, None, -1, -1, -1
        return self.code


def _nothing() -> None:
    """What a retired sandbox's kill does besides bwrap's own (nothing: its cgroup is not its own)."""
