"""Child processes of `embps launch`: PS shards started, health-checked and stopped by pid."""

from __future__ import annotations

import ctypes
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ps.security import SecurityConfig, open_channel

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the launcher dies, even by SIGKILL (Linux)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


def start_shard(config_path: str, index: int, log_path: Path, restore_step: int | None = None) -> subprocess.Popen:
    """`python -m embps ps --config config_path --shard index [--restore-step S]`, output to log_path."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    restore = ["--restore-step", str(restore_step)] if restore_step is not None else []
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "embps", "ps", "--config", config_path, "--shard", str(index), *restore],
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
        )


def wait_serving(
    address: str, proc: subprocess.Popen, name: str, timeout: float = 90.0, security: SecurityConfig | None = None
) -> None:
    """Polls the gRPC health service at `address` (over TLS when `security` has it; health needs no
    token) until SERVING; RuntimeError naming `name` if the process exits or the timeout passes first."""
    deadline = time.monotonic() + timeout
    with open_channel(address, security or SecurityConfig(), role=None) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with code {proc.returncode} while starting")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise RuntimeError(f"{name} at {address} was not serving after {timeout:.0f} s")


def stop(proc: subprocess.Popen, timeout: float = 15.0) -> int | None:
    """SIGTERM, then SIGKILL after `timeout`; returns the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode
