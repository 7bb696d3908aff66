"""`embps bench table`, growth part: call times while a table fills, and lookups under a grower.

1. Fill: `rows` new keys in calls of `batch`, into the sub-mapped HashMap, then the same keys
   into the former single-array map (FlatHashMap, the yardstick, csrc/flat_hash_map.h). Median,
   p99.9 and max call time up to each checkpoint (10M, 30M): the flat map's max is its
   whole-map rehash; the sub-mapped map rehashes one sub-map at a time.
   Find rates of both on the same 2,000 batches, in turn, in the same run.
2. A reader thread looks up existing keys while a grower thread inserts new ones, on the bare
   map (no lock: find runs beside the writer), on the PS table (both calls queued to one thread,
   first come first served, as the shard server runs every table call, so a lookup waits for at
   most the push in progress) and
   on the serving store (its own lock, held per 8,192 rows written). Reader latency: median,
   p99.9, max. Before this change a reader waited for the whole-map rehash: the flat map's max.

The PS table and the store here hold `dim`-wide rows (default 8) so that 30M rows fit a 24 GiB
machine beside the map; the map's stalls do not depend on the row width.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from ps import native
from ps.sharding import ShardMap
from ps.table.config import OptimizerConfig, OptimizerKind, TableConfig
from ps.table.embedding_table import EmbeddingTable
from serving.store import TableReplica


@dataclass(frozen=True)
class GrowthConfig:
    rows: int = 30_000_000
    dim: int = 8  # row width of the PS table and serving store parts
    batch: int = 65_536  # keys per filling call
    read_batch: int = 4096  # keys per lookup
    push_batch: int = 4096  # new keys per push of the PS table's grower
    grow_seconds: float = 4.0  # how long each grower runs beside the reader
    checkpoints: tuple[int, ...] = (10_000_000, 30_000_000)


def call_stats(seconds: np.ndarray) -> dict[str, float]:
    """Median, p99.9 and max of per-call times (seconds), and max / median."""
    median = float(np.median(seconds))
    return {
        "calls": int(seconds.shape[0]),
        "median_s": median,
        "p99_9_s": float(np.quantile(seconds, 0.999, method="inverted_cdf")),
        "max_s": float(seconds.max()),
        "max_over_median": float(seconds.max() / median),
    }


def run_growth(config: GrowthConfig) -> dict[str, object]:
    rng = np.random.default_rng(7)
    keys = rng.integers(-(2**63), 2**63 - 1, size=config.rows, dtype=np.int64)
    results: dict[str, object] = {"config": {**config.__dict__}}
    results["fill"], results["find"] = _fill_both(config, keys, rng)
    results["reader_under_grower"] = {
        "hash_map": _map_reader(config, keys, rng),
        "ps_table": _table_reader(config, keys, rng),
        "serving_store": _store_reader(config, keys, rng),
    }
    return results


def _fill_both(config: GrowthConfig, keys: np.ndarray, rng: np.random.Generator) -> tuple[dict, dict]:
    maps = {"sub_maps": native.HashMap(), "flat": native.FlatHashMap()}
    times: dict[str, list[float]] = {name: [] for name in maps}
    moved: dict[str, list[int]] = {name: [] for name in maps}  # entries rehashed by each call
    rows = np.empty(config.batch, dtype=np.int64)
    inserted = np.empty(config.batch, dtype=np.uint8)
    sizes = [min(i + config.batch, keys.shape[0]) for i in range(0, keys.shape[0], config.batch)]
    # One map after the other, not call by call in turn: the flat map's whole-map rehash (a few
    # hundred MB allocated, copied and freed) would land in the sub-mapped map's next call.
    for name, m in maps.items():
        for i in tqdm(range(0, keys.shape[0], config.batch), desc=f"fill {name} map", unit="call"):
            part = keys[i : i + config.batch]
            n = part.shape[0]
            if name == "flat":
                capacity = m.capacity
                start = time.perf_counter()
                m.find_or_insert(part, rows[:n], inserted[:n])
                times[name].append(time.perf_counter() - start)
                moved[name].append(i if m.capacity != capacity else 0)  # a growth moves every entry
            else:
                rehashed = m.rehashed
                start = time.perf_counter()
                m._map.find_or_insert(part, rows[:n], inserted[:n])
                times[name].append(time.perf_counter() - start)
                moved[name].append(m.rehashed - rehashed)
    sizes_np = np.array(sizes)
    fill: dict[str, object] = {}
    for checkpoint in config.checkpoints:
        upto = sizes_np <= checkpoint
        if checkpoint <= keys.shape[0]:
            fill[f"to_{checkpoint}"] = {
                name: {
                    **call_stats(np.array(t)[upto]),
                    "slowest_call_at_keys": int(sizes_np[upto][np.argmax(np.array(t)[upto])]),
                    "max_entries_rehashed_by_one_call": int(np.array(moved[name])[upto].max()),
                }
                for name, t in times.items()
            }
    fill["bytes_per_key"] = {"sub_maps": maps["sub_maps"].memory_bytes / keys.shape[0],
                             "flat": maps["flat"].memory_bytes / keys.shape[0]}
    # Find rates, batch by batch in turn on the same keys, so both see the same machine.
    # Which map goes first alternates, so neither always finds the batch's keys already cached.
    batches = [keys[rng.integers(0, keys.shape[0], config.read_batch)] for _ in range(2000)]
    spent = {name: 0.0 for name in maps}
    out = np.empty(config.read_batch, dtype=np.int64)
    targets = [("sub_maps", maps["sub_maps"]._map), ("flat", maps["flat"])]
    for i, b in enumerate(batches):
        for name, target in targets if i % 2 else targets[::-1]:
            start = time.perf_counter()
            target.find(b, out)
            spent[name] += time.perf_counter() - start
    total = len(batches) * config.read_batch
    find = {f"{name}_keys_per_s": total / s for name, s in spent.items()}
    find["sub_maps_vs_flat"] = spent["flat"] / spent["sub_maps"]
    return fill, find


def _reader_under(grow: Callable[[], bool], read: Callable[[np.ndarray], object], existing: np.ndarray,
                  config: GrowthConfig, desc: str) -> dict[str, object]:
    """Runs grow() in a loop on one thread (until it returns False or grow_seconds pass) while
    this thread calls read(batch of existing keys); returns the reader's latency stats."""
    rng = np.random.default_rng(8)
    done = threading.Event()
    grower_calls = [0]

    def grower() -> None:
        end = time.perf_counter() + config.grow_seconds
        while time.perf_counter() < end and grow():
            grower_calls[0] += 1
        done.set()

    thread = threading.Thread(target=grower, name=f"grower-{desc}")
    latencies = []
    thread.start()
    with tqdm(desc=f"reader beside {desc} grower", unit="lookup") as progress:
        while not done.is_set():
            batch = existing[rng.integers(0, existing.shape[0], config.read_batch)]
            start = time.perf_counter()
            read(batch)
            latencies.append(time.perf_counter() - start)
            progress.update()
    thread.join()
    return {"grower_calls": grower_calls[0], "reader": call_stats(np.array(latencies))}


