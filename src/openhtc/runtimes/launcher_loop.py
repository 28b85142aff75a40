"""The job launcher's own process: starts, watches and reaps the process runtime's jobs.

Run as ``python -I -S launcher_loop.py FD`` by :mod:`openhtc.runtimes.launcher`; FD is its end
of a socket pair. It imports only the standard library, so it starts in a few milliseconds.

Why a process of its own: the server's worker threads share one GIL with the API, the
scheduler and the executor's database turns, and a thread that spawns a job needs the GIL back
after every system call (pipe, vfork, exec, read, wait). Once another thread keeps the GIL
busy half the time, such threads start half as many jobs. Here one single-threaded epoll loop
does only this: ``posix_spawn`` (it may ``chdir`` first: it has no other threads), a pidfd per
job for its exit, and the job's output copied to its log file with a timestamp per line
(``"{unix time}\t{line}"``, what :mod:`openhtc.services.logs` reads).

A start may name the job it comes ``after``: it is held here and spawned the moment that one
ends, so a slot of the executor never waits for a round trip to the server between two jobs.
``("withdraw", key)`` takes a held job back (the executor found it a free slot elsewhere
while the job it waits for runs on); the answer says whether it was still held.
The working directory is the job's to use; once the job has ended, a directory it left anything
in is replaced by an empty one (0700) before the next job starts in it.

Messages are length-prefixed pickles (both ends are openhtc). From the server:
``("env", env_id, variables)`` (what many jobs share, sent once), ``("forget",)`` (drop them
all), ``("start", key, argv, env_id, variables, cwd, log_path, after)`` (the job's environment
is its own ``variables`` updated with the shared ones of ``env_id``), ``("withdraw", key)`` and
``("kill", key)``.
To the server:
``("started", key, pid)``, ``("failed", key, why)`` when it could not spawn,
``("withdrawn", key, was_held)`` and ``("exited", key, returncode)`` once the job's process
has exited and its output reached EOF (``returncode`` as ``Popen.returncode``: -N means
killed by signal N; a held job that is killed before it started exits with -9 without a
"started").

When the server's end of the socket closes (a clean stop or a ``kill -9``), it kills the process
group of every job still running, and exits.
"""

from __future__ import annotations

import contextlib
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
from typing import Any, TextIO

HEADER = struct.Struct("!I")
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
# Python ignores SIGPIPE (and SIGXFSZ); a spawned job would inherit that. Popen restores them too.
RESTORED_SIGNALS = (signal.SIGPIPE, signal.SIGXFSZ)


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


class _Job:
    __slots__ = ("code", "cwd", "key", "log", "log_path", "out", "partial", "pid", "pidfd")

    def __init__(self, key: int, pid: int, pidfd: int, out: int, cwd: str, log_path: str) -> None:
        self.key = key
        self.pid = pid
        self.pidfd = pidfd
        self.out: int | None = out  # read end of the job's stdout/stderr; None at EOF
        self.cwd = cwd
        self.log_path = log_path
        self.log: TextIO | None = None  # opened at the first line: silent jobs write no file
        self.partial = b""
        self.code: int | None = None  # set once reaped

    def write(self, data: bytes) -> None:
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()
        if lines:
            self._write_lines(lines)

    def _write_lines(self, lines: list[bytes]) -> None:
        if self.log is None:
            os.makedirs(os.path.dirname(self.log_path), exist_ok=True)
            self.log = open(self.log_path, "a", encoding="utf-8", errors="replace")  # noqa: SIM115
        stamp = f"{time.time():.6f}\t"
        self.log.write("".join(f"{stamp}{line.decode('utf-8', 'replace')}\n" for line in lines))

    def close_output(self) -> None:
        if self.partial:
            self._write_lines([self.partial])
            self.partial = b""
        if self.log is not None:
            self.log.close()
            self.log = None


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
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sel = selectors.DefaultSelector()
        self.sel.register(sock, selectors.EVENT_READ, None)
        self.decoder = Decoder()
        self.jobs: dict[int, _Job] = {}
        self.held: dict[int, tuple[Any, ...]] = {}  # job key -> the start that waits for it
        self.held_keys: dict[int, int] = {}  # held start's key -> the job it waits for
        self.shared_envs: dict[int, dict[str, str]] = {}
        self.devnull = os.devnull
        self.replies: list[bytes] = []

    def run(self) -> None:
        try:
            while True:
                for key, _ in self.sel.select():
                    if key.data is None:
                        if not self._control():
                            return
                    else:
                        job, is_exit = key.data
                        if is_exit:
                            self._reap(job)
                        else:
                            self._output(job)
                if self.replies:
                    self.sock.sendall(b"".join(self.replies))
                    self.replies.clear()
        finally:
            for job in self.jobs.values():
                if job.code is None:
                    with contextlib.suppress(OSError):
                        os.killpg(job.pid, signal.SIGKILL)

    def _control(self) -> bool:
        data = self.sock.recv(1 << 16)
        if not data:
            return False
        for message in self.decoder.feed(data):
            if message[0] == "start":
                _, key, argv, env_id, env, cwd, log_path, after = message
                env.update(self.shared_envs[env_id])
                start = (key, argv, env, cwd, log_path)
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
        return True

    def _start(self, key: int, argv: list[str], env: dict[str, str], cwd: str, log_path: str) -> None:
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
        job = _Job(key, pid, pidfd, read_end, cwd, log_path)
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
        assert job.out is not None
        data = os.read(job.out, 1 << 16)
        if data:
            job.write(data)
            return
        self.sel.unregister(job.out)
        os.close(job.out)
        job.out = None
        job.close_output()
        self._finish(job)

    def _reap(self, job: _Job) -> None:
        pid, status = os.waitpid(job.pid, os.WNOHANG)
        if pid == 0:
            return
        job.code = os.waitstatus_to_exitcode(status)
        self.sel.unregister(job.pidfd)
        os.close(job.pidfd)
        self._finish(job)

    def _finish(self, job: _Job) -> None:
        """Report the job once its process is reaped and its output is at EOF (a background
        child that keeps the output open keeps the job running, as with Popen)."""
        if job.code is None or job.out is not None:
            return
        del self.jobs[job.key]
        reset_workdir(job.cwd)
        self.replies.append(encode(("exited", job.key, job.code)))
        self._start_held_behind(job.key)

    def _start_held_behind(self, key: int) -> None:
        """Start what was held behind the job ``key``, which has ended."""
        start = self.held.pop(key, None)
        if start is not None:
            del self.held_keys[start[0]]
            self._start(*start)


def main(argv: list[str]) -> int:
    fd = int(argv[1])
    os.set_inheritable(fd, False)  # passed to us inheritable; jobs must not hold the control socket
    sock = socket.socket(fileno=fd)
    try:
        Loop(sock).run()
    except (ConnectionResetError, BrokenPipeError) as exc:
        # The server died (kill -9) with messages unread: an expected end, not a crash to trace.
        print(
            f"openhtc job launcher: the server went away ({exc.strerror}); its jobs were killed",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
