"""What a container job's network reaches: nothing, openhtc only, or the host's whole network.

``none``: the job's own network namespace with only ``lo``. ``full``: the host's network
(``bwrap --share-net``, ``podman --network host``). ``openhtc`` (the default): the job keeps a
network namespace of its own, and in it the server opens a listening socket on each endpoint a
job may reach (the API, the S3 store) at the very address and port the host reaches it on, so
the URLs in the job's environment work unchanged (an address that is not loopback is added to
the job's ``lo`` first). A socket keeps the namespace it was created in, so the server creates
them from a thread that enters the job's namespace (``setns``, which switches only the calling
thread) and comes back. One forwarder thread accepts on every job's listeners and copies bytes
to the real endpoint from the host's namespace. Nothing else is routed: the namespace has no
other interface, so any other address is refused or unreachable.

bwrap creates the namespace (``--unshare-all``); ``attach`` adds the listeners while bwrap waits
on ``--block-fd`` and watches the sandbox's pidfd, closing them when the sandbox ends. For podman
the server creates the namespace itself (``unshare``, ``lo`` up) and hands it to
``podman run --network ns:/proc/<server>/fd/<n>``; it is closed when the job ends.

Endpoints must be IPv4 addresses: the job has no DNS, so an S3 endpoint given by name (AWS, a
store on another machine) is not reachable from ``openhtc`` jobs (``wiring.py`` logs which);
``full`` reaches it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import functools
import ipaddress
import logging
import os
import select
import socket
import struct
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit

log = logging.getLogger("openhtc.runtimes.jobnet")

MODES = ("none", "openhtc", "full")
CLONE_NEWNET = 0x40000000
IP_FREEBIND = 15  # bind before bwrap has brought `lo` up in the namespace
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
RTM_NEWADDR, IFA_ADDRESS, IFA_LOCAL, RT_SCOPE_HOST = 20, 1, 2, 254
NLM_F_REQUEST, NLM_F_ACK, NLM_F_EXCL, NLM_F_CREATE, NLMSG_ERROR = 0x1, 0x4, 0x200, 0x400, 2
CHUNK = 256 * 1024
MAX_CONNECTIONS = 128  # open at once per job; more are refused (each holds two server fds)


class JobNetError(OSError):
    pass


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A host:port a job may reach; inside the job it is served at the same address."""

    host: str
    port: int


def url_endpoint(url: str) -> Endpoint | None:
    """The endpoint of ``url`` if its host is an IPv4 address (or localhost): jobs have no DNS."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if host == "localhost":
        host = "127.0.0.1"
    try:
        ip = ipaddress.IPv4Address(host)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:  # a name, IPv6 or a bad port
        return None
    if ip.is_unspecified or ip.is_multicast:
        return None
    return Endpoint(host, port)


def _add_to_lo(address: str) -> None:
    """Give the calling thread's network namespace ``address``/32 on ``lo`` (rtnetlink)."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as nl:
        ip = socket.inet_aton(address)
        body = struct.pack("=BBBBI", socket.AF_INET, 32, 0, RT_SCOPE_HOST, socket.if_nametoindex("lo"))
        body += struct.pack("=HH4s", 8, IFA_LOCAL, ip) + struct.pack("=HH4s", 8, IFA_ADDRESS, ip)
        flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
        nl.send(struct.pack("=IHHII", 16 + len(body), RTM_NEWADDR, flags, 1, 0) + body)
        reply = nl.recv(4096)
        kind, code = struct.unpack_from("=H", reply, 4)[0], struct.unpack_from("=i", reply, 16)[0]
        if kind == NLMSG_ERROR and code not in (0, -errno.EEXIST):
            raise JobNetError(-code, f"cannot add {address} to the job's lo: {os.strerror(-code)}")


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _check(result: int) -> None:
    if result != 0:
        code = ctypes.get_errno()
        raise JobNetError(code, os.strerror(code))


class JobNetwork:
    """The job network of one runtime; ``mode`` is none, openhtc or full."""

    def __init__(self, mode: str, endpoints: Iterable[Endpoint] = ()) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown job network {mode!r} (choose none, openhtc or full)")
        self.mode = mode
        self.endpoints = tuple(dict.fromkeys(endpoints))
        self._forwarder: _Forwarder | None = None
        if mode == "openhtc" and self.endpoints:
            self._forwarder = _Forwarder(self.endpoints)

    @property
    def full(self) -> bool:
        return self.mode == "full"

    def attach(self, pid: int) -> None:
        """bwrap: open the endpoints in the network namespace of ``pid`` (the sandbox, not yet
        running the job) until that process ends. Raises OSError if it is gone."""
        if self._forwarder is None:
            return
        netns = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            listeners = self._forwarder.listen_in(netns)
        finally:
            os.close(netns)
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            for sock in listeners:
                sock.close()
            raise
        self._forwarder.add(_Group(listeners, pidfd))

    @contextlib.contextmanager
    def podman_network(self) -> Iterator[str]:
        """podman: the ``--network`` value for one job, valid inside the block."""
        if self._forwarder is None:
            yield "host" if self.full else "none"
            return
        netns, listeners = self._forwarder.new_namespace()
        group = _Group(listeners, None)
        self._forwarder.add(group)
        try:
            yield f"ns:/proc/{os.getpid()}/fd/{netns}"
        finally:
            os.close(netns)
            self._forwarder.remove(group)

    def close(self) -> None:
        if self._forwarder is not None:
            self._forwarder.close()


