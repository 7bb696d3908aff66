"""Free TCP ports on 127.0.0.1 for the servers benchmarks and tests start."""

from __future__ import annotations

import socket


def free_ports(n: int) -> list[int]:
    """n distinct free ports on 127.0.0.1 (every socket stays open until all n are picked)."""
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()
