"""The job launcher's own process: starts, watches and reaps the process runtime's jobs.

Run as ``python -I -S launcher_loop.py FD`` by :mod:`openhtc.runtimes.launcher`; FD is its end
of a socket pair. It imports only the standard library and ``joblog.py`` (beside it, standard
library only too: the log rules every runtime shares), so it starts in a few milliseconds.

Why a process of its own: the server's worker threads share one GIL with the API, the
scheduler and the executor's database turns, and a thread that spawns a job needs the GIL back
after every system call (pipe, vfork, exec, read, wait). Once another thread keeps the GIL
busy half the time, such threads start half as many jobs. Here one single-threaded epoll loop
does only this: ``posix_spawn`` (it may ``chdir`` first: it has no other threads), a pidfd per
job for its exit, and the job's output copied to its log file (``joblog.LogWriter``).

A start may name the job it comes ``after``: it is held here and spawned the moment that one
ends, so a slot of the executor never waits for a round trip to the server between two jobs.
``("withdraw", key)`` takes a held job back (the executor found it a free slot elsewhere
while the job it waits for runs on); the answer says whether it was still held.
The working directory is the job's to use; once the job has ended, a directory it left anything
in is replaced by an empty one (0700) before the next job starts in it.

Messages are length-prefixed pickles (both ends are openhtc). From the server:
``("env", env_id, variables)`` (what many jobs share, sent once), ``("forget",)`` (drop them
all), ``("start", key, argv, env_id, variables, cwd, log_path, after, ident)`` (the job's environment
is its own ``variables`` updated with the shared ones of ``env_id``), ``("withdraw", key)``,
``("kill", key)`` and ``("bye",)`` (a clean stop: see below).
To the server:
``("started", key, pid)``, ``("failed", key, why)`` when it could not spawn,
``("withdrawn", key, was_held)`` and ``("exited", key, returncode)`` once the job's main
process has exited and what it wrote is in the log (``returncode`` as ``Popen.returncode``: -N means
killed by signal N; a held job that is killed before it started exits with -9 without a
"started").

A job ends when its main process exits; what it left behind is killed then: its process
group, and every process it started that left the group (``setsid``, ``nohup``, a double fork).
The launcher is a child subreaper, so such orphans become its children; each job carries
``OPENHTC_LAUNCHER_JOB=<key>`` in its environment, and an orphan whose job has ended (or that
carries no key and no job that started before it still runs) is killed within 20 ms of a
job's end, and again shortly after.

Output past ``max_log_bytes`` (argv[2], 0 for no cap) is discarded after one marker line; a log
that cannot be written (ENOSPC) loses the job's output, never the launcher or another job
(``joblog.py``).

A clean stop sends ``("bye",)`` first: then, or when the server's end of the socket closes
and the launcher has no place to wait for the next server, it kills every job still running and
everything they started, and exits.

Surviving the server (argv[3], argv[4]: a unix socket path and ``adopt_seconds``): the launcher
listens on that socket (0600). When the server's end closes without a ``bye`` (``kill -9``, a
crash), its jobs keep running, their output still goes to their logs and each one's exit code
is kept; held starts are dropped (they never started). The next server connects to the socket
and gets ``("inventory", running, ended, dropped)``: ``running`` as ``(key, ident, pid,
seconds_run, cwd)``, ``ended`` as ``(key, ident, returncode)`` for the jobs that ended in
the last ``ENDED_KEPT_SECONDS`` (the server may not have seen or recorded those ends; it matches
them against its attempt journal), ``dropped`` as the ``ident`` of dropped held starts. A start
message carries its ``ident`` (plain values: the job's identity, opaque here). From then on
that server is the launcher's; no second connection is served while one is. If no server
comes within ``adopt_seconds``, the launcher kills its jobs and exits, as after a ``bye``. A
launcher with no job running when its server goes away waits at most ENDED_KEPT_SECONDS (for
the ends it keeps), and one with nothing at all to hand over exits at once.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import functools
import os
import pickle
import selectors
import shutil
import signal
import socket
import stat
import struct
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING or __package__:  # imported by the server, as part of openhtc
    from openhtc.runtimes.joblog import LogWriter, append_to
else:  # run as a script by ``python -I -S``: the module beside this file (standard library only)
    sys.path.append(os.path.dirname(os.path.abspath(__file__)))
    from joblog import LogWriter, append_to

HEADER = struct.Struct("!I")
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
# Python ignores SIGPIPE (and SIGXFSZ); a spawned job would inherit that. Popen restores them too.
RESTORED_SIGNALS = (signal.SIGPIPE, signal.SIGXFSZ)
JOB_ENV = "OPENHTC_LAUNCHER_JOB"  # names the job a process belongs to, inherited by its children
PR_SET_CHILD_SUBREAPER = 36
ENDED_KEPT_SECONDS = 30.0  # ended jobs the inventory of a next server lists: a report flush
# takes milliseconds; an end older than this whose report was never committed is recovered from
# the journal instead (an infrastructure fault). The cap bounds the memory at high job rates.
ENDED_KEPT_MAX = 20_000
FOLLOW_UP_SWEEPS = (0.02, 0.2, 1.0, 5.0)  # seconds after a job's end: late orphans of its tree
START_SLACK = 0.05  # /proc start times are in clock ticks (10 ms): compare them generously
TICKS = os.sysconf("SC_CLK_TCK")


def encode(message: tuple[Any, ...]) -> bytes:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return HEADER.pack(len(body)) + body


class Decoder:
    """Splits a byte stream back into messages."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[Any, ...]]:
        self._buf += data
        out: list[tuple[Any, ...]] = []
        pos = 0
        size = HEADER.size
        while len(self._buf) - pos >= size:
            (length,) = HEADER.unpack_from(self._buf, pos)
            if len(self._buf) - pos - size < length:
                break
            out.append(pickle.loads(self._buf[pos + size : pos + size + length]))
            pos += size + length
        del self._buf[:pos]
        return out