class _FreshKeys:
    """New keys drawn up front, handed out `n` at a time, so the grower thread spends its time in
    the table's calls (which release the GIL), not in drawing keys (which holds it)."""

    def __init__(self, rng: np.random.Generator, total: int) -> None:
        self.keys = rng.integers(-(2**63), 2**63 - 1, size=total, dtype=np.int64)
        self.used = 0

    def take(self, n: int) -> np.ndarray | None:
        """The next n keys, or None once they run out (the grower then stops)."""
        if self.used + n > self.keys.shape[0]:
            return None
        self.used += n
        return self.keys[self.used - n : self.used]


_FRESH_KEYS = 24_000_000  # more than a grower inserts in grow_seconds here


def _map_reader(config: GrowthConfig, keys: np.ndarray, rng: np.random.Generator) -> dict[str, object]:
    m = native.HashMap()
    for i in tqdm(range(0, keys.shape[0], 1 << 20), desc="fill map", unit="Mkey"):
        m.find_or_insert(keys[i : i + (1 << 20)])
    before = m.rehashed
    fresh = _FreshKeys(rng, _FRESH_KEYS)

    def grow() -> bool:
        part = fresh.take(config.batch)
        if part is not None:
            m.find_or_insert(part)
        return part is not None

    result = _reader_under(grow, m.find, keys, config, "hash map")
    result["rehashed_during"] = m.rehashed - before
    return result


