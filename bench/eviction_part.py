"""`embps bench table`'s eviction part: what a push costs a full table that makes room for its new
keys, against the same push to a table without a capacity; and a large table's TTL sweep, against
the same pushes to the table without a TTL.

For each capacity, two row-wise Adagrad tables get the same Zipf key stream over 4x the capacity
(so that every push brings new keys once the table is full): one with the capacity and LRU
eviction, one without a bound (the yardstick, measured in the same rounds). A table of at most
EXACT_SCAN_ROWS rows picks its victims among all its rows; a larger one among a random sample
(ps/table/embedding_table.py). Rounds alternate the two tables and each figure is its best round,
timed in the thread's CPU time, so a busy neighbour does not land on one of them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from bench.keys import ZipfSampler
from ps.table.config import EvictionConfig, EvictionPolicy, OptimizerConfig, OptimizerKind, TableConfig
from ps.table.embedding_table import EXACT_SCAN_ROWS, EmbeddingTable

ROUNDS = 3
_FILL_BATCHES = 64  # pushes while filling carry up to this many batches' keys each (a quarter of the capacity)
_CLOCK = time.thread_time


@dataclass(frozen=True)
class EvictionPartConfig:
    capacities: tuple[int, ...] = (40_000, 1_000_000)  # rows of each full table (one below EXACT_SCAN_ROWS)
    dim: int = 64
    batch: int = 512  # keys per push: about a 26-table training step's share of one table on one shard
    pushes: int = 300  # timed pushes per table per round
    zipf: float = 1.05
    ttl_rows: int = 1_000_000  # rows of the TTL case's tables (0: skip it)
    ttl_steps: int = 100_000  # its TTL: long, so the timed pushes expire nothing and time the sweep


def _table(dim: int, capacity: int | None, ttl_steps: int | None = None) -> EmbeddingTable:
    eviction = EvictionConfig(policy=EvictionPolicy.LRU if capacity else EvictionPolicy.NONE, ttl_steps=ttl_steps)
    return EmbeddingTable(
        TableConfig(
            name="bench", dim=dim, capacity=capacity, eviction=eviction,
            optimizer=OptimizerConfig(kind=OptimizerKind.ROWWISE_ADAGRAD, lr=0.01),
        )
    )


def _time_round(
    tables: dict[str, EmbeddingTable], batches: list[np.ndarray], grads: np.ndarray, step: int, best: dict[str, float]
) -> None:
    """One round: each table in turn gets the same pushes (steps step + 1, ...); best[name] keeps
    each one's fastest pushes per second so far, in the thread's CPU time."""
    for name, table in tables.items():
        start = _CLOCK()
        for i, keys in enumerate(batches):
            table.apply_gradients(keys, grads[: keys.shape[0]], step=step + 1 + i)
        best[name] = max(best[name], len(batches) / (_CLOCK() - start))


def run_eviction_part(config: EvictionPartConfig) -> dict[str, object]:
    """Per capacity: pushes/s and ms per push of the full table and of the unbounded one, their
    ratio, and the rows the full table evicted per timed push; under "ttl", the TTL case
    (_ttl_case) unless config.ttl_rows is 0."""
    grads = np.random.default_rng(7).normal(size=(_FILL_BATCHES * config.batch, config.dim)).astype(np.float32) * 1e-3
    out: dict[str, object] = {"dim": config.dim, "batch": config.batch, "rounds": ROUNDS, "clock": "thread CPU time"}
    for capacity in config.capacities:
        zipf = ZipfSampler(4 * capacity, config.zipf, seed=capacity)
        full, unbounded = _table(config.dim, capacity), _table(config.dim, None)
        step = 0

        def push(table: EmbeddingTable, keys: np.ndarray, at: int) -> None:
            table.apply_gradients(keys, grads[: keys.shape[0]], step=at)

        with tqdm(total=2 * capacity, desc=f"fill {capacity:,}-row tables", unit="key", unit_scale=True) as progress:
            while full.num_evicted == 0:  # full once a push had to make room
                keys = zipf.keys(max(config.batch, min(_FILL_BATCHES * config.batch, capacity // 4)))
                step += 1
                push(full, keys, step)
                push(unbounded, keys, step)
                progress.update(max(0, min(2 * full.size, 2 * capacity) - progress.n))
        best = {"full": 0.0, "unbounded": 0.0}
        evicted_before = full.num_evicted
        for _ in tqdm(range(ROUNDS), desc=f"evicting pushes, {capacity:,} rows", unit="round"):
            batches = [zipf.keys(config.batch) for _ in range(config.pushes)]
            _time_round({"full": full, "unbounded": unbounded}, batches, grads, step, best)
            step += config.pushes
        out[str(capacity)] = {
            "rows_picked_among": "all rows" if capacity <= EXACT_SCAN_ROWS else "a sample",
            "full_pushes_per_s": best["full"],
            "unbounded_pushes_per_s": best["unbounded"],
            "full_ms_per_push": 1e3 / best["full"],
            "unbounded_ms_per_push": 1e3 / best["unbounded"],
            "full_vs_unbounded": best["full"] / best["unbounded"],
            "evicted_per_push": (full.num_evicted - evicted_before) / (ROUNDS * config.pushes),
        }
    if config.ttl_rows:
        out["ttl"] = _ttl_case(config, grads)
    return out


def _ttl_case(config: EvictionPartConfig, grads: np.ndarray) -> dict[str, object]:
    """A table of ttl_rows rows with a TTL against the same table without one: what each push's
    sweep of a window of rows costs (nothing expires while timed)."""
    n = config.ttl_rows
    swept, plain = _table(config.dim, None, config.ttl_steps), _table(config.dim, None)
    keys = np.arange(n, dtype=np.int64)
    fill = np.zeros((min(n, 1 << 17), config.dim), np.float32)
    for table in tqdm((swept, plain), desc=f"fill {n:,}-row tables (TTL case)", unit="table"):
        for i in range(0, n, fill.shape[0]):
            chunk = keys[i : i + fill.shape[0]]
            table.apply_gradients(chunk, fill[: chunk.shape[0]], step=1)
    rng = np.random.default_rng(n)
    best = {"ttl": 0.0, "none": 0.0}
    step = 1
    for _ in tqdm(range(ROUNDS), desc="pushes beside a TTL sweep", unit="round"):
        batches = [rng.integers(0, n, config.batch) for _ in range(config.pushes)]
        _time_round({"ttl": swept, "none": plain}, batches, grads, step, best)
        step += config.pushes
    return {
        "rows": n,
        "ttl_steps": config.ttl_steps,
        "ttl_ms_per_push": 1e3 / best["ttl"],
        "no_ttl_ms_per_push": 1e3 / best["none"],
        "ttl_vs_no_ttl": best["ttl"] / best["none"],
    }


def print_eviction_part(p: dict) -> None:
    print(
        f"eviction: LRU tables full at their capacity, row-wise Adagrad, dim {p['dim']}, {p['batch']} keys a push, "
        f"best of {p['rounds']} rounds ({p['clock']})"
    )
    for capacity, e in p.items():
        if not isinstance(e, dict) or capacity == "ttl":
            continue
        print(
            f"  {int(capacity):>10,} rows (victims from {e['rows_picked_among']}): full {e['full_ms_per_push']:.3f} ms "
            f"a push, unbounded {e['unbounded_ms_per_push']:.3f} ms ({e['full_vs_unbounded']:.2f}x the rate); "
            f"{e['evicted_per_push']:.0f} rows evicted a push"
        )
    if "ttl" in p:
        t = p["ttl"]
        print(
            f"  TTL of {t['ttl_steps']:,} steps on {t['rows']:,} rows: {t['ttl_ms_per_push']:.3f} ms a push, "
            f"without a TTL {t['no_ttl_ms_per_push']:.3f} ms ({t['ttl_vs_no_ttl']:.2f}x the rate)"
        )
