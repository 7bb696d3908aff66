"""Child processes of `embps launch`: PS shards and serving replicas started, health-checked and
stopped by pid; each dies with the launcher, even when the launcher is killed with SIGKILL."""

from __future__ import annotations

import ctypes
import os
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


def start_replica(config_path: Path, log_path: Path) -> subprocess.Popen:
    """`python -m embps serve --config config_path` (a serve.toml), output to log_path."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "embps", "serve", "--config", str(config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
        )


# The launcher's pid, handed to the workers: the elastic agent starts each worker in a session of
# its own and nothing kills it when the launcher is killed, so the worker arranges that itself.
LAUNCHER_PID_ENV = "EMBPS_LAUNCHER_PID"


def die_with_launcher() -> None:
    """In a worker started by `embps launch`: SIGTERM when the launcher dies (even by SIGKILL),
    and exit now if it is already gone. Does nothing in a worker started otherwise (torchrun)."""
    launcher = os.environ.get(LAUNCHER_PID_ENV)
    if launcher is None:
        return
    _die_with_parent()
    if os.getppid() != int(launcher):  # it died before the prctl: no signal will come
        raise SystemExit(f"embps worker: the launcher (pid {launcher}) is gone")
