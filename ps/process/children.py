"""Child processes of any embps command, by pid: started to die with their parent, waited on until
their gRPC health says SERVING, stopped with SIGTERM and then SIGKILL.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import time
from collections.abc import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ps.security import SecurityConfig, open_channel

_PR_SET_PDEATHSIG = 1
_HEALTH_POLL_S = 0.05


def python_path(*first: str) -> str:
    """A child's PYTHONPATH: `first` (e.g. the repository root), then the one this process got.

    Replacing the inherited value would hide packages installed with `pip --target` and put on
    PYTHONPATH (a machine's own site, a separate peer's folder) from the child alone.
    """
    inherited = os.environ.get("PYTHONPATH", "")
    return os.pathsep.join(p for p in (*first, inherited) if p)


def die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the launcher dies, even by SIGKILL (Linux)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


def wait_serving(
    address: str,
    proc: subprocess.Popen,
    name: str,
    timeout: float = 90.0,
    security: SecurityConfig | None = None,
    service: str = "",
    progress: Callable[[], object] | None = None,
) -> None:
    """Polls the gRPC health of `service` ("": the whole server) at `address` (over TLS when
    `security` has it; health needs no token) until SERVING; RuntimeError naming `name` if the
    process exits first, TimeoutError if the timeout passes first.

    With `progress` (a function whose value changes while the process makes headway, e.g. the size
    of its log while it restores a snapshot) the timeout counts from the last change instead: a
    start that takes an hour is waited for as long as it moves, one that stalls fails after `timeout`."""
    deadline = time.monotonic() + timeout
    last = progress() if progress is not None else None
    with open_channel(address, security or SecurityConfig(), role=None) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with code {proc.returncode} while starting")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if progress is not None and (now := progress()) != last:
                last, deadline = now, time.monotonic() + timeout
            time.sleep(_HEALTH_POLL_S)
    stalled = " (no progress for that long)" if progress is not None else ""
    raise TimeoutError(f"{name} at {address} was not serving after {timeout:.0f} s{stalled}")


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


def stop_all(procs: list[subprocess.Popen], timeout: float = 15.0) -> None:
    """stop() for many at once: SIGTERM to each, then the waits, so they drain in parallel."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def describe_exit(returncode: int) -> str:
    """How a child ended, from its Popen return code: 'killed by SIGKILL' or 'code 1'."""
    if returncode >= 0:
        return f"code {returncode}"
    try:
        return f"killed by {signal.Signals(-returncode).name}"
    except ValueError:
        return f"killed by signal {-returncode}"
