"""`embps bench follow`: what a serving replica following a job costs the shards, and itself, as the
job has more tables.

Per table count: 2 shards (processes), one client pushing `keys` keys over all the tables in one
PushMulti and committing the step, back to back, for `seconds`; first with no replica, then with a
replica following (consistency "step", then "latest"). Reported: each process's CPU per step
(utime + stime from /proc), the steps' rate, and the shards' CPU with a replica as a ratio of
without it in the same run (the yardstick: the machine's speed moves from one minute to the next).
A replica that does not serve the last committed step ("step") at the end fails the run.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from bench.freshness_bench import _start, _wait_serving
from bench.machine import machine_facts, process_cpu_seconds
from bench.ports import free_ports
from bench.ps_bench import start_shards
from ps.job_config import JobConfig, ShardConfig
from ps.process import children
from ps.table.config import TableConfig
from serving.config import Consistency, ServeConfig, dump_serve_config

MODES = ("none", "step", "latest")


@dataclass(frozen=True)
class FollowBenchConfig:
    tables: tuple[int, ...] = (26, 300)
    keys: int = 2400  # keys a push, spread evenly over the tables
    dim: int = 8
    seconds: float = 5.0  # measured per (table count, mode)
    out: str | None = None

    def validate(self) -> FollowBenchConfig:
        if not self.tables or min(self.tables) < 1:
            raise ValueError(f"tables: counts >= 1, got {self.tables}")
        if self.keys < max(self.tables):
            raise ValueError(f"keys: at least one a table ({max(self.tables)}), got {self.keys}")
        if self.dim < 1 or self.seconds <= 0:
            raise ValueError("dim: must be >= 1; seconds: must be > 0")
        return self


def _measure(job: JobConfig, work: Path, config: FollowBenchConfig, mode: str, shard_pids: list[int]) -> dict:
    """One mode on running shards: a replica started for it (unless "none"), steps pushed and
    committed for config.seconds, CPU per step of each process."""
    from ps.client import PSClient

    names = [t.name for t in job.tables]
    per = config.keys // len(names)
    rng = np.random.default_rng(0)
    keys = np.concatenate([rng.choice(4 * per + 16, per, replace=False).astype(np.int64) + 1 for _ in names])
    offsets = np.arange(0, per * len(names) + 1, per, dtype=np.int64)
    grads = np.full((keys.shape[0], config.dim), 0.01, np.float32)
    replica = None
    with PSClient.from_job(job) as client:
        step = _last_step(client)
        try:
            if mode != "none":
                ports = free_ports(2)
                serve = ServeConfig(job=job, listen=f"127.0.0.1:{ports[0]}", metrics_port=ports[1],
                                    tables=tuple(names), consistency=Consistency(mode))
                path, log = work / f"serve-{mode}-{len(names)}.toml", work / f"serve-{mode}-{len(names)}.log"
                path.write_text(dump_serve_config(serve, str(work / "job.toml")))
                replica = _start(["serve", "--config", str(path)], log)
                _wait_serving(serve.listen, "", replica, log)
            pids = shard_pids + ([replica.pid] if replica is not None else [])
            step += 1  # one step before the clock: the replica's first ranges (its initial copies)
            client.send_push(client.prepare_push_multi(names, keys, offsets, grads, step=step))
            client.commit(step)
            time.sleep(1.0)
            before = [process_cpu_seconds(p) for p in pids]
            start, steps = time.monotonic(), 0
            while time.monotonic() - start < config.seconds:
                step += 1
                client.send_push(client.prepare_push_multi(names, keys, offsets, grads, step=step))
                client.commit(step)
                steps += 1
            elapsed = time.monotonic() - start
            shard_cpu = [process_cpu_seconds(p) - b for p, b in zip(shard_pids, before, strict=False)]
            replica_cpu = 0.0
            if replica is not None:
                _wait_step(serve, step, mode)
                replica_cpu = process_cpu_seconds(replica.pid) - before[-1]
        finally:
            if replica is not None:
                children.stop(replica)
    return {
        "tables": len(names), "mode": mode, "steps": steps, "ms_per_step": elapsed / steps * 1e3,
        "shard_cpu_ms_per_step": [c / steps * 1e3 for c in shard_cpu],
        "replica_cpu_ms_per_step": replica_cpu / steps * 1e3,
    }


def _last_step(client) -> int:
    """The newest step the job committed (0 before any)."""
    return max(t.step for reply in client.stats() for t in reply.tables)


def _wait_step(serve: ServeConfig, step: int, mode: str, timeout: float = 60.0) -> None:
    """Waits until the replica serves `step` (consistency "step"), or every table's last version
    ("latest": its Status versions stop moving); RuntimeError after `timeout`."""
    import grpc

    from ps.rpc import serving_pb2, serving_pb2_grpc

    end = time.monotonic() + timeout
    with grpc.insecure_channel(serve.listen) as channel:
        stub = serving_pb2_grpc.ServingStub(channel)
        last = None
        while time.monotonic() < end:
            status = stub.Status(serving_pb2.ServingStatusRequest(), timeout=10)
            if mode == "step" and status.model_version >= step:
                return
            versions = [s.version for s in status.shards]
            if mode == "latest" and versions == last:
                return
            last = versions
            time.sleep(0.2)
    raise RuntimeError(f"the replica ({mode}) did not catch up with step {step} within {timeout:.0f} s")


def run_follow_bench(config: FollowBenchConfig) -> int:
    config.validate()
    print(f"embps bench follow: 2 shards, {config.keys} keys of dim {config.dim} a step over N tables, a push and a "
          f"commit a step, {config.seconds:g} s per table count and mode ({', '.join(MODES)})", flush=True)
    results = []
    for n in config.tables:
        ports = free_ports(4)
        job = JobConfig(
            job="follow",
            shards=tuple(ShardConfig(f"127.0.0.1:{ports[2 * i]}", ports[2 * i + 1]) for i in range(2)),
            tables=tuple(TableConfig(f"t{i}", dim=config.dim) for i in range(n)),
        )
        with tempfile.TemporaryDirectory(prefix="embps-follow-") as scratch:
            work = Path(scratch)
            procs = start_shards(job, work, malloc_tuned=True)
            try:
                rows = {}
                for mode in MODES:
                    rows[mode] = row = _measure(job, work, config, mode, [p.pid for p in procs])
                    shards = sum(row["shard_cpu_ms_per_step"])
                    without = sum(rows["none"]["shard_cpu_ms_per_step"])
                    row["shards_vs_none"] = shards / without
                    each = " + ".join(f"{c:.2f}" for c in row["shard_cpu_ms_per_step"])
                    print(f"  {n:>4} tables, replica {mode:>6}: {row['ms_per_step']:7.2f} ms a step; CPU a step: "
                          f"shards {each} ms ({row['shards_vs_none']:.2f}x of no replica), replica "
                          f"{row['replica_cpu_ms_per_step']:.2f} ms", flush=True)
                    results.append(row)
            finally:
                children.stop_all(procs)
    result = {"bench": "follow", "config": asdict(config), "machine": machine_facts(), "results": results}
    if config.out:
        Path(config.out).parent.mkdir(parents=True, exist_ok=True)
        Path(config.out).write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {config.out}")
    return 0