@dataclass(eq=False)
class _Group:
    """One job's listeners, its open connections and (bwrap) the pidfd that ends them."""

    listeners: list[socket.socket]
    pidfd: int | None
    conns: set[_Conn] = field(default_factory=set)
    closed: bool = False


Handler = Callable[[int], None]


class _Forwarder:
    """One thread, one epoll: accepts on every job's listeners and splices to the endpoints.

    Job threads register a job's listeners and pidfd with the epoll themselves (a handler is in
    ``_handlers`` before its fd is in the epoll), so adding a job wakes nobody; everything else,
    closing included, happens in the forwarder thread.
    """

    def __init__(self, endpoints: tuple[Endpoint, ...]) -> None:
        self.endpoints = endpoints
        # Addresses the job's `lo` lacks: every 127.x is there already.
        self._extra_addresses = sorted(
            {e.host for e in endpoints if not ipaddress.IPv4Address(e.host).is_loopback}
        )
        self._libc = _libc()
        self._host_netns = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        self.epoll = select.epoll()
        self._handlers: dict[int, Handler] = {}
        self._dropped: set[int] = set()  # fds closed while handling this round's events
        self._groups: set[_Group] = set()
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._lock = threading.Lock()
        self._removals: list[_Group] = []
        self._stopping = False
        self.watch(self._wake, select.EPOLLIN, self._commands)
        self._thread = threading.Thread(target=self._loop, name="jobnet-forwarder", daemon=True)
        self._thread.start()

    # -- called from job threads ----------------------------------------------------------------

    def listen_in(self, netns: int) -> list[socket.socket]:
        """Listening sockets on every endpoint, created in the network namespace ``netns``."""
        self._check_open()
        _check(self._libc.setns(netns, CLONE_NEWNET))
        try:
            return self._listeners()
        finally:
            self._leave()

    def new_namespace(self) -> tuple[int, list[socket.socket]]:
        """A new network namespace with ``lo`` up and the listeners: (its fd, the listeners)."""
        self._check_open()
        _check(self._libc.unshare(CLONE_NEWNET))
        try:
            netns = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            try:
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                    ifreq = fcntl.ioctl(sock, SIOCGIFFLAGS, struct.pack("16sH", b"lo", 0))
                    flags = struct.unpack_from("16sH", ifreq)[1]
                    fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack("16sH", b"lo", flags | IFF_UP))
                return netns, self._listeners()
            except BaseException:
                os.close(netns)
                raise
        finally:
            self._leave()

    def _check_open(self) -> None:
        with self._lock:
            if self._stopping:
                raise JobNetError(errno.ESHUTDOWN, "the job network is closed")

    def _leave(self) -> None:
        # Back to the host's namespace. A server thread left in a job's would open its database
        # and API connections there: better to stop than to go on like that.
        if self._libc.setns(self._host_netns, CLONE_NEWNET) != 0:
            code = ctypes.get_errno()
            log.critical("cannot return to the host network namespace: %s", os.strerror(code))
            os.abort()

    def _listeners(self) -> list[socket.socket]:
        made: list[socket.socket] = []
        try:
            for address in self._extra_addresses:
                _add_to_lo(address)
            for endpoint in self.endpoints:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
                made.append(sock)
                sock.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)
                sock.bind((endpoint.host, endpoint.port))
                sock.listen(64)
        except BaseException:
            for sock in made:
                sock.close()
            raise
        return made

    def add(self, group: _Group) -> None:
        self._groups.add(group)
        for sock, endpoint in zip(group.listeners, self.endpoints, strict=True):
            self.watch(sock.fileno(), select.EPOLLIN, self._acceptor(group, sock, endpoint))
        if group.pidfd is not None:  # readable once the sandbox has ended
            self.watch(group.pidfd, select.EPOLLIN, lambda _events: self._close_group(group))

    def remove(self, group: _Group) -> None:
        with self._lock:
            if self._stopping:  # the forwarder closes every group as it stops
                return
            self._removals.append(group)
            os.eventfd_write(self._wake, 1)

    def close(self) -> None:
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
            os.eventfd_write(self._wake, 1)  # under the lock: the thread closes it once stopping
        self._thread.join(timeout=10)
        os.close(self._host_netns)

    # -- the forwarder thread -------------------------------------------------------------------

    def watch(self, fd: int, events: int, handler: Handler) -> None:
        self._handlers[fd] = handler
        self.epoll.register(fd, events)

    def drop(self, fd: int) -> None:
        """Stop watching ``fd`` before the caller closes it; its pending events are skipped."""
        if self._handlers.pop(fd, None) is not None:
            self.epoll.unregister(fd)
        self._dropped.add(fd)

    def _loop(self) -> None:
        while True:
            events = self.epoll.poll()
            self._dropped.clear()
            for fd, mask in events:
                handler = self._handlers.get(fd)
                if handler is None or fd in self._dropped:
                    continue
                try:
                    handler(mask)
                except Exception:  # never let one connection stop every job's network
                    log.exception("job network forwarder")
            with self._lock:
                if self._stopping:
                    break
        for group in list(self._groups):
            self._close_group(group)
        self.epoll.close()
        os.close(self._wake)

    def _commands(self, _events: int) -> None:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._wake)
        with self._lock:
            removals, self._removals = self._removals, []
        for group in removals:
            self._close_group(group)

    def _acceptor(self, group: _Group, listener: socket.socket, endpoint: Endpoint) -> Handler:
        def accept(_events: int) -> None:
            while True:
                try:
                    client, _ = listener.accept()
                except (BlockingIOError, InterruptedError):
                    return
                except OSError as exc:
                    if exc.errno == errno.ECONNABORTED:  # that one gave up: the next
                        continue
                    log.warning("job network: cannot accept: %s", exc)
                    return
                if len(group.conns) >= MAX_CONNECTIONS:
                    client.close()
                    continue
                _Conn(self, group, client, endpoint)

        return accept

    def _close_group(self, group: _Group) -> None:
        if group.closed:
            return
        group.closed = True
        self._groups.discard(group)
        for sock in group.listeners:
            self.drop(sock.fileno())
            sock.close()
        for conn in list(group.conns):
            conn.close()
        if group.pidfd is not None:
            self.drop(group.pidfd)
            os.close(group.pidfd)


