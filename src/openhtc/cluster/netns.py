"""The network of a local cluster: one bridge on the host, one network namespace per agent.

Layout (``N`` is the cluster's number, the first free ``10.213.N.0/24``)::

    host:  bridge ohtcbrN  10.213.N.1/24      (the API servers bind here)
             |-- veth ohtcN-aK  ==  ohtc-eth0 in namespace ohtc-N-aK  10.213.N.(10+K)/24

A namespace has ``lo`` and its end of the veth pair, and no default route: an agent reaches
the host's bridge address and the other agents, nothing else. No address is added to the host's
other interfaces, so nothing leaves the machine. Cutting an agent's network is
``ip link set ohtcN-aK down`` on the host side (:func:`set_link`).

Everything here runs ``ip`` (iproute2) and needs root (CAP_NET_ADMIN).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import signal
import subprocess
from dataclasses import dataclass

NET = ipaddress.IPv4Network("10.213.0.0/16")
NS_IFACE = "ohtc-eth0"


class ClusterNetError(RuntimeError):
    """An ``ip`` command failed, or the machine cannot make namespaces."""


def ip(*args: str, check: bool = True) -> str:
    """Run ``ip ARGS`` and return its output."""
    try:
        result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=False)
    except FileNotFoundError as exc:
        raise ClusterNetError("the `ip` command (iproute2) is missing") from exc
    if check and result.returncode != 0:
        raise ClusterNetError(f"ip {' '.join(args)}: {result.stderr.strip() or result.returncode}")
    return result.stdout


def require_root() -> None:
    if os.geteuid() != 0:
        raise ClusterNetError("a local cluster makes network namespaces and veth pairs: run it as root")


def _used_subnets() -> set[int]:
    """The third octets of the 10.213.x.0/24 networks some interface already has."""
    used = set()
    for line in ip("-4", "-o", "addr", "show").splitlines():
        for word in line.split():
            if "/" in word:
                try:
                    address = ipaddress.IPv4Interface(word).ip
                except ValueError:
                    continue
                if address in NET:
                    used.add(address.packed[2])
    return used


@dataclass(frozen=True)
class Bridge:
    number: int

    @property
    def name(self) -> str:
        return f"ohtcbr{self.number}"

    @property
    def address(self) -> str:
        return f"10.213.{self.number}.1"

    def agent_address(self, index: int) -> str:
        return f"10.213.{self.number}.{10 + index}"

    def namespace(self, index: int) -> str:
        return f"ohtc-{self.number}-a{index}"

    def host_veth(self, index: int) -> str:
        return f"ohtc{self.number}-a{index}"  # at most 15 characters for up to 240 agents


def create_bridge() -> Bridge:
    """A new bridge holding the first free 10.213.N.1/24 (N in 0…255)."""
    require_root()
    used = _used_subnets()
    for number in range(256):
        if number in used:
            continue
        bridge = Bridge(number)
        if ip("link", "show", bridge.name, check=False):
            continue  # a half-removed earlier cluster
        ip("link", "add", bridge.name, "type", "bridge")
        ip("addr", "add", f"{bridge.address}/24", "dev", bridge.name)
        ip("link", "set", bridge.name, "up")
        return bridge
    raise ClusterNetError("no free 10.213.N.0/24 network for a cluster bridge")


def add_namespace(bridge: Bridge, index: int) -> str:
    """Namespace ``index`` with ``lo`` up and a veth pair to the bridge; returns its name."""
    ns, veth = bridge.namespace(index), bridge.host_veth(index)
    ip("netns", "add", ns)
    ip("link", "add", veth, "type", "veth", "peer", "name", NS_IFACE, "netns", ns)
    ip("link", "set", veth, "master", bridge.name)
    ip("link", "set", veth, "up")
    ip("-n", ns, "addr", "add", f"{bridge.agent_address(index)}/24", "dev", NS_IFACE)
    ip("-n", ns, "link", "set", NS_IFACE, "up")
    ip("-n", ns, "link", "set", "lo", "up")
    return ns


def set_link(bridge: Bridge, index: int, up: bool) -> None:
    """Bring agent ``index``'s link up or down (down: its packets go nowhere, as a cut cable)."""
    ip("link", "set", bridge.host_veth(index), "up" if up else "down")


def namespace_pids(ns: str) -> list[int]:
    """Every process in network namespace ``ns`` (the agent, its jobs, their children)."""
    out = ip("netns", "pids", ns, check=False)
    return [int(word) for word in out.split() if word.isdigit()]


def kill_namespace(ns: str, sig: int = signal.SIGKILL) -> list[int]:
    """Send ``sig`` to every process in ``ns`` (as a lost node loses them all); returns the pids."""
    pids = namespace_pids(ns)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
    return pids


def remove(bridge: Bridge, agents: int) -> None:
    """Delete the namespaces (with their veths) and the bridge; missing parts are skipped."""
    for index in range(agents):
        ns = bridge.namespace(index)
        kill_namespace(ns)
        ip("link", "del", bridge.host_veth(index), check=False)
        ip("netns", "del", ns, check=False)
    ip("link", "del", bridge.name, check=False)
