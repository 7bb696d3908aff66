"""`embps demo` (issue-2 stage): trains one table on a synthetic Zipf key stream, printing keys/s.

A planted target per key (a pure function of the key) makes the loss fall as rows learn: each
step pulls the rows of a Zipf batch, takes the squared-error gradient toward the targets and
pushes it with row-wise Adagrad.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from bench.keys import ZipfSampler
from ps.table import EmbeddingTable
from ps.table_config import Initializer, OptimizerConfig, OptimizerKind, TableConfig


@dataclass(frozen=True)
class DemoConfig:
    rows: int = 1_000_000
    dim: int = 32
    batch: int = 4096
    steps: int = 300
    zipf: float = 1.05


def run_demo(config: DemoConfig) -> int:
    table = EmbeddingTable(
        TableConfig(
            name="demo",
            dim=config.dim,
            optimizer=OptimizerConfig(kind=OptimizerKind.ROWWISE_ADAGRAD, lr=0.5),
            initializer=Initializer.UNIFORM,
            init_scale=0.01,
        )
    )
    targets = EmbeddingTable(
        TableConfig(name="targets", dim=config.dim, initializer=Initializer.NORMAL, init_scale=1.0, seed=99)
    )
    sampler = ZipfSampler(config.rows, config.zipf, seed=0)
    print(f"embps demo: one table, dim {config.dim}, Zipf({config.zipf}) keys over {config.rows:,} ids")
    keys_done = 0
    start = time.perf_counter()
    losses = []
    bar = tqdm(range(1, config.steps + 1), desc="train", unit="step")
    for step in bar:
        keys = sampler.keys(config.batch)
        values = table.lookup(keys).numpy()
        error = values - targets.init_values(keys)
        loss = float(np.mean(error**2))
        losses.append(loss)
        table.apply_gradients(keys, (2.0 / config.dim) * error, step=step)
        keys_done += keys.shape[0]
        bar.set_postfix(loss=f"{loss:.4f}", keys_per_s=f"{keys_done / (time.perf_counter() - start):,.0f}")
    elapsed = time.perf_counter() - start
    print(
        f"trained {config.steps} steps, {keys_done:,} keys in {elapsed:.1f} s: {keys_done / elapsed:,.0f} keys/s "
        f"(lookup + push); loss {np.mean(losses[:10]):.4f} -> {np.mean(losses[-10:]):.4f}; "
        f"{table.size:,} rows, {table.memory_bytes / 2**20:.0f} MiB"
    )
    return 0 if np.mean(losses[-10:]) < np.mean(losses[:10]) else 1
