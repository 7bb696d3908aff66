"""Real `embps serve` processes for tests: a serve.toml on free loopback ports, health wait, stop by pid.

    with ServingReplica.start(cluster, tmp_path) as replica:
        values, found, reply = replica.lookup("user", keys)
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ps import wire
from ps.job_config import JobConfig, dump_job_config
from ps.process.children import POLL_CHANNEL_OPTIONS
from ps.process.malloc import MALLOC_TUNING
from ps.process.python_command import python_path
from ps.rpc import ps_pb2, serving_pb2, serving_pb2_grpc
from ps.security import Role, open_channel
from serving.config import Consistency, ServeConfig, dump_serve_config
from serving.server import SERVICE_NAME
from tests.helpers.processes import REPO_ROOT, ShardCluster, free_ports, stop_pid, wait_serving


def serve_config(cluster: ShardCluster, **fields) -> ServeConfig:
    """A ServeConfig following `cluster`'s job, on fresh free loopback ports. consistency defaults
    to "latest" here: most tests push without committing steps (tests/serving/test_consistent_cut.py
    covers "step", the replica's own default)."""
    listen_port, metrics_port = free_ports(2)
    config = ServeConfig(
        job=cluster.job,
        listen=f"127.0.0.1:{listen_port}",
        metrics_port=metrics_port,
        tables=tuple(t.name for t in cluster.job.tables),
        stale_after_seconds=1.0,
        consistency=Consistency.LATEST,
    )
    return replace(config, **fields)


@dataclass
class ServingReplica:
    """One `embps serve` process and a channel to it."""

    config: ServeConfig
    proc: subprocess.Popen
    log_path: Path
    channel: grpc.Channel

    @classmethod
    def start(cls, cluster: ShardCluster, workdir: Path, name: str = "serve", env: dict[str, str] | None = None,
              **fields) -> ServingReplica:
        """env: extra environment variables of the process; fields: ServeConfig fields."""
        config = serve_config(cluster, **fields)
        workdir.mkdir(parents=True, exist_ok=True)
        config_path = workdir / f"{name}.toml"
        config_path.write_text(dump_serve_config(config, str(cluster.config_path)))
        log_path = workdir / f"{name}.log"
        env = {**os.environ, **MALLOC_TUNING, "PYTHONPATH": python_path(str(REPO_ROOT)), **(env or {})}
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "embps", "serve", "--config", str(config_path), "--grace", "2"],
                cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
            )
        security = cluster.job.security  # TLS and the reader's token when the job has them
        role = Role.READER if security.auth else None
        channel = open_channel(config.listen, security, role, options=POLL_CHANNEL_OPTIONS)
        replica = cls(config, proc, log_path, channel)
        try:
            replica.wait_health(SERVICE_NAME)
        except BaseException:
            replica.stop()
            raise
        return replica

    @property
    def stub(self) -> serving_pb2_grpc.ServingStub:
        return serving_pb2_grpc.ServingStub(self.channel)

    def health(self, service: str) -> int:
        stub = health_pb2_grpc.HealthStub(self.channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status

    def wait_health(self, service: str, status: int = health_pb2.HealthCheckResponse.SERVING,
                    timeout: float = 60.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"embps serve exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if self.health(service) == status:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"health of {service!r} not {status} after {timeout} s:\n{self.log()}")

    def lookup(self, table: str, keys: np.ndarray, **fields) -> tuple[np.ndarray, np.ndarray,
                                                                     serving_pb2.ServingLookupResponse]:
        """(values (n, dim) float32, found (n,) bool, the reply)."""
        reply = self.stub.Lookup(
            serving_pb2.ServingLookupRequest(table=table, keys=wire.encode_keys(keys), **fields), timeout=10
        )
        n = keys.shape[0]
        dtype = np.float16 if reply.dtype == ps_pb2.FLOAT16 else np.float32
        values = np.frombuffer(reply.values, dtype=dtype).reshape(n, reply.dim).astype(np.float32)
        return values, np.frombuffer(reply.found, dtype=np.uint8).astype(bool), reply

    def status(self) -> serving_pb2.ServingStatusResponse:
        return self.stub.Status(serving_pb2.ServingStatusRequest(), timeout=5)

    def wait_version(self, table: str, shard: int, version: int, timeout: float = 30.0) -> None:
        """Waits until the replica serves at least `version` of (table, shard)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for s in self.status().shards:
                if s.table == table and s.shard == shard and s.version >= version:
                    return
            time.sleep(0.02)
        raise TimeoutError(f"{table} shard {shard} not at version {version} after {timeout} s: {self.status()}")

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self) -> int:
        self.channel.close()
        return stop_pid(self.proc)

    def __enter__(self) -> ServingReplica:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class ShedEverything:
    """An in-process gRPC server that answers every Serving call RESOURCE_EXHAUSTED, as a replica whose
    queue is full does (the real shedding is tests/serving/test_shedding.py's), or `code` (CANCELLED:
    a replica without the gate, refused by gRPC's core): for clients' failover."""

    def __init__(self, code: grpc.StatusCode = grpc.StatusCode.RESOURCE_EXHAUSTED) -> None:
        self.calls = 0
        self.code = code
        self.server = grpc.server(ThreadPoolExecutor(2), handlers=[_Shed(self)])
        self.address = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"

    def __enter__(self) -> ShedEverything:
        self.server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.stop(0)


class _Shed(grpc.GenericRpcHandler):
    def __init__(self, owner: ShedEverything) -> None:
        self.owner = owner

    def service(self, handler_call_details):
        def refuse(request: bytes, context: grpc.ServicerContext) -> None:
            self.owner.calls += 1
            context.abort(self.owner.code, "serving queue full (a stand-in)")

        return grpc.unary_unary_rpc_method_handler(refuse)


def start_cluster_with_log(job: JobConfig, workdir: Path, update_log_keys: int) -> ShardCluster:
    """Like ShardCluster.start, with `embps ps --update-log-keys update_log_keys` (a tiny log)."""
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / f"{job.job}.toml"
    config_path.write_text(dump_job_config(job))
    logs = [workdir / f"{job.job}-shard-{i}.log" for i in range(len(job.shards))]
    env = {**os.environ, **MALLOC_TUNING, "PYTHONPATH": python_path(str(REPO_ROOT))}
    procs = []
    for i in range(len(job.shards)):
        with open(logs[i], "ab") as log:
            argv = ["ps", "--config", str(config_path), "--shard", str(i), "--update-log-keys", str(update_log_keys)]
            procs.append(
                subprocess.Popen([sys.executable, "-m", "embps", *argv], cwd=REPO_ROOT, env=env, stdout=log,
                                 stderr=subprocess.STDOUT)
            )
    cluster = ShardCluster(job, config_path, procs, logs)
    try:
        for i, shard in enumerate(job.shards):
            wait_serving(shard.address, procs[i], log_path=logs[i])
    except BaseException:
        cluster.stop()
        raise
    return cluster
