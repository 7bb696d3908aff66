"""embps bench freshness: how long an acknowledged push takes to be visible in a serving replica.

    pusher process ──Push step s + Commit(s) (rate rows/s, open loop)──> PS shards (2)
        ──Subscribe──> embps serve, consistency = "latest" (each shard as fresh as its stream)
        ──Subscribe(committed)──> embps serve, consistency = "step" (the consistent cut)  <── poller

The shards and both replicas run as their own processes; a pusher process pushes `rate` rows/s
over the shards in batches of `batch` on a fixed schedule, one training step per batch, and
commits each step once its push is acknowledged everywhere (a sync trainer's order). It records
each step's per-shard table versions and the time its acknowledgement arrived. This process polls
both replicas' Status every `poll_ms`: "latest" gives each shard's push-ack -> visible delay (the
first poll that shows the shard at the push's version or past it; the per-shard figure), "step"
the push-ack -> visible-in-a-consistent-cut delay (model_version >= s). Both on this host's clock;
they overstate by up to one poll interval. The ack time is when the pusher took the reply of the
push's last shard, so a shard that answered first can show its rows a little before it: the
per-shard figure keeps such delays below 0 rather than hiding them. The replicas' own histograms
(PS ack -> applied per shard, on the shard's ack time; commit -> visible in a cut) are reported
beside them.
Prints progress every second; `--out` writes the results as JSON.
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
from typing import TYPE_CHECKING

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.machine import machine_facts
from bench.ports import free_ports
from ps.job_config import Deadlines, JobConfig, ShardConfig, dump_job_config
from ps.process.children import POLL_CHANNEL_OPTIONS
from ps.process.malloc import MALLOC_TUNING
from ps.process.python_command import python_path
from ps.rpc import serving_pb2, serving_pb2_grpc
from ps.table.config import TableConfig
from serving.config import Consistency, ServeConfig, dump_serve_config

if TYPE_CHECKING:
    from ps.client import PushResult

REPO_ROOT = Path(__file__).resolve().parents[1]

# One acknowledged push as the pusher records it: (step, shard -> that shard's table version
# after the push, unix time the pusher took the reply).
Ack = tuple[int, dict[int, int], float]


@dataclass(frozen=True)
class FreshnessBenchConfig:
    """rate: rows pushed per second; batch: rows per push; seconds: length of the measurement."""

    rate: int = 100_000
    batch: int = 5_000
    seconds: float = 20.0
    dim: int = 16
    rows: int = 1_000_000  # key space the pushes draw from
    shards: int = 2
    poll_ms: float = 2.0
    out: str | None = None

    def validate(self) -> FreshnessBenchConfig:
        for name in ("rate", "batch", "dim", "rows", "shards"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.seconds <= 0 or self.poll_ms <= 0:
            raise ValueError("seconds, poll_ms: must be > 0")
        if self.batch > self.rows:
            raise ValueError(f"batch: must be <= rows ({self.rows}), got {self.batch}")
        return self


def _start(argv: list[str], log_path: Path) -> subprocess.Popen:
    env = {**os.environ, **MALLOC_TUNING, "PYTHONPATH": python_path(str(REPO_ROOT))}
    with open(log_path, "ab") as log:
        return subprocess.Popen([sys.executable, "-m", "embps", *argv], cwd=REPO_ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT)


def _wait_serving(address: str, service: str, proc: subprocess.Popen, log_path: Path, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    with grpc.insecure_channel(address, options=POLL_CHANNEL_OPTIONS) as channel:
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
    """Pushes config.rate rows/s from start_at for config.seconds, one step per batch, each step
    committed once acknowledged; puts {"acks": [Ack], "late_pushes": n}."""
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
            result = client.push("bench", keys, grads, step=i + 1)
            acks.append(_ack(i + 1, result, time.time()))
            client.commit(i + 1)
    queue.put({"acks": acks, "late_pushes": late})


def _ack(step: int, result: PushResult, acked: float) -> Ack:
    """The record of one acknowledged push. result.versions maps shard -> version: a list of it
    holds the shard numbers, which the per-shard figure once took for versions (every shard had
    shown "version" 0 or 1 long before, so it read 0 for every push but the first)."""
    return step, dict(result.versions), acked


def _histogram(metrics_port: int, name: str = "embps_serving_staleness_seconds") -> dict[float, float]:
    """Bucket bound -> cumulative count of histogram `name`, summed over its label sets."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    buckets: dict[float, float] = {}
    for labels, count in re.findall(name + r'_bucket\{([^}]*)\} (\S+)', text):
        le = re.search(r'le="([^"]+)"', labels).group(1)
        bound = float("inf") if le == "+Inf" else float(le)
        buckets[bound] = buckets.get(bound, 0.0) + float(count)
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
    ports = free_ports(2 * config.shards + 4)
    job = JobConfig(
        job="freshness",
        shards=tuple(ShardConfig(f"127.0.0.1:{ports[2 * i]}", ports[2 * i + 1]) for i in range(config.shards)),
        tables=(TableConfig("bench", dim=config.dim),),
        deadlines=Deadlines(lookup=30.0, push=30.0, stats=5.0),
    )
    serve_ports = ports[2 * config.shards:]
    replicas = {
        consistency: ServeConfig(job=job, listen=f"127.0.0.1:{serve_ports[2 * i]}", metrics_port=serve_ports[2 * i + 1],
                                 tables=("bench",), consistency=consistency)
        for i, consistency in enumerate((Consistency.LATEST, Consistency.STEP))
    }
    procs: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory(prefix="embps-freshness-") as scratch:
        work = Path(scratch)
        (work / "job.toml").write_text(dump_job_config(job))
        try:
            for i, shard in enumerate(job.shards):
                log = work / f"ps-{i}.log"
                procs.append(_start(["ps", "--config", str(work / "job.toml"), "--shard", str(i)], log))
                _wait_serving(shard.address, "", procs[-1], log)
            for consistency, serve in replicas.items():
                path, log = work / f"serve-{consistency}.toml", work / f"serve-{consistency}.log"
                path.write_text(dump_serve_config(serve, str(work / "job.toml")))
                procs.append(_start(["serve", "--config", str(path)], log))
                _wait_serving(serve.listen, "", procs[-1], log)
            print(f"{config.shards} shards and 2 replicas (latest, step) up; pushing {config.rate} rows/s in batches "
                  f"of {config.batch} (a step each, committed) for {config.seconds:.0f} s (dim {config.dim})",
                  flush=True)
            result = _measure(job, replicas, config)
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


