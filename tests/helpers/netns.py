"""Hosts for multi-node tests without a cluster: Linux network namespaces on one bridge.

    with host_network(3) as net:            # pytest.skip(...) on NetnsUnavailable
        node0, node1, ps = net.hosts        # 10.200.0.1, .2, .3 on the bridge, lo up in each
        proc = node0.popen([sys.executable, "-m", "embps", ...], env={...})
        net.cut(node1)                      # the link of node1 goes down (fault injection)
        net.restore(node1)
    # every namespace, veth and the bridge are gone, even when the body raised

Each host is a namespace with its own loopback and one veth whose other end sits on a bridge in
the root namespace; the bridge itself holds `net.runner_address`, so the test process (in the
root namespace) reaches every host directly. Names carry a random token, and a network claims its
subnet for its lifetime (an abstract Unix socket named after it, released by the kernel when the
process ends), so concurrent runs and `make test`'s workers do not collide: a second network on
the same subnet waits for the first to end. Addresses stay in a private test range on this
machine only.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from bench.ports import claim
from tests.helpers.waiting import wait_until

SUBNET_WAIT_S = 600.0  # the longest a network waits for another on its subnet (a namespace test's whole run)


class NetnsUnavailable(RuntimeError):
    """Namespaces cannot be made here (not root, no iproute2, no kernel support)."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: exit {result.returncode}: {result.stderr.strip()}")
    return result


@dataclass(frozen=True)
class Host:
    """One namespace acting as a machine: `address` on interface `ifname`."""

    namespace: str
    address: str
    ifname: str
    veth: str  # the root-namespace end of this host's link, on the bridge

    def command(self, argv: Sequence[str]) -> list[str]:
        """`argv` run inside this host's namespace."""
        return ["ip", "netns", "exec", self.namespace, *argv]

    def popen(self, argv: Sequence[str], env: dict[str, str] | None = None, **kwargs) -> subprocess.Popen:
        """Starts `argv` on this host; `env` adds to (not replaces) this process's environment."""
        return subprocess.Popen(self.command(argv), env={**os.environ, **(env or {})}, **kwargs)

    def run(self, argv: Sequence[str], timeout: float = 60.0, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(argv), timeout=timeout, capture_output=True, text=True, **kwargs)


@dataclass(frozen=True)
class HostNetwork:
    hosts: tuple[Host, ...]
    bridge: str
    runner_address: str

    def cut(self, host: Host) -> None:
        """Takes `host`'s link down: it keeps running but reaches nobody (and nobody reaches it)."""
        _ip("link", "set", host.veth, "down")

    def restore(self, host: Host) -> None:
        _ip("link", "set", host.veth, "up")


def unavailable_reason() -> str | None:
    """Why namespaces cannot be made here, or None when they can."""
    if shutil.which("ip") is None:
        return "network namespaces: no `ip` command (iproute2 is not installed)"
    if os.geteuid() != 0:
        return "network namespaces: `ip netns add` needs root"
    probe = f"embps-probe-{uuid.uuid4().hex[:8]}"
    result = _ip("netns", "add", probe, check=False)
    if result.returncode != 0:
        return f"network namespaces: `ip netns add` failed: {result.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


@contextmanager
def subnet_claim(subnet: str, timeout: float = SUBNET_WAIT_S) -> Iterator[None]:
    """Holds `subnet` for this process until the block ends, once no other process holds it
    (AssertionError after `timeout` seconds)."""
    held: list[socket.socket] = []

    def taken() -> bool:
        got = claim(f"embps-subnet-{subnet}")
        if got is not None:
            held.append(got)
        return got is not None

    try:
        wait_until(taken, f"subnet {subnet}, held by another process", timeout)
        yield
    finally:
        for got in held:
            got.close()


@contextmanager
def host_network(num_hosts: int, subnet: str = "10.200.0") -> Iterator[HostNetwork]:
    """`num_hosts` namespaces at `subnet`.1 .. `subnet`.num_hosts on one bridge, the test runner
    at `subnet`.254. Raises NetnsUnavailable when namespaces cannot be made."""
    if not 1 <= num_hosts <= 200:
        raise ValueError(f"num_hosts: must be in [1, 200], got {num_hosts}")
    reason = unavailable_reason()
    if reason is not None:
        raise NetnsUnavailable(reason)
    with subnet_claim(subnet), _built(num_hosts, subnet) as net:
        yield net


@contextmanager
def _built(num_hosts: int, subnet: str) -> Iterator[HostNetwork]:
    token = uuid.uuid4().hex[:6]
    bridge = f"ebr{token}"
    namespaces: list[str] = []
    veths: list[str] = []
    try:
        _ip("link", "add", bridge, "type", "bridge")
        _ip("addr", "add", f"{subnet}.254/24", "dev", bridge)
        _ip("link", "set", bridge, "up")
        hosts = []
        for i in range(1, num_hosts + 1):
            namespace, veth, peer = f"embps-{token}-{i}", f"ev{token}{i}", f"ep{token}{i}"
            _ip("netns", "add", namespace)
            namespaces.append(namespace)
            _ip("link", "add", veth, "type", "veth", "peer", "name", peer)
            veths.append(veth)
            _ip("link", "set", peer, "netns", namespace)
            _ip("link", "set", veth, "master", bridge)
            _ip("link", "set", veth, "up")
            _ip("-n", namespace, "link", "set", "lo", "up")
            _ip("-n", namespace, "addr", "add", f"{subnet}.{i}/24", "dev", peer)
            _ip("-n", namespace, "link", "set", peer, "up")
            hosts.append(Host(namespace=namespace, address=f"{subnet}.{i}", ifname=peer, veth=veth))
        yield HostNetwork(hosts=tuple(hosts), bridge=bridge, runner_address=f"{subnet}.254")
    finally:
        # Deleting a namespace does not always take its veth pair along (gVisor keeps the root
        # end), so each piece is removed by name.
        for veth in veths:
            _ip("link", "del", veth, check=False)
        for namespace in namespaces:
            _ip("netns", "del", namespace, check=False)
        _ip("link", "del", bridge, check=False)


def remaining(net: HostNetwork) -> list[str]:
    """The namespaces and links of `net` that still exist (empty after a clean exit)."""
    names = _ip("netns", "list", check=False).stdout.split()
    links = _ip("-o", "link", "show", check=False).stdout
    found = [h.namespace for h in net.hosts if h.namespace in names]
    for name in (net.bridge, *(h.veth for h in net.hosts)):
        if f" {name}:" in links or f" {name}@" in links:
            found.append(name)
    return found