class ServerGone(Exception):
    """The server went away and nothing waits for the next one: the loop ends (said already)."""


class _Job:
    __slots__ = ("code", "cwd", "ident", "key", "out", "output", "pid", "pidfd", "spawned")

    def __init__(
        self, key: int, pid: int, pidfd: int, out: int, cwd: str, log_path: str, max_bytes: int, ident: Any
    ) -> None:
        self.key = key
        self.ident = ident
        self.pid = pid
        self.pidfd = pidfd
        self.out: int | None = out  # read end of the job's stdout/stderr; None at EOF
        self.cwd = cwd
        # the log, opened at the first line: silent jobs write no file
        self.output = LogWriter(functools.partial(append_to, log_path), max_bytes or None)
        self.code: int | None = None  # set once reaped
        self.spawned = time.clock_gettime(time.CLOCK_BOOTTIME)  # the clock of /proc's start times


def reset_workdir(path: str) -> None:
    """Leave ``path`` an empty 0700 directory; what a job left there is deleted in the background."""
    try:
        if not os.listdir(path) and stat.S_IMODE(os.stat(path).st_mode) == 0o700:
            return  # the common case: one listdir and one stat
    except OSError:
        pass
    trash = f"{path}.trash-{time.monotonic_ns()}"
    with contextlib.suppress(OSError):
        os.rename(path, trash)
        threading.Thread(target=shutil.rmtree, args=(trash, True), daemon=True).start()
    with contextlib.suppress(OSError):
        shutil.rmtree(path, ignore_errors=True)  # the rename failed: delete in place
    os.makedirs(path, exist_ok=True)
    os.chmod(path, 0o700)