def _table_reader(config: GrowthConfig, keys: np.ndarray, rng: np.random.Generator) -> dict[str, object]:
    table = EmbeddingTable(TableConfig(name="growth", dim=config.dim,
                                       optimizer=OptimizerConfig(kind=OptimizerKind.ROWWISE_ADAGRAD)))
    zeros = np.zeros((1 << 20, config.dim), np.float32)
    for i in tqdm(range(0, keys.shape[0], 1 << 20), desc="fill PS table", unit="Mrow"):
        part = keys[i : i + (1 << 20)]
        table.apply_gradients(part, zeros[: part.shape[0]])
    tables_thread = ThreadPoolExecutor(1)  # the shard server's: every table call, in arrival order
    grads = np.zeros((config.push_batch, config.dim), np.float32)
    pushes: list[float] = []
    fresh = _FreshKeys(rng, _FRESH_KEYS // 2)

    def push(part: np.ndarray) -> None:
        start = time.perf_counter()
        table.apply_gradients(part, grads)
        pushes.append(time.perf_counter() - start)

    def grow() -> bool:
        part = fresh.take(config.push_batch)
        if part is not None:
            tables_thread.submit(push, part).result()
        return part is not None

    def read(batch: np.ndarray) -> None:
        tables_thread.submit(table.lookup, batch).result()

    try:
        result = _reader_under(grow, read, keys, config, "PS table")
    finally:
        tables_thread.shutdown()
    result["push"] = call_stats(np.array(pushes))
    return result


def _store_reader(config: GrowthConfig, keys: np.ndarray, rng: np.random.Generator) -> dict[str, object]:
    replica = TableReplica(TableConfig(name="growth", dim=config.dim), ShardMap.uniform(1))
    shard = replica.shards[0]
    values = np.zeros((1 << 20, config.dim), np.float32)
    for i in tqdm(range(0, keys.shape[0], 1 << 20), desc="fill serving store", unit="Mrow"):
        part = keys[i : i + (1 << 20)]
        shard.upsert(part, values[: part.shape[0]])
    new_values = np.ones((config.batch, config.dim), np.float32)
    fresh = _FreshKeys(rng, _FRESH_KEYS)

    def grow() -> bool:
        part = fresh.take(config.batch)
        if part is not None:
            shard.upsert(part, new_values)
        return part is not None

    return _reader_under(grow, replica.lookup, keys, config, "serving store")


def print_growth(r: dict) -> None:
    ms = 1e3
    for checkpoint, by_map in ((k, v) for k, v in r["fill"].items() if k.startswith("to_")):
        for name, s in by_map.items():
            print(
                f"fill {int(checkpoint[3:]) / 1e6:g}M keys, calls of {r['config']['batch']:,} ({name:8s}) "
                f"median {s['median_s'] * ms:7.2f} ms | p99.9 {s['p99_9_s'] * ms:7.2f} ms | "
                f"max {s['max_s'] * ms:7.2f} ms ({s['max_over_median']:.1f}x median, at "
                f"{s['slowest_call_at_keys'] / 1e6:.1f}M) | most entries one call rehashed "
                f"{s['max_entries_rehashed_by_one_call'] / 1e6:.2f}M"
            )
    b = r["fill"]["bytes_per_key"]
    print(f"map bytes per key: sub-maps {b['sub_maps']:.1f}, flat {b['flat']:.1f}")
    f = r["find"]
    print(
        f"find (batches of {r['config']['read_batch']}): sub-maps {f['sub_maps_keys_per_s'] / 1e6:.2f} M keys/s, "
        f"flat {f['flat_keys_per_s'] / 1e6:.2f} M keys/s ({f['sub_maps_vs_flat']:.2f}x)"
    )
    for name, g in r["reader_under_grower"].items():
        s = g["reader"]
        extra = ""
        if "push" in g:
            extra = f", push median {g['push']['median_s'] * ms:.2f} ms, max {g['push']['max_s'] * ms:.2f} ms"
        print(
            f"reader beside a grower, {name:13s}: lookup median {s['median_s'] * ms:6.2f} ms | "
            f"p99.9 {s['p99_9_s'] * ms:6.2f} ms | max {s['max_s'] * ms:6.2f} ms "
            f"({s['calls']} lookups, {g['grower_calls']} grower calls{extra})"
        )