def _measure(job: JobConfig, replicas: dict[Consistency, ServeConfig], config: FreshnessBenchConfig) -> dict:
    latest, step = replicas[Consistency.LATEST], replicas[Consistency.STEP]
    before = _histogram(latest.metrics_port)
    before_cut = _histogram(step.metrics_port, "embps_serving_cut_visible_seconds")
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    start_at = time.time() + 2.0  # the pusher process needs a moment to import and connect
    pusher = ctx.Process(target=_pusher, args=(job, config, start_at, queue))
    pusher.start()
    shard_seen: list[list[tuple[int, float]]] = [[] for _ in job.shards]  # per shard: (served version, first seen)
    cut_seen: list[tuple[int, float]] = []  # (model version, first seen)
    next_print = start_at + 1.0
    with grpc.insecure_channel(latest.listen) as latest_channel, grpc.insecure_channel(step.listen) as step_channel:
        latest_stub = serving_pb2_grpc.ServingStub(latest_channel)
        step_stub = serving_pb2_grpc.ServingStub(step_channel)
        end = start_at + config.seconds + 5.0
        while time.time() < end:
            shards = latest_stub.Status(serving_pb2.ServingStatusRequest(), timeout=5).shards
            model_version = step_stub.Status(serving_pb2.ServingStatusRequest(), timeout=5).model_version
            now = time.time()
            for status in shards:
                seen = shard_seen[status.shard]
                if not seen or status.version > seen[-1][0]:
                    seen.append((status.version, now))
            if not cut_seen or model_version > cut_seen[-1][0]:
                cut_seen.append((model_version, now))
            if now >= next_print:
                print(f"  t={now - start_at:5.1f} s  per-shard versions {[s[-1][0] for s in shard_seen]}, "
                      f"model version (cut) {cut_seen[-1][0]}", flush=True)
                next_print += 1.0
            if not pusher.is_alive() and queue.qsize() and now > start_at + config.seconds + 1.0:
                break
            time.sleep(config.poll_ms / 1000)
    pushed = queue.get(timeout=60)
    pusher.join(30)
    per_shard, in_cut = _ack_delays(pushed["acks"], shard_seen, cut_seen)
    replica = _delta(before, _histogram(latest.metrics_port))
    cut = _delta(before_cut, _histogram(step.metrics_port, "embps_serving_cut_visible_seconds"))
    return {
        "config": asdict(config),
        "pushes": len(pushed["acks"]),
        "late_pushes": pushed["late_pushes"],
        "rows_per_second": config.rate,
        "per_shard_ack_to_visible_seconds": _summary(per_shard),
        "consistent_cut_ack_to_visible_seconds": _summary(in_cut),
        "replica_histogram_seconds": {
            "observations": replica.get(float("inf"), 0.0),
            "p50": _histogram_quantile(replica, 0.5),
            "p99": _histogram_quantile(replica, 0.99),
        },
        "cut_commit_to_visible_histogram_seconds": {
            "observations": cut.get(float("inf"), 0.0),
            "p50": _histogram_quantile(cut, 0.5),
            "p99": _histogram_quantile(cut, 0.99),
        },
    }


def _ack_delays(
    acks: list[Ack], shard_seen: list[list[tuple[int, float]]], cut_seen: list[tuple[int, float]]
) -> tuple[list[float], list[float]]:
    """(per-shard ack -> visible delays, one per push and shard it reached; ack -> visible-in-a-cut
    delays, one per push), from the pusher's acks and the polls' first sightings: shard_seen[s] and
    cut_seen list (version, first time seen), versions rising. A version never seen gives none."""
    per_shard: list[float] = []
    in_cut: list[float] = []
    for step, versions, acked in acks:
        for shard, version in versions.items():
            per_shard += _delay(shard_seen[shard], version, acked)
        in_cut += _delay(cut_seen, step, acked)
    return per_shard, in_cut


def _delay(seen: list[tuple[int, float]], version: int, ack: float) -> list[float]:
    """[first time `seen` reached version - ack], or [] if it never did. Not clipped: below 0 says
    the version showed before the pusher took the reply (see the module's docstring)."""
    versions = np.array([v for v, _ in seen], dtype=np.int64)
    i = int(np.searchsorted(versions, version, side="left"))
    return [seen[i][1] - ack] if i < versions.shape[0] else []


def _delta(before: dict[float, float], after: dict[float, float]) -> dict[float, float]:
    return {le: after[le] - before.get(le, 0.0) for le in after}


def _summary(delays: list[float]) -> dict:
    values = np.array(delays) if delays else np.array([float("nan")])
    return {
        "measured": len(delays),
        "min": float(values.min()),
        "p50": float(np.percentile(values, 50)),
        "p99": float(np.percentile(values, 99)),
        "max": float(values.max()),
    }
