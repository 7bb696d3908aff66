"""What replicas catching up cost the training: push latency while Subscribe streams read large ranges.

    embps bench catchup [--subscribers 6] [--behind 400] [--seconds 12]

After a network blip or a restart, every serving replica resubscribes from where it was and reads
the range of what changed since: hundreds of pushes, up to the update log's million keys. Those
reads share the shard with the training's pushes. One `embps ps` shard (one table, dim 64) takes
`behind` pushes of 2,048 random keys (about 800,000 keys in its update log); then a pusher pushes
2,048 keys every 20 ms and times each push: first alone (`--alone-seconds`), then while
`subscribers` processes each subscribe from `behind` pushes back, read the range to its end, and
start over, for `seconds`. Reported: push latency p50 / p99 / max in both phases, the ranges the
subscribers read, and the shard's RSS at the end of the loaded phase. Progress every phase.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.machine import machine_facts
from bench.ports import loopback_shards
from bench.ps_bench import start_shards
from ps.job_config import Deadlines, JobConfig
from ps.process import children
from ps.table.config import OptimizerConfig, OptimizerKind, TableConfig

DIM = 64
KEYS_PER_PUSH = 2048
PUSH_EVERY_S = 0.02
KEY_SPACE = 4_000_000


@dataclass(frozen=True)
class CatchupBenchConfig:
    subscribers: int = 6  # processes re-reading a range in a loop
    behind: int = 400  # pushes each subscriber is behind when it subscribes
    seconds: float = 12.0  # the loaded phase
    alone_seconds: float = 4.0  # the phase without subscribers
    out: str | None = None

    def __post_init__(self) -> None:
        if self.subscribers < 1 or self.behind < 1 or self.seconds <= 0 or self.alone_seconds <= 0:
            raise ValueError("subscribers, behind, seconds, alone_seconds: must be positive")


def _subscriber(job: JobConfig, behind: int, stop, ranges) -> None:
    """Subscribes from `behind` pushes back, reads to the range's last message, again until `stop`."""
    import grpc

    from ps.client import PSClient
    from ps.rpc import ps_pb2, ps_pb2_grpc

    children.die_with_parent()
    address = job.shards[0].address
    client = PSClient.from_job(job)
    channel = grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", job.message_limit_bytes)])
    stub = ps_pb2_grpc.ParameterServerStub(channel)
    while not stop.is_set():
        head = client.stats()[0].tables[0].version
        stream = stub.Subscribe(ps_pb2.SubscribeRequest(table="t", from_version=max(0, head - behind)))
        try:
            for message in stream:
                if message.last:
                    with ranges.get_lock():
                        ranges.value += 1
                    break
        except grpc.RpcError:
            pass  # a range the log no longer holds, or the stream ended at the bench's stop
        stream.cancel()
    client.close()
    channel.close()


def _push_latencies(client, rng: np.random.Generator, seconds: float) -> np.ndarray:
    """Pushes KEYS_PER_PUSH random keys every PUSH_EVERY_S for `seconds`; each push's seconds."""
    grads = np.ones((KEYS_PER_PUSH, DIM), np.float32)
    took = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        keys = rng.integers(0, KEY_SPACE, KEYS_PER_PUSH, dtype=np.int64)
        start = time.perf_counter()
        client.push("t", keys, grads)
        took.append(time.perf_counter() - start)
        time.sleep(PUSH_EVERY_S)
    return np.array(took)


def _summary(seconds: np.ndarray) -> dict:
    ms = seconds * 1e3
    return {
        "pushes": int(ms.size),
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "max_ms": float(ms.max()),
    }


def run_catchup_bench(config: CatchupBenchConfig) -> int:
    from ps.client import PSClient

    table = TableConfig("t", dim=DIM, optimizer=OptimizerConfig(kind=OptimizerKind.SGD, lr=0.1))
    job = JobConfig(job="catchup", shards=loopback_shards(1, False), tables=(table,), deadlines=Deadlines())
    with tempfile.TemporaryDirectory(prefix="embps-catchup-") as tmp:
        procs = start_shards(job, Path(tmp), malloc_tuned=True)
        context = mp.get_context("spawn")
        stop, ranges = context.Event(), context.Value("i", 0)
        subscribers = []
        try:
            client = PSClient.from_job(job)
            rng = np.random.default_rng(0)
            print(f"filling the update log: {config.behind} pushes of {KEYS_PER_PUSH} keys", flush=True)
            for _ in range(config.behind):
                keys = np.unique(rng.integers(0, KEY_SPACE, KEYS_PER_PUSH, dtype=np.int64))
                client.push("t", keys, np.ones((keys.shape[0], DIM), np.float32))
            print(f"pushes alone, {config.alone_seconds:g} s", flush=True)
            alone = _summary(_push_latencies(client, rng, config.alone_seconds))
            print(f"  {alone}", flush=True)
            subscribers = [
                context.Process(target=_subscriber, args=(job, config.behind, stop, ranges))
                for _ in range(config.subscribers)
            ]
            for process in subscribers:
                process.start()
            while ranges.value == 0 and all(p.is_alive() for p in subscribers):
                time.sleep(0.05)  # the first range read: the subscribers are up
            print(f"pushes beside {config.subscribers} subscribers re-reading ranges, {config.seconds:g} s", flush=True)
            read_before = ranges.value
            loaded = _summary(_push_latencies(client, rng, config.seconds))
            loaded["ranges_read"] = ranges.value - read_before
            loaded["shard_rss_mib"] = _rss_mib(procs[0].pid)
            print(f"  {loaded}", flush=True)
            client.close()
        finally:
            stop.set()
            for process in subscribers:
                process.join(timeout=30)
            for proc in procs:
                children.stop(proc)
    results = {
        "bench": "catchup",
        "config": dataclasses.asdict(config),
        "machine": machine_facts(),
        "alone": alone,
        "beside_subscribers": loaded,
    }
    if config.out:
        Path(config.out).write_text(json.dumps(results, indent=2))
    return 0


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")