class _Conn:
    """One job connection and its upstream: bytes copied both ways, half-closes passed on."""

    def __init__(self, fwd: _Forwarder, group: _Group, client: socket.socket, endpoint: Endpoint) -> None:
        self.fwd = fwd
        self.group = group
        self.client = client
        self.upstream = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        self.connected = False
        self.pending = {client: b"", self.upstream: b""}  # bytes waiting to be written to each
        self.eof = {client: False, self.upstream: False}  # each has sent its EOF
        self.events = {client: 0, self.upstream: 0}
        self.closed = False
        group.conns.add(self)
        client.setblocking(False)
        code = self.upstream.connect_ex((endpoint.host, endpoint.port))
        if code not in (0, errno.EINPROGRESS):
            self.close()
            return
        self._update()

    def _other(self, sock: socket.socket) -> socket.socket:
        return self.upstream if sock is self.client else self.client

    def _on_event(self, sock: socket.socket, mask: int) -> None:
        try:
            if mask & (select.EPOLLOUT | select.EPOLLERR):
                if sock is self.upstream and not self.connected:
                    if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                        self.close()
                        return
                    self.connected = True
                self._flush(sock)
            if mask & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
                data = sock.recv(CHUNK)
                other = self._other(sock)
                if data:
                    self.pending[other] += data
                else:
                    self.eof[sock] = True
                if self.connected:
                    self._flush(other)
        except BlockingIOError:
            pass
        except OSError:  # reset, refused, broken pipe: the connection is over
            self.close()
            return
        if self.eof[self.client] and self.eof[self.upstream] and not any(self.pending.values()):
            self.close()
            return
        self._update()

    def _flush(self, sock: socket.socket) -> None:
        data = self.pending[sock]
        if data:
            sent = sock.send(data)
            self.pending[sock] = data[sent:]
        if not self.pending[sock] and self.eof[self._other(sock)]:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_WR)

    def _update(self) -> None:
        for sock in (self.client, self.upstream):
            ready = self.connected or sock is self.client
            want = 0
            if not self.eof[sock] and not self.pending[self._other(sock)] and ready:
                want |= select.EPOLLIN
            if (self.pending[sock] and ready) or (sock is self.upstream and not self.connected):
                want |= select.EPOLLOUT
            if want == self.events[sock]:
                continue
            fd = sock.fileno()
            if self.events[sock] == 0:
                self.fwd.watch(fd, want, functools.partial(self._on_event, sock))
            elif want == 0:
                self.fwd.drop(fd)
            else:
                self.fwd.epoll.modify(fd, want)
            self.events[sock] = want

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.group.conns.discard(self)
        for sock in (self.client, self.upstream):
            if self.events[sock]:
                self.fwd.drop(sock.fileno())
            sock.close()
