"""embps bench freshness: how long an acknowledged push takes to be visible in a serving replica.

    pusher process ──Push (rate rows/s, open loop)──> PS shard ──Subscribe──> embps serve <── poller

A training shard and a serving replica run as their own processes; a pusher process pushes
`rate` rows/s in batches of `batch` on a fixed schedule (it does not wait for serving), and
records each push's version and the time its reply arrived. This process polls the replica's
Status every `poll_ms` and records when each version became visible. Staleness of a push =
visible time - ack time, both on this host's clock; it overstates by up to one poll interval and
understates by the Push reply's transit. The replica's own histogram (PS ack -> applied) is
reported beside it. Prints progress every second; `--out` writes the results as JSON.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.machine import machine_facts
from bench.ports import free_ports
from ps.job_config import Deadlines, JobConfig, ShardConfig, dump_job_config
from ps.process.malloc import MALLOC_TUNING
from ps.rpc import serving_pb2, serving_pb2_grpc
from ps.table.config import TableConfig
from serving.config import Consistency, ServeConfig, dump_serve_config

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class FreshnessBenchConfig:
    """rate: rows pushed per second; batch: rows per push; seconds: length of the measurement."""

    rate: int = 100_000
    batch: int = 5_000
    seconds: float = 20.0
    dim: int = 16
    rows: int = 1_000_000  # key space the pushes draw from
    poll_ms: float = 2.0
    out: str | None = None

    def validate(self) -> FreshnessBenchConfig:
        for name in ("rate", "batch", "dim", "rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.seconds <= 0 or self.poll_ms <= 0:
            raise ValueError("seconds, poll_ms: must be > 0")
        if self.batch > self.rows:
            raise ValueError(f"batch: must be <= rows ({self.rows}), got {self.batch}")
        return self


def _start(argv: list[str], log_path: Path) -> subprocess.Popen:
    env = {**os.environ, **MALLOC_TUNING, "PYTHONPATH": str(REPO_ROOT)}
    with open(log_path, "ab") as log:
        return subprocess.Popen([sys.executable, "-m", "embps", *argv], cwd=REPO_ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT)


def _wait_serving(address: str, service: str, proc: subprocess.Popen, log_path: Path, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < end:
            if proc.poll() is not None:
                raise RuntimeError(f"{address} exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1).status == 1:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.05)
    raise TimeoutError(f"{address} not serving after {timeout} s")


def _pusher(job: JobConfig, config: FreshnessBenchConfig, start_at: float, queue) -> None:
    """Pushes config.rate rows/s from start_at for config.seconds; puts [(version, ack time)]."""
    from ps.client import PSClient

    rng = np.random.default_rng(1)
    interval = config.batch / config.rate
    acks, late = [], 0
    grads = rng.standard_normal((config.batch, config.dim)).astype(np.float32) * 0.01
    with PSClient.from_job(job) as client:
        n = int(config.seconds / interval)
        for i in range(n):
            due = start_at + i * interval
            pause = due - time.time()
            if pause > 0:
                time.sleep(pause)
            else:
                late += 1
            keys = rng.choice(config.rows, config.batch, replace=False).astype(np.int64)
            result = client.push("bench", keys, grads)
            acks.append((result.versions[0], time.time()))
    queue.put({"acks": acks, "late_pushes": late})


def _histogram(metrics_port: int) -> dict[float, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    buckets = {}
    for le, count in re.findall(r'embps_serving_staleness_seconds_bucket\{le="([^"]+)"[^}]*\} (\S+)', text):
        buckets[float("inf") if le == "+Inf" else float(le)] = float(count)
    return buckets


def _histogram_quantile(buckets: dict[float, float], q: float) -> float:
    """Prometheus-style linear interpolation inside the bucket holding quantile q."""
    bounds = sorted(buckets)
    total = buckets[bounds[-1]]
    if total == 0:
        return float("nan")
    rank, lower, below = q * total, 0.0, 0.0
    for bound in bounds:
        if buckets[bound] >= rank:
            if bound == float("inf"):
                return lower
            inside = buckets[bound] - below
            return lower + (bound - lower) * ((rank - below) / inside if inside else 0.0)
        lower, below = bound, buckets[bound]
    return lower


def run_freshness_bench(config: FreshnessBenchConfig) -> int:
    config.validate()
    shard_port, shard_metrics, serve_port, serve_metrics = free_ports(4)
    job = JobConfig(
        job="freshness",
        shards=(ShardConfig(f"127.0.0.1:{shard_port}", shard_metrics),),
        tables=(TableConfig("bench", dim=config.dim),),
        deadlines=Deadlines(lookup=30.0, push=30.0, stats=5.0),
    )
    serve = ServeConfig(job=job, listen=f"127.0.0.1:{serve_port}", metrics_port=serve_metrics, tables=("bench",),
                        consistency=Consistency.LATEST)
    procs: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory(prefix="embps-freshness-") as scratch:
        work = Path(scratch)
        (work / "job.toml").write_text(dump_job_config(job))
        (work / "serve.toml").write_text(dump_serve_config(serve, str(work / "job.toml")))
        try:
            procs.append(_start(["ps", "--config", str(work / "job.toml"), "--shard", "0"], work / "ps.log"))
            _wait_serving(job.shards[0].address, "", procs[0], work / "ps.log")
            procs.append(_start(["serve", "--config", str(work / "serve.toml")], work / "serve.log"))
            _wait_serving(serve.listen, "", procs[1], work / "serve.log")
            print(f"shard and replica up; pushing {config.rate} rows/s in batches of {config.batch} "
                  f"for {config.seconds:.0f} s (dim {config.dim})", flush=True)
            result = _measure(job, serve, config)
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
    result = {"bench": "freshness", "machine": machine_facts(), **result}
    print(json.dumps(result, indent=2))
    if config.out:
        Path(config.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def _measure(job: JobConfig, serve: ServeConfig, config: FreshnessBenchConfig) -> dict:
    before = _histogram(serve.metrics_port)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    start_at = time.time() + 2.0  # the pusher process needs a moment to import and connect
    pusher = ctx.Process(target=_pusher, args=(job, config, start_at, queue))
    pusher.start()
    seen: list[tuple[int, float]] = []  # (served version, first time seen)
    last_version, next_print = 0, start_at + 1.0
    with grpc.insecure_channel(serve.listen) as channel:
        stub = serving_pb2_grpc.ServingStub(channel)
        end = start_at + config.seconds + 5.0
        while time.time() < end:
            version = stub.Status(serving_pb2.ServingStatusRequest(), timeout=5).shards[0].version
            now = time.time()
            if version > last_version:
                seen.append((version, now))
                last_version = version
            if now >= next_print:
                print(f"  t={now - start_at:5.1f} s  served version {last_version}", flush=True)
                next_print += 1.0
            if not pusher.is_alive() and queue.qsize() and now > start_at + config.seconds + 1.0:
                break
            time.sleep(config.poll_ms / 1000)
    pushed = queue.get(timeout=60)
    pusher.join(30)
    after = _histogram(serve.metrics_port)
    versions = np.array([v for v, _ in seen], dtype=np.int64)
    times = np.array([t for _, t in seen])
    staleness = []
    for version, ack in pushed["acks"]:
        i = int(np.searchsorted(versions, version, side="left"))
        if i < versions.shape[0]:
            staleness.append(max(0.0, times[i] - ack))
    staleness = np.array(staleness)
    delta = {le: after[le] - before.get(le, 0.0) for le in after}
    return {
        "config": asdict(config),
        "pushes": len(pushed["acks"]),
        "late_pushes": pushed["late_pushes"],
        "rows_per_second": config.rate,
        "end_to_end_seconds": {
            "measured_pushes": int(staleness.shape[0]),
            "p50": float(np.percentile(staleness, 50)),
            "p99": float(np.percentile(staleness, 99)),
            "max": float(staleness.max()),
        },
        "replica_histogram_seconds": {
            "observations": delta.get(float("inf"), 0.0),
            "p50": _histogram_quantile(delta, 0.5),
            "p99": _histogram_quantile(delta, 0.99),
        },
    }
