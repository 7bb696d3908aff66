"""The CPU of an empty gRPC call on this machine: the floor under every RPC of `embps bench ps`.

A grpc.aio server (what a shard's port is) in a child process answers an empty unary method, and
one blocking client in this process (what PSClient is) calls it back to back. Printed beside the
PS rates, it turns a call's server CPU into a number of empty calls measured on the same machine
in the same run: on a 2-core VM whose speed moves from one minute to the next, a ratio holds where
a figure in milliseconds does not.

    python -m bench.rpc_floor PORT    the server (prints "ready" once it listens)
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

from bench.machine import process_cpu_seconds
from bench.ports import free_ports
from ps.process import children
from ps.process.python_command import python_path

REPO_ROOT = Path(__file__).resolve().parents[1]
_METHOD = "/embps.bench.Floor/Empty"
_WARMUP_CALLS = 50


@dataclass(frozen=True)
class RpcFloor:
    """One empty unary call: calls_per_s back to back from one client, and each side's CPU."""

    calls_per_s: float
    server_cpu_ms: float
    client_cpu_ms: float


def measure_rpc_floor(calls: int = 2000) -> RpcFloor:
    """Starts the server, makes `calls` empty calls after a warm-up, stops the server by pid."""
    if calls <= 0:
        raise ValueError(f"calls: must be > 0, got {calls}")
    (port,) = free_ports(1)
    server = subprocess.Popen(
        [sys.executable, "-m", "bench.rpc_floor", str(port)],
        cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": python_path(str(REPO_ROOT))}, stdout=subprocess.PIPE,
    )
    try:
        if server.stdout.readline().strip() != b"ready":
            raise RuntimeError(f"bench.rpc_floor: the server exited ({server.wait()}) before it listened")
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            empty = channel.unary_unary(_METHOD)
            for _ in range(_WARMUP_CALLS):
                empty(b"", timeout=10)
            server_cpu, client_cpu, start = process_cpu_seconds(server.pid), time.process_time(), time.perf_counter()
            for _ in range(calls):
                empty(b"", timeout=10)
            wall = time.perf_counter() - start
            client_cpu = time.process_time() - client_cpu
            server_cpu = process_cpu_seconds(server.pid) - server_cpu
    finally:
        children.stop_all([server], 10.0)
        server.stdout.close()
    return RpcFloor(calls / wall, server_cpu / calls * 1e3, client_cpu / calls * 1e3)


async def _serve(port: int) -> None:
    async def empty(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return b""

    server = grpc.aio.server()
    handler = grpc.method_handlers_generic_handler(
        _METHOD.split("/")[1], {_METHOD.split("/")[2]: grpc.unary_unary_rpc_method_handler(empty)}
    )
    server.add_generic_rpc_handlers((handler,))
    if server.add_insecure_port(f"127.0.0.1:{port}") == 0:
        raise SystemExit(f"bench.rpc_floor: cannot bind 127.0.0.1:{port}")
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(_serve(int(sys.argv[1])))
