"""`embps bench cut`: what a serving replica's consistent cut (serving/cut.py) costs per training step
as the model has more tables.

Each step, every (table, shard) stream offers its committed range to one ModelCut, in process (no
gRPC, no follower): a share `changed` of them carry `rows` rows each, the others are empty (the step
left them alone, as it does most tables of a many-table model). The last offer of a step publishes
the cut. Reported per table count: CPU seconds per step and per (table, shard), and that per-stream
cost as a ratio of the smallest table count's in the same run: ~1x when a step's cost grows with
tables x shards, more when it grows faster.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class CutBenchConfig:
    tables: tuple[int, ...] = (26, 200)
    shards: int = 2
    steps: int = 20
    dim: int = 16
    changed: float = 0.25  # share of (table, shard) streams whose range carries rows each step
    rows: int = 16  # rows in a changed range
    repeat: int = 3  # runs per table count, interleaved; the fastest counts
    out: str | None = None


def measure(config: CutBenchConfig, num_tables: int) -> float:
    """CPU seconds per step of `config.steps` steps of a cut over num_tables x config.shards streams."""
    from ps.sharding import ShardMap
    from ps.table.config import TableConfig
    from serving.cut import Delta, ModelCut
    from serving.metrics import ServingMetrics
    from serving.store import TableReplica

    shard_map = ShardMap.uniform(config.shards)
    tables = {f"t{i}": TableReplica(TableConfig(f"t{i}", dim=config.dim), shard_map) for i in range(num_tables)}
    streams = [(name, s) for name in tables for s in range(config.shards)]
    rng = np.random.default_rng(0)
    empty_keys = np.empty(0, np.int64)
    empty_rows = np.empty((0, config.dim), np.float32)

    async def run() -> float:
        cut = ModelCut(tables, ServingMetrics(), 1 << 40)
        changed = [rng.random(len(streams)) < config.changed for _ in range(config.steps)]
        start = time.process_time()
        for step in range(1, config.steps + 1):
            for (name, s), carries in zip(streams, changed[step - 1], strict=True):
                if carries:
                    keys = rng.integers(0, 1 << 40, config.rows)
                    keys = keys[shard_map.split(keys)[s]]
                    values = np.full((keys.shape[0], config.dim), float(step), np.float32)
                else:
                    keys, values = empty_keys, empty_rows
                await cut.offer(name, s, Delta(step, step, 1, keys, values, empty_keys, commit_time=time.time()))
        seconds = time.process_time() - start
        if cut.version != config.steps:
            raise RuntimeError(f"the cut reached step {cut.version}, not {config.steps}")
        return seconds / config.steps

    return asyncio.run(run())


def run_cut_bench(config: CutBenchConfig) -> int:
    from bench.machine import machine_facts

    print(
        f"embps bench cut: {config.shards} shards, {config.steps} steps, {config.changed:.0%} of the ranges with "
        f"{config.rows} rows of dim {config.dim}, the others empty; fastest of {config.repeat}",
        flush=True,
    )
    best = {n: float("inf") for n in config.tables}
    for _ in range(config.repeat):
        for n in config.tables:
            best[n] = min(best[n], measure(config, n))
    smallest = min(config.tables)
    per_stream = {n: best[n] / (n * config.shards) for n in config.tables}
    print(f"{'tables':>7} {'streams':>8} {'CPU ms/step':>12} {'us/stream':>10} {'vs ' + str(smallest) + ' tables':>14}")
    results = []
    for n in config.tables:
        ratio = per_stream[n] / per_stream[smallest]
        print(f"{n:>7} {n * config.shards:>8} {best[n] * 1e3:>12.2f} {per_stream[n] * 1e6:>10.1f} {ratio:>13.2f}x")
        results.append({"tables": n, "cpu_s_per_step": best[n], "cpu_s_per_stream": per_stream[n],
                        "per_stream_vs_smallest": ratio})
    if config.out:
        Path(config.out).parent.mkdir(parents=True, exist_ok=True)
        Path(config.out).write_text(json.dumps(
            {"bench": "cut", "config": asdict(config), "machine": machine_facts(), "results": results}, indent=1
        ))
        print(f"wrote {config.out}")
    return 0
