"""The sandbox spawner's own process: starts, holds, releases and reaps the bwrap runtime's sandboxes.

Run as ``python -I -S spawner_loop.py FD PARENT`` by :mod:`openhtc.runtimes.spawner`; FD is its
end of a socket pair, PARENT the server's pid. Standard library only (and the message framing
of ``launcher_loop.py`` beside it), so it starts in a few milliseconds.

Why a process of its own: every step of a sandbox's start is a wait that ends in a system call
(the vfork and exec of bwrap, which ``posix_spawn`` makes under the GIL; the job cgroup's
migrations, each waiting for an RCU grace period on cgroup v1; bwrap's ``--info-fd``; the
release of the held sandbox the moment the job ahead of it ends; the sandbox init's death). In
the server each of those needs the GIL back from the API, the scheduler and the executor's
database turns; here one single-threaded loop does only them.

A sandbox is started by a fork of this loop whose child, before it execs bwrap: asks for
SIGKILL when this loop dies (``PR_SET_PDEATHSIG``, then checks the loop is still its parent),
makes a session of its own, and writes itself into the job's cgroups (``cgroup.procs`` of each
hierarchy). So bwrap is born in the job's cgroup and never runs outside it, and no process of a
sandbox can outlive this loop, which itself dies with the server (``PR_SET_PDEATHSIG`` too, and
it kills its sandboxes and exits when the server's end of the socket closes). The loop itself
lives outside every job's cgroup: a job's OOM, its limits and the sweep of its cgroup never
touch it.

bwrap reports the sandbox on ``--info-fd`` and waits on ``--block-fd`` (the sandbox keeps its own
writer of that pipe, ``--sync-fd``, so it stays blocked whatever happens to this loop). The loop
releases it once it is armed (at once, or when the server says so: after it joined the job
network) and the job it comes ``after`` (a key) has ended: its bwrap exited.

Messages are length-prefixed pickles (both ends are openhtc). From the server:
``("spawn", key, argv, env, procs, after, armed)`` (``argv`` is bwrap's whole command line up to
``--``, without the descriptors; ``procs`` the job cgroup's ``cgroup.procs`` files),
``("release", key)`` (arm it), ``("kill", key)``, ``("withdraw", key)`` and ``("bye",)``.
To the server: ``("ready", key, bwrap_pid, init_pid)`` with three descriptors (the output pipe's
read end, a pidfd of bwrap, a pidfd of the sandbox's init), ``("running", key)`` once released,
``("failed", key, said, returncode)`` when bwrap exited before it set the sandbox up (what it
wrote), ``("withdrawn", key, was_held)`` and ``("exited", key, returncode)`` once bwrap has exited
and the sandbox's init is gone (every process of its pid namespace with it), or
``INIT_WAIT`` seconds later.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import pickle
import selectors
import signal
import socket
import sys
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING or __package__:  # imported by the server (tests), as part of openhtc
    from openhtc.runtimes.launcher_loop import Decoder, encode
else:  # run as a script by ``python -I -S``
    sys.path.append(os.path.dirname(os.path.abspath(__file__)))
    from launcher_loop import Decoder, encode

PR_SET_PDEATHSIG = 1
# Python ignores SIGPIPE and SIGXFSZ, this loop SIGINT; the job must not (exec keeps ignored ones)
RESTORED_SIGNALS = (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT)
INIT_WAIT = 2.0  # seconds the sandbox's init gets to die after bwrap (it has a parent-death signal)


def die_with_parent(parent: int, prctl: Any, sig: int = signal.SIGKILL) -> None:
    """``sig`` when the parent dies; exit at once if it already has."""
    prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)


class _Sandbox:
    __slots__ = (
        "after", "armed", "block_w", "code", "info", "info_r", "init_fd", "init_until", "key",
        "killed", "out_r", "pid", "pidfd", "ready", "released",
    )  # fmt: skip

    def __init__(self, key: int, pid: int, info_r: int, block_w: int, out_r: int, after: int | None) -> None:
        self.key = key
        self.pid = pid
        self.pidfd = os.pidfd_open(pid)
        self.info_r: int | None = info_r
        self.info = b""
        self.block_w: int | None = block_w
        self.out_r: int | None = out_r
        self.after = after
        self.armed = False
        self.ready = False
        self.released = False
        self.killed = False
        self.code: int | None = None
        self.init_fd: int | None = None
        self.init_until = 0.0


class Loop:
    def __init__(self, sock: socket.socket, prctl: Any) -> None:
        self.sock = sock
        self.prctl = prctl
        self.me = os.getpid()
        self.sel = selectors.DefaultSelector()
        self.sel.register(sock, selectors.EVENT_READ, ("server", None))
        self.jobs: dict[int, _Sandbox] = {}
        self.waiting_init: dict[int, _Sandbox] = {}
        self.decoder = Decoder()

    def send(self, message: tuple[Any, ...], fds: list[int] | None = None) -> None:
        data = encode(message)
        if fds:
            sent = socket.send_fds(self.sock, [data], fds)
            data = data[sent:]
        if data:
            self.sock.sendall(data)

    def run(self) -> None:
        while True:
            timeout = None
            if self.waiting_init:
                timeout = max(0.0, min(j.init_until for j in self.waiting_init.values()) - time.monotonic())
            for skey, _ in self.sel.select(timeout):
                kind, job = skey.data
                if kind == "server":
                    if not self.from_server():
                        return
                elif kind == "info" and job.info_r is not None:  # (not done earlier in this batch)
                    self.on_info(job)
                elif kind == "exit" and job.code is None:
                    self.on_exit(job)
                elif kind == "init":
                    self.init_gone(job)
            now = time.monotonic()
            for job in [j for j in self.waiting_init.values() if j.init_until <= now]:
                self.init_gone(job)

    # -- the server's messages ------------------------------------------------------------------

    def from_server(self) -> bool:
        try:
            data = self.sock.recv(1 << 16)
        except OSError:
            data = b""
        if not data:
            return False
        for message in self.decoder.feed(data):
            kind = message[0]
            if kind == "bye":
                return False
            job = self.jobs.get(message[1]) if len(message) > 1 else None
            if kind == "spawn":
                self.spawn(*message[1:])
            elif job is None:
                if kind == "withdraw":
                    self.send(("withdrawn", message[1], False))
            elif kind == "release":
                job.armed = True
                self.try_release(job)
            elif kind == "kill":
                self.kill(job)
            elif kind == "withdraw":  # only a job still behind another: any other is let go
                held = not job.released and job.after is not None
                if held:
                    self.kill(job)
                self.send(("withdrawn", job.key, held))
        return True

    def spawn(
        self, key: int, argv: list[str], env: dict[str, str], procs: list[str], after: int | None, armed: bool
    ) -> None:
        info_r, info_w = os.pipe()
        block_r, block_w = os.pipe()
        out_r, out_w = os.pipe()
        keep = (info_w, block_r, block_w)
        fd_args = ["--info-fd", str(info_w), "--block-fd", str(block_r), "--sync-fd", str(block_w)]
        argv = [*argv[:1], *fd_args, *argv[1:]]
        try:
            pid = os.fork()
        except OSError as exc:
            for fd in (info_r, info_w, block_r, block_w, out_r, out_w):
                os.close(fd)
            self.send(("failed", key, f"cannot fork: {exc.strerror}", 127))
            return
        if pid == 0:  # the child: nothing but system calls until exec
            try:
                die_with_parent(self.me, self.prctl)
                os.setsid()
                mine = str(os.getpid()).encode()
                for path in procs:  # born in the job's cgroup: what bwrap starts is too
                    fd = os.open(path, os.O_WRONLY)
                    try:
                        os.write(fd, mine)
                    finally:
                        os.close(fd)
                null = os.open(os.devnull, os.O_RDONLY)
                os.dup2(null, 0)
                os.dup2(out_w, 1)
                os.dup2(out_w, 2)
                for fd in keep:
                    os.set_inheritable(fd, True)
                for sig in RESTORED_SIGNALS:
                    signal.signal(sig, signal.SIG_DFL)
                os.execve(argv[0], argv, env)
            except BaseException as exc:
                with contextlib.suppress(BaseException):
                    os.write(2, f"cannot start {argv[0]}: {exc}\n".encode())
            finally:
                os._exit(127)
        for fd in (info_w, block_r, out_w):
            os.close(fd)
        job = _Sandbox(key, pid, info_r, block_w, out_r, after)
        job.armed = armed
        if after is not None and (after not in self.jobs or self.jobs[after].code is not None):
            job.after = None  # the job ahead has ended already
        self.jobs[key] = job
        self.sel.register(info_r, selectors.EVENT_READ, ("info", job))
        self.sel.register(job.pidfd, selectors.EVENT_READ, ("exit", job))

    # -- a sandbox's life -----------------------------------------------------------------------

    def on_info(self, job: _Sandbox) -> None:
        assert job.info_r is not None
        try:
            chunk = os.read(job.info_r, 4096)
        except OSError:
            chunk = b""
        if chunk:
            job.info += chunk
            return
        self._close_info(job)
        try:
            init = int(json.loads(job.info)["child-pid"])
            init_fd = os.pidfd_open(init)
        except (ValueError, KeyError, TypeError, OSError):
            return  # bwrap failed (or was killed): its exit says what happened
        job.init_fd = init_fd
        job.ready = True
        assert job.out_r is not None
        self.send(("ready", job.key, job.pid, init), [job.out_r, job.pidfd, init_fd])
        os.close(job.out_r)
        job.out_r = None
        self.try_release(job)

    def _close_info(self, job: _Sandbox) -> None:
        if job.info_r is not None:
            self.sel.unregister(job.info_r)
            os.close(job.info_r)
            job.info_r = None

    def try_release(self, job: _Sandbox) -> None:
        held = not (job.released or job.killed) and job.code is None
        if held and job.ready and job.armed and job.after is None:
            job.released = True
            block_w, job.block_w = job.block_w, None
            if block_w is not None:
                with contextlib.suppress(OSError):  # bwrap died meanwhile: its exit tells
                    os.write(block_w, b"go")
                os.close(block_w)
            self.send(("running", job.key))

    def kill(self, job: _Sandbox) -> None:
        job.killed = True
        if job.code is None:
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(job.pidfd, signal.SIGKILL)
            with contextlib.suppress(OSError):
                os.killpg(job.pid, signal.SIGKILL)
        if job.init_fd is not None:  # a released init has a session of its own, and may not
            with contextlib.suppress(OSError):  # die with bwrap: its pid namespace goes with it
                signal.pidfd_send_signal(job.init_fd, signal.SIGKILL)

    def on_exit(self, job: _Sandbox) -> None:
        self.sel.unregister(job.pidfd)
        _, status = os.waitpid(job.pid, 0)
        job.code = os.waitstatus_to_exitcode(status)
        if job.info_r is not None:  # what is left of the info, if bwrap wrote it all
            with contextlib.suppress(OSError):
                os.set_blocking(job.info_r, False)
                while chunk := os.read(job.info_r, 4096):
                    job.info += chunk
            if job.info:
                self.on_info(job)
            else:
                self._close_info(job)
        for other in self.jobs.values():  # the jobs held behind this one go now
            if other.after == job.key:
                other.after = None
                self.try_release(other)
        if job.block_w is not None:
            os.close(job.block_w)
            job.block_w = None
        if not job.ready:
            said = b""
            if job.out_r is not None:
                os.set_blocking(job.out_r, False)
                with contextlib.suppress(OSError):
                    while chunk := os.read(job.out_r, 65536):
                        said = (said + chunk)[-4096:]
                os.close(job.out_r)
                job.out_r = None
            os.close(job.pidfd)
            del self.jobs[job.key]
            self.send(("failed", job.key, said.decode("utf-8", "replace").strip(), job.code))
            return
        job.init_until = time.monotonic() + INIT_WAIT
        self.waiting_init[job.key] = job
        assert job.init_fd is not None
        self.sel.register(job.init_fd, selectors.EVENT_READ, ("init", job))

    def init_gone(self, job: _Sandbox) -> None:
        """bwrap has exited and its sandbox's init is gone (or had its time): the job has ended."""
        if self.waiting_init.pop(job.key, None) is None:
            return
        assert job.init_fd is not None
        self.sel.unregister(job.init_fd)
        os.close(job.init_fd)
        os.close(job.pidfd)
        del self.jobs[job.key]
        self.send(("exited", job.key, job.code))

    def kill_all(self) -> None:
        for job in self.jobs.values():
            self.kill(job)


def _exit_now(signum: int, frame: Any) -> None:
    raise SystemExit(1)


def main() -> None:
    fd, parent = int(sys.argv[1]), int(sys.argv[2])
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    # SIGTERM, not SIGKILL, when the server dies: the sandboxes go first (below), their
    # inits included (a released one does not always die with its bwrap).
    signal.signal(signal.SIGTERM, _exit_now)
    die_with_parent(parent, prctl, signal.SIGTERM)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server stops it
    sock = socket.socket(fileno=fd)
    sock.set_inheritable(False)
    loop = Loop(sock, prctl)
    try:
        loop.run()
    except (OSError, pickle.PickleError, SystemExit):
        pass
    finally:
        loop.kill_all()


if __name__ == "__main__":
    main()
