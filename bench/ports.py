"""Free TCP ports on 127.0.0.1 for the servers benchmarks and tests start.

A port is handed out before the server that will listen on it is started, so nothing else may
take it in between. Ports the kernel picks itself (bind to port 0, the source port of every
outgoing connection) come from its ephemeral range, and a suite makes thousands of connections:
a port picked from that range can be taken by some client's connection before the server binds
it. So ports are drawn at random from outside the ephemeral range, and one process never hands
out the same port twice.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

from ps.job_config import ShardConfig

_EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_LOWEST = 10000  # below: well-known and registered services
_handed_out: set[int] = set()
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


def free_ports(n: int) -> list[int]:
    """n distinct free ports on 127.0.0.1, outside the ephemeral range, never handed out before
    by this process (every probe socket stays open until all n are picked)."""
    ranges = _candidate_ranges()
    sockets: list[socket.socket] = []
    ports: list[int] = []
    try:
        for _ in range(200 * n):
            if len(ports) == n:
                return ports
            span = _draw.choice(ranges)
            port = _draw.choice(span)
            if port in _handed_out:
                continue
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                s.close()
                continue
            sockets.append(s)
            ports.append(port)
            _handed_out.add(port)
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