class Loop:
    def __init__(
        self,
        sock: socket.socket,
        max_log_bytes: int = 0,
        listener: socket.socket | None = None,
        adopt_seconds: float = 0.0,
    ) -> None:
        self.sock: socket.socket | None = sock
        self.max_log_bytes = max_log_bytes
        self.listener = listener  # where the next server finds us after a crash (None: nowhere)
        self.adopt_seconds = adopt_seconds
        self.orphaned_at: float | None = None  # when the server went away without a bye
        self.waits = adopt_seconds  # from then on, how long for the next one
        self.ended: collections.deque[tuple[float, int, Any, int]] = collections.deque()
        self.dropped: list[Any] = []  # idents of held starts dropped when the server went away
        self.pid = os.getpid()
        self.sweeps: list[float] = []  # when to look for orphans again (monotonic, ascending)
        self.sel = selectors.DefaultSelector()
        self.sel.register(sock, selectors.EVENT_READ, None)
        if listener is not None:
            self.sel.register(listener, selectors.EVENT_READ, "listen")
        self.decoder = Decoder()
        self.jobs: dict[int, _Job] = {}
        self.held: dict[int, tuple[Any, ...]] = {}  # job key -> the start that waits for it
        self.held_keys: dict[int, int] = {}  # held start's key -> the job it waits for
        self.shared_envs: dict[int, dict[str, str]] = {}
        self.devnull = os.devnull
        self.replies: list[bytes] = []
        self.bye = False  # a clean stop: the server's close ends the jobs

    def run(self) -> None:
        try:
            while True:
                timeout = max(0.0, self.sweeps[0] - time.monotonic()) if self.sweeps else None
                if self.orphaned_at is not None:
                    left = self.orphaned_at + self.waits - time.monotonic()
                    if left <= 0:
                        _say("no server came back in time; its jobs were killed")
                        return
                    timeout = left if timeout is None else min(timeout, left)
                for key, _ in self.sel.select(timeout):
                    if key.data is None:
                        if not self._control() and not self._orphan(key.fileobj):
                            return
                    elif key.data == "listen":
                        self._accept()
                    else:
                        job, is_exit = key.data
                        if is_exit:
                            self._reap(job)
                        else:
                            self._output(job)
                if self.sweeps and self.sweeps[0] <= time.monotonic():
                    del self.sweeps[0]
                    self._sweep()
                if self.replies:
                    self._send()
        finally:
            for job in self.jobs.values():
                if job.code is None:
                    with contextlib.suppress(OSError):
                        os.killpg(job.pid, signal.SIGKILL)
            self.jobs.clear()
            deadline = time.monotonic() + 5
            while self._sweep() and time.monotonic() < deadline:  # until nothing is left
                time.sleep(0.01)

    def _send(self) -> None:
        data = b"".join(self.replies)
        self.replies.clear()
        if self.sock is None:
            return  # no server: what the next one needs is in the inventory
        try:
            self.sock.sendall(data)
        except OSError:  # the server died with messages unread
            if not self._orphan(self.sock):
                raise ServerGone from None

    def _orphan(self, sock: Any) -> bool:
        """The server's end closed without a bye: wait for the next server (True), or not (False:
        the caller ends the loop, which kills every job)."""
        if self.sock is not None and sock is self.sock:
            with contextlib.suppress(KeyError, ValueError):
                self.sel.unregister(self.sock)
            self.sock.close()
            self.sock = None
        self.decoder = Decoder()
        self.replies.clear()
        if self.bye:
            return False
        if self.listener is None or self.adopt_seconds <= 0:
            _say("the server went away; its jobs were killed")
            return False
        self.orphaned_at = time.monotonic()
        # With jobs running, adopt_seconds; with only ends to hand over, as long as they are kept.
        self.waits = self.adopt_seconds if self.jobs else min(self.adopt_seconds, ENDED_KEPT_SECONDS)
        # Held starts never started: dropped, and named to the next server.
        self.dropped += [start[5] for start in self.held.values()]
        self.held.clear()
        self.held_keys.clear()
        self._prune_ended()
        if not self.jobs and not self.ended and not self.dropped:
            _say("the server went away; no job to keep")
            return False  # nothing a next server could take back
        _say(f"the server went away; {len(self.jobs)} job(s) keep running, for {self.waits:.0f} s at most")
        return True

    def _accept(self) -> None:
        assert self.listener is not None
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        if self.sock is not None:  # a server has us: no second one
            conn.close()
            return
        conn.setblocking(True)
        self._prune_ended()
        running = [
            (j.key, j.ident, j.pid, time.clock_gettime(time.CLOCK_BOOTTIME) - j.spawned, j.cwd)
            for j in self.jobs.values()
        ]
        ended = [(key, ident, code) for _, key, ident, code in self.ended]
        try:
            conn.sendall(encode(("inventory", running, ended, self.dropped)))
        except OSError:
            conn.close()
            return
        self.sock, self.orphaned_at, self.dropped = conn, None, []
        self.shared_envs.clear()  # the new server numbers its environments afresh
        self.sel.register(conn, selectors.EVENT_READ, None)

    def _prune_ended(self) -> None:
        """Forget ends older than ENDED_KEPT_SECONDS before the server went away (or now, while
        one is connected); an end after it went away is kept for the next one."""
        orphaned = self.orphaned_at
        horizon = (orphaned if orphaned is not None else time.monotonic()) - ENDED_KEPT_SECONDS
        while self.ended and (
            self.ended[0][0] < horizon or (orphaned is None and len(self.ended) > ENDED_KEPT_MAX)
        ):
            self.ended.popleft()

    def _control(self) -> bool:
        assert self.sock is not None
        try:
            data = self.sock.recv(1 << 16)
        except OSError:
            data = b""
        if not data:
            return False
        for message in self.decoder.feed(data):
            if message[0] == "start":
                _, key, argv, env_id, env, cwd, log_path, after, *rest = message
                env.update(self.shared_envs[env_id])
                start = (key, argv, env, cwd, log_path, rest[0] if rest else None)
                if after is not None and (after in self.jobs or after in self.held_keys):
                    self.held[after] = start
                    self.held_keys[key] = after
                else:
                    self._start(*start)
            elif message[0] == "kill":
                self._kill(message[1])
            elif message[0] == "withdraw":
                after = self.held_keys.pop(message[1], None)
                if after is not None:
                    del self.held[after]
                self.replies.append(encode(("withdrawn", message[1], after is not None)))
            elif message[0] == "env":
                self.shared_envs[message[1]] = message[2]
            elif message[0] == "forget":
                self.shared_envs.clear()
            elif message[0] == "bye":
                self.bye = True
        return True

    def _start(
        self, key: int, argv: list[str], env: dict[str, str], cwd: str, log_path: str, ident: Any = None
    ) -> None:
        env[JOB_ENV] = str(key)
        read_end, write_end = os.pipe()
        try:
            # posix_spawnp searches this process's PATH, so make it the job's (as execvpe would).
            path = env.get("PATH", DEFAULT_PATH)
            if os.environ.get("PATH") != path:
                os.environ["PATH"] = path
            os.chdir(cwd)
            pid = os.posix_spawnp(
                argv[0],
                argv,
                env,
                file_actions=[
                    (os.POSIX_SPAWN_OPEN, 0, self.devnull, os.O_RDONLY, 0),
                    (os.POSIX_SPAWN_DUP2, write_end, 1),
                    (os.POSIX_SPAWN_DUP2, write_end, 2),
                ],
                setsid=True,
                setsigdef=RESTORED_SIGNALS,
            )
        except (OSError, ValueError, IndexError) as exc:  # no such program, cwd gone, empty argv
            os.close(read_end)
            self.replies.append(encode(("failed", key, str(exc) or repr(exc))))
            self._start_held_behind(key)
            return
        finally:
            os.close(write_end)
        pidfd = os.pidfd_open(pid)
        job = _Job(key, pid, pidfd, read_end, cwd, log_path, self.max_log_bytes, ident)
        self.jobs[key] = job
        self.sel.register(read_end, selectors.EVENT_READ, (job, False))
        self.sel.register(pidfd, selectors.EVENT_READ, (job, True))
        self.replies.append(encode(("started", key, pid)))

    def _kill(self, key: int) -> None:
        after = self.held_keys.pop(key, None)
        if after is not None:  # not started yet: it never will be
            del self.held[after]
            self.replies.append(encode(("exited", key, -signal.SIGKILL)))
            self._start_held_behind(key)  # what waited for it starts now
            return
        job = self.jobs.get(key)
        # Until the job is reported its process group exists (its leader unreaped, or members
        # that keep the output open), so the pid names no other process.
        if job is not None:
            with contextlib.suppress(OSError):
                os.killpg(job.pid, signal.SIGKILL)

    def _output(self, job: _Job) -> None:
        if job.out is None:
            # One select() can return both the job's exit and its output: _reap, run first,
            # drained and closed the pipe already, so this event is stale.
            return
        data = os.read(job.out, 1 << 16)
        if data:
            job.output.feed(data)
            return
        self.sel.unregister(job.out)
        os.close(job.out)
        job.out = None
        job.output.close()
        self._finish(job)

    def _reap(self, job: _Job) -> None:
        """The job's main process has exited: the job ends now. What it left in its process
        group dies with it (the leader is not reaped yet, so the group's id is still its own)."""
        with contextlib.suppress(OSError):
            os.killpg(job.pid, signal.SIGKILL)
        pid, status = os.waitpid(job.pid, os.WNOHANG)
        if pid == 0:
            return
        job.code = os.waitstatus_to_exitcode(status)
        self.sel.unregister(job.pidfd)
        os.close(job.pidfd)
        if job.out is not None:  # what is in the pipe already is the job's; then stop reading
            os.set_blocking(job.out, False)
            with contextlib.suppress(OSError):
                while data := os.read(job.out, 1 << 16):
                    job.output.feed(data)
            self.sel.unregister(job.out)
            os.close(job.out)
            job.out = None
            job.output.close()
        self._finish(job)

    def _finish(self, job: _Job) -> None:
        """Report the job once its process is reaped and its output closed."""
        if job.code is None or job.out is not None:
            return
        del self.jobs[job.key]
        with contextlib.suppress(OSError):  # a full disk: the next job here fails to start
            reset_workdir(job.cwd)
        self.replies.append(encode(("exited", job.key, job.code)))
        if self.listener is not None:  # for the inventory of a next server, should this one die
            self.ended.append((time.monotonic(), job.key, job.ident, job.code))
            if len(self.ended) > ENDED_KEPT_MAX or self.ended[0][0] < time.monotonic() - ENDED_KEPT_SECONDS:
                self._prune_ended()
        self._start_held_behind(job.key)
        # Orphans of the job are killed by the next sweep, within FOLLOW_UP_SWEEPS[0]: one sweep
        # per job would cost ~10 % of the launcher's job rate; this is one per 20 ms at most.
        now = time.monotonic()
        if not self.sweeps or self.sweeps[0] > now + FOLLOW_UP_SWEEPS[0]:
            self.sweeps = [now + delay for delay in FOLLOW_UP_SWEEPS]

    def _sweep(self) -> int:
        """Kill and reap our children that are no running job's main process: orphans of
        ended jobs. Returns how many were found.

        An orphan names its job in its environment. One that cleared it could belong to any job
        started before it: it is kept while such a job runs, and killed once none does."""
        mains = {job.pid for job in self.jobs.values()}
        found = 0
        for pid in _children(self.pid):
            if pid in mains:
                continue
            state, started = _stat(pid)
            if state not in ("Z", "X", ""):  # zombies are only reaped
                key = _job_key(pid)
                if key is not None and key in self.jobs:
                    continue  # a running job's daemon: it lives as long as its job
                if key is None and any(j.spawned <= started + START_SLACK for j in self.jobs.values()):
                    continue
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            found += 1
            with contextlib.suppress(OSError):
                os.waitpid(pid, os.WNOHANG)
        return found

    def _start_held_behind(self, key: int) -> None:
        """Start what was held behind the job ``key``, which has ended."""
        start = self.held.pop(key, None)
        if start is not None:
            del self.held_keys[start[0]]
            self._start(*start)


