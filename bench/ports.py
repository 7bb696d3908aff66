"""Free TCP ports on 127.0.0.1 for the servers benchmarks and tests start.

A port is handed out before the server that will listen on it is started, so nothing else may
take it in between. Ports the kernel picks itself (bind to port 0, the source port of every
outgoing connection) come from its ephemeral range, and a suite makes thousands of connections:
a port picked from that range can be taken by some client's connection before the server binds
it. So ports are drawn at random from outside the ephemeral range, and one process never hands
out the same port twice.

Processes that hand out ports at once (the suite's parallel workers, a bench they start) must not
hand out the same one either: a port is free for each of them until one's server binds it. So the
ports are cut into blocks of BLOCK_PORTS, and a process hands out only ports of blocks it claimed:
a claim is an abstract Unix socket named after the block (Linux), which no other process can bind
while this one lives, and which the kernel releases when it exits, however it ends.
"""

from __future__ import annotations

import os
import random
import socket
from pathlib import Path

from ps.job_config import ShardConfig

_EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_LOWEST = 10000  # below: well-known and registered services
BLOCK_PORTS = 64
_claims: list[socket.socket] = []  # this process's claims, open until it exits
_unused: list[int] = []  # ports of claimed blocks not handed out yet
_owner = os.getpid()  # the process `_unused` belongs to (a forked child inherits a copy)
_draw = random.SystemRandom()


def _candidate_ranges() -> list[range]:
    """Port ranges outside the kernel's ephemeral range (Linux default 32768-60999)."""
    try:
        low, high = (int(v) for v in _EPHEMERAL_RANGE_FILE.read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    ranges = [r for r in (range(_LOWEST, low), range(high + 1, 65536)) if len(r) >= 1000]
    if not ranges:
        raise RuntimeError(f"no port range outside the ephemeral range {low}-{high} of {_EPHEMERAL_RANGE_FILE}")
    return ranges


def claim(name: str) -> socket.socket | None:
    """Claims `name` among the live processes of this machine (Linux): an abstract Unix socket
    bound to it, held until it is closed or this process ends; None while another holds it."""
    held = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        held.bind(f"\0{name}")
    except OSError:
        held.close()
        return None
    return held


def _claim_block() -> None:
    """Claims a random block no other process holds and adds its ports to `_unused`."""
    starts = [start for r in _candidate_ranges() for start in range(r.start, r.stop - BLOCK_PORTS + 1, BLOCK_PORTS)]
    _draw.shuffle(starts)
    for start in starts:
        held = claim(f"embps-ports-{start}")
        if held is None:  # another process (or this one) holds it
            continue
        _claims.append(held)
        block = list(range(start, start + BLOCK_PORTS))
        _draw.shuffle(block)
        _unused.extend(block)
        return
    raise RuntimeError(f"every block of {BLOCK_PORTS} ports outside the ephemeral range is claimed by a process")


def free_ports(n: int) -> list[int]:
    """n distinct free ports on 127.0.0.1, outside the ephemeral range, never handed out before
    by this process nor by any other live process that uses this function (every probe socket
    stays open until all n are picked)."""
    global _owner
    if os.getpid() != _owner:  # a forked child: its parent hands out the ports it inherited
        _unused.clear()
        _owner = os.getpid()
    sockets: list[socket.socket] = []
    ports: list[int] = []
    try:
        for _ in range(200 * n):
            if len(ports) == n:
                return ports
            if not _unused:
                _claim_block()
            port = _unused.pop()
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:  # taken by a program that does not claim blocks
                s.close()
                continue
            sockets.append(s)
            ports.append(port)
        if len(ports) == n:
            return ports
        raise RuntimeError(f"found only {len(ports)} of {n} free ports outside the ephemeral range")
    finally:
        for s in sockets:
            s.close()


def loopback_shards(num_shards: int, standbys: bool) -> tuple[ShardConfig, ...]:
    """num_shards shards on free loopback ports, each with its metrics port, and with a standby
    (and its metrics port) when `standbys`."""
    ports = free_ports(4 * num_shards)
    return tuple(
        ShardConfig(
            f"127.0.0.1:{ports[4 * i]}",
            metrics_port=ports[4 * i + 1],
            standby=f"127.0.0.1:{ports[4 * i + 2]}" if standbys else "",
            standby_metrics_port=ports[4 * i + 3] if standbys else 0,
        )
        for i in range(num_shards)
    )