def _children(pid: int) -> list[int]:
    """Our children (reparented orphans included), from every thread's list."""
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in tasks:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/children") as fh:
            found += [int(p) for p in fh.read().split()]
    return found


def _stat(pid: int) -> tuple[str, float]:
    """(state, start time in CLOCK_BOOTTIME seconds) of a process; ("", 0) once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rpartition(")")[2].split()
        return fields[0], int(fields[19]) / TICKS
    except (OSError, IndexError, ValueError):
        return "", 0.0


def _job_key(pid: int) -> int | None:
    """The job a process belongs to, from its environment (None: none, or unreadable)."""
    needle = f"{JOB_ENV}=".encode()
    try:
        with open(f"/proc/{pid}/environ", "rb") as fh:
            for item in fh.read().split(b"\0"):
                if item.startswith(needle):
                    return int(item[len(needle) :])
    except (OSError, ValueError):
        pass
    return None


def _say(message: str) -> None:
    """One line to stderr (the server's log, which may be gone)."""
    with contextlib.suppress(OSError, ValueError):
        print(f"openhtc job launcher: {message} (launcher pid {os.getpid()})", file=sys.stderr, flush=True)


def listen(path: str) -> socket.socket | None:
    """A unix socket at ``path`` (0600) for the next server; it replaces what an older crash
    left there (the server connected to every live launcher before it started new ones)."""
    tmp = f"{path}.{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        old = os.umask(0o177)
        try:
            sock.bind(tmp)
        finally:
            os.umask(old)
        os.chmod(tmp, 0o600)
        sock.listen(4)
        os.rename(tmp, path)  # atomic: a stale socket is replaced, never half there
        with open(f"{path}.owner", "w") as fh:  # which launcher the socket is, for unlisten
            fh.write(str(os.getpid()))
    except OSError as exc:  # a path too long for a unix socket, a read-only directory
        sock.close()
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        _say(f"cannot listen on {path} ({exc}); its jobs will not outlive the server")
        return None
    sock.setblocking(False)
    os.set_inheritable(sock.fileno(), False)
    return sock


def unlisten(path: str, pid: int) -> None:
    """Remove our socket file, unless a newer launcher has replaced it meanwhile."""
    with contextlib.suppress(OSError):
        with open(f"{path}.owner") as fh:
            if int(fh.read() or 0) != pid:
                return
        os.unlink(path)


def main(argv: list[str]) -> int:
    fd = int(argv[1])
    max_log_bytes = int(argv[2]) if len(argv) > 2 else 0
    listen_path = argv[3] if len(argv) > 3 and argv[3] else None
    adopt_seconds = float(argv[4]) if len(argv) > 4 else 0.0
    os.set_inheritable(fd, False)  # passed to us inheritable; jobs must not hold the control socket
    # Orphans of our jobs (setsid, nohup, double forks) become our children, not init's.
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    # A server that dies while we wait for it must not take us with a SIGPIPE or a terminal's
    # SIGHUP (we are in a session of our own; this is for a re-parented terminal).
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    sock = socket.socket(fileno=fd)
    listener = listen(listen_path) if listen_path and adopt_seconds > 0 else None
    try:
        Loop(sock, max_log_bytes, listener, adopt_seconds).run()
    except ServerGone:
        pass
    except (ConnectionResetError, BrokenPipeError) as exc:
        # The server died (kill -9) with messages unread: an expected end, not a crash to trace.
        _say(f"the server went away ({exc.strerror}); its jobs were killed")
    finally:
        if listener is not None and listen_path:
            unlisten(listen_path, os.getpid())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
