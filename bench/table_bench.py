"""`embps bench table`: hash map, lookup and optimizer rates of one table on one thread, then the
growth part (bench/table_growth.py): call times while a map fills to 30M keys, and lookups beside
a thread that grows the map, the PS table and the serving store.

Each rate is printed next to the raw `torch.index_select` gather of the same rows from a plain
(rows, dim) tensor, measured in the same run, so the figures carry their own yardstick.

The precision part fills a float32, a float16 and an int8 table (TableConfig.storage) with the
same rows and reports each one's bytes per row, lookup and row-wise Adagrad rates as ratios to
the float32 table's, measured in interleaved rounds of the same run, in the thread's CPU time.
The eviction part (bench/eviction_part.py) times pushes to full LRU tables against the same pushes
to tables without a capacity, and to a large table with a TTL against the table without one.

Table lookups are also timed with the table's key->row map swapped for the former single-array
map (FlatHashMap, csrc/flat_hash_map.h) holding the same pairs, in interleaved rounds: the same
rows, store and gather, so the ratio is what the sub-mapped map costs or saves a lookup.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from tqdm import tqdm

from bench.eviction_part import EvictionPartConfig, print_eviction_part, run_eviction_part
from bench.fbgemm_rates import fbgemm_cpu_rates
from bench.keys import ZipfSampler, key_of_rank
from bench.machine import machine_facts
from bench.table_growth import GrowthConfig, print_growth, run_growth
from ps.native import FlatHashMap, HashMap
from ps.table.config import OptimizerConfig, OptimizerKind, Storage, TableConfig
from ps.table.embedding_table import EmbeddingTable


@dataclass(frozen=True)
class TableBenchConfig:
    rows: int = 10_000_000
    dim: int = 64
    batch: int = 4096
    batches: int = 200
    zipf: float = 1.05
    growth_rows: int = 30_000_000  # keys filled by the growth part (0: skip it)
    growth_dim: int = 8  # row width of the growth part's PS table and serving store
    out: str | None = None
    precision_rows: int = 2_000_000  # rows of each table of the precision part (0: skip it)
    eviction_capacities: tuple[int, ...] = (40_000, 1_000_000)  # the eviction part's full tables; (): skip it


def _rate(fn, batches: list[np.ndarray], clock=time.perf_counter) -> float:
    """Items per second of fn over the batches (one warm-up batch first), timed by `clock`."""
    fn(batches[0])
    start = clock()
    for b in batches:
        fn(b)
    elapsed = clock() - start
    return sum(b.shape[0] for b in batches) / elapsed


def run_table_bench(config: TableBenchConfig) -> int:
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    n, dim, batch = config.rows, config.dim, config.batch
    all_keys = key_of_rank(np.arange(n, dtype=np.int64))
    results: dict[str, object] = {"config": asdict(config), "machine": machine_facts()}
    print(f"embps bench table: {n:,} rows x dim {dim}, batches of {batch}, 1 thread")

    progress = tqdm(total=n, desc="fill hash map", unit="key", unit_scale=True)
    hash_map = HashMap()
    start = time.perf_counter()
    for i in range(0, n, batch):
        hash_map.find_or_insert(all_keys[i : i + batch])
        progress.update(min(batch, n - i))
    progress.close()
    results["hash_insert_new_keys_per_s"] = n / (time.perf_counter() - start)
    lookup_keys = rng.choice(all_keys, size=min(n, 10_000_000))
    start = time.perf_counter()
    hash_map.find(lookup_keys)
    results["hash_find_keys_per_s_one_call"] = lookup_keys.shape[0] / (time.perf_counter() - start)
    # Fresh batches for each verb, so no verb runs on slots the previous one left in cache.
    results["hash_find_keys_per_s"] = _rate(
        hash_map.find, [rng.choice(all_keys, size=batch) for _ in range(config.batches)]
    )
    results["hash_find_or_insert_existing_keys_per_s"] = _rate(
        hash_map.find_or_insert, [rng.choice(all_keys, size=batch) for _ in range(config.batches)]
    )
    sample = {int(k): i for i, k in enumerate(all_keys[: min(n, 1_000_000)])}
    probe = [int(k) for k in rng.choice(all_keys[: len(sample)], size=200_000)]
    start = time.perf_counter()
    for k in probe:
        sample.get(k, -1)
    results["python_dict_find_keys_per_s"] = len(probe) / (time.perf_counter() - start)
    del hash_map, sample

    table = EmbeddingTable(
        TableConfig(
            name="bench", dim=dim, optimizer=OptimizerConfig(kind=OptimizerKind.ROWWISE_ADAGRAD, lr=0.01)
        )
    )
    fill = 1 << 20
    zero = np.zeros((fill, dim), np.float32)
    for i in tqdm(range(0, n, fill), desc="fill table", unit="block"):
        chunk = all_keys[i : i + fill]
        table.apply_gradients(chunk, zero[: chunk.shape[0]])
    raw = torch.randn(n, dim)
    zipf = ZipfSampler(n, config.zipf, seed=1)
    streams = {
        "uniform": [rng.integers(0, n, batch) for _ in range(config.batches)],
        "zipf": [zipf.ranks(batch) for _ in range(config.batches)],
    }
    grads = np.random.default_rng(2).normal(size=(batch, dim)).astype(np.float32) * 1e-3
    flat_finder = _FlatFinder(table)
    for name, rank_batches in streams.items():
        key_batches = [key_of_rank(r) for r in rank_batches]
        index_batches = [torch.from_numpy(r) for r in rank_batches]
        gather = _rate(lambda idx: torch.index_select(raw, 0, idx), index_batches)
        lookup = _rate(table.lookup, key_batches)
        update_batches = [
            key_of_rank(r)
            for r in (
                rng.integers(0, n, batch) if name == "uniform" else zipf.ranks(batch)
                for _ in range(config.batches)
            )
        ]
        update = _rate(lambda k: table.apply_gradients(k, grads[: k.shape[0]]), update_batches)
        unique = np.mean([np.unique(k).shape[0] for k in key_batches]) / batch
        results[name] = {
            "raw_index_select_rows_per_s": gather,
            "lookup_rows_per_s": lookup,
            "lookup_vs_raw_gather": lookup / gather,
            "lookup_vs_single_array_map": _lookup_vs_flat_map(table, flat_finder, key_batches, name),
            "rowwise_adagrad_rows_per_s": update,
            "unique_key_fraction": unique,
        }
    results["table_memory_bytes"] = table.memory_bytes
    results["table_bytes_per_row"] = table.memory_bytes / table.size
    results["table_bytes_per_row_beyond_values_and_state"] = (
        table.memory_bytes / table.size - (table.dim + table.state_width) * 4
    )
    results["fbgemm_cpu_uniform"] = fbgemm_cpu_rates(n, dim, batch, min(config.batches, 50))
    table = raw = None  # the growth part needs the memory
    if config.growth_rows:
        checkpoints = tuple(c for c in (10_000_000, 30_000_000) if c < config.growth_rows) + (config.growth_rows,)
        results["growth"] = run_growth(
            GrowthConfig(rows=config.growth_rows, dim=config.growth_dim, batch=65_536,
                         read_batch=batch, push_batch=batch, checkpoints=checkpoints)
        )
    if config.precision_rows:
        results["precision"] = run_precision_part(config)
    if config.eviction_capacities:
        results["eviction"] = run_eviction_part(
            EvictionPartConfig(capacities=config.eviction_capacities, dim=dim, zipf=config.zipf)
        )

    _print(results)
    if config.out:
        with open(config.out, "w") as f:
            json.dump({"bench": "table", **results}, f, indent=2)
        print(f"wrote {config.out}")
    return 0


class _FlatFinder:
    """The table's key->row pairs in the former single-array map, with the table map's `find`."""

    def __init__(self, table: EmbeddingTable) -> None:
        keys, rows = table._map.export()
        keys = keys[np.argsort(rows)]  # inserted in row order, the flat map hands out the same rows
        self.map = FlatHashMap()  # grown by its own schedule, as the former tables grew it
        got = np.empty(keys.shape[0], np.int64)
        self.map.find_or_insert(keys, got, np.empty(keys.shape[0], np.uint8))
        if not np.array_equal(got, np.arange(keys.shape[0])):
            raise RuntimeError("the single-array map did not hand out the table's rows")

    def find(self, keys: np.ndarray) -> np.ndarray:
        rows = np.empty(keys.shape[0], np.int64)
        self.map.find(keys, rows)
        return rows


LOOKUP_ROUNDS = 7


def _lookup_vs_flat_map(table: EmbeddingTable, flat: _FlatFinder, batches: list[np.ndarray],
                        desc: str) -> dict[str, object]:
    """Lookup rates with the table's map and with the single-array map (same pairs), in
    LOOKUP_ROUNDS interleaved rounds; the median of the rounds' ratios."""
    own = table._map
    rates: dict[str, list[float]] = {"sub_maps": [], "flat": []}
    try:
        for r in tqdm(range(LOOKUP_ROUNDS), desc=f"lookup {desc}: sub-maps vs single-array map", unit="round"):
            for name in ("sub_maps", "flat") if r % 2 else ("flat", "sub_maps"):
                table._map = own if name == "sub_maps" else flat
                rates[name].append(_rate(table.lookup, batches))
    finally:
        table._map = own
    ratios = np.array(rates["sub_maps"]) / np.array(rates["flat"])
    return {
        "sub_maps_rows_per_s": float(np.median(rates["sub_maps"])),
        "flat_rows_per_s": float(np.median(rates["flat"])),
        "ratio": float(np.median(ratios)),
        "ratio_rounds": [round(float(x), 3) for x in ratios],
    }


def _print(r: dict) -> None:
    m = 1e6
    print(f"hash map insert (new keys, batch)   {r['hash_insert_new_keys_per_s'] / m:8.2f} M keys/s")
    print(f"hash map find (batch)                {r['hash_find_keys_per_s'] / m:8.2f} M keys/s")
    print(f"hash map find (one call)             {r['hash_find_keys_per_s_one_call'] / m:8.2f} M keys/s")
    print(
        f"hash map find_or_insert (existing)   {r['hash_find_or_insert_existing_keys_per_s'] / m:8.2f} M keys/s"
    )
    print(f"python dict get                      {r['python_dict_find_keys_per_s'] / m:8.2f} M keys/s")
    for name in ("uniform", "zipf"):
        s = r[name]
        print(
            f"{name:8s} raw index_select {s['raw_index_select_rows_per_s'] / m:6.2f} M rows/s | "
            f"lookup {s['lookup_rows_per_s'] / m:6.2f} M rows/s ({s['lookup_vs_raw_gather']:.0%} of raw) | "
            f"rowwise adagrad {s['rowwise_adagrad_rows_per_s'] / m:6.2f} M rows/s "
            f"(unique keys {s['unique_key_fraction']:.0%})"
        )
        v = s["lookup_vs_single_array_map"]
        print(
            f"         lookup with the single-array map's find instead: {v['flat_rows_per_s'] / m:6.2f} M rows/s, "
            f"sub-maps {v['sub_maps_rows_per_s'] / m:6.2f} M rows/s ({v['ratio']:.2f}x, median of "
            f"{len(v['ratio_rounds'])} interleaved rounds: {v['ratio_rounds']})"
        )
    print(
        f"table memory {r['table_memory_bytes'] / 2**30:.2f} GiB, {r['table_bytes_per_row']:.1f} bytes/row "
        f"({r['table_bytes_per_row_beyond_values_and_state']:.1f} beyond values and optimizer state)"
    )
    fb = r["fbgemm_cpu_uniform"]
    if isinstance(fb, str):
        print(f"fbgemm CPU: skipped ({fb})")
    else:
        print(
            f"fbgemm CPU TBE (uniform): forward {fb['fbgemm_forward_rows_per_s'] / m:6.2f} M rows/s | "
            f"forward + fused rowwise adagrad {fb['fbgemm_rowwise_adagrad_rows_per_s'] / m:6.2f} M rows/s"
        )
    if "growth" in r:
        print_growth(r["growth"])
    if "precision" in r:
        _print_precision(r["precision"])
    if "eviction" in r:
        print_eviction_part(r["eviction"])


PRECISION_ROUNDS = 3  # interleaved rounds per storage and stream: the best round counts
# The precision part times the bench thread's CPU time (the table calls run on it, torch on one
# thread): on a shared machine, time the thread spends descheduled would otherwise land on
# whichever storage happened to be running, and the ratios swung 0.6-2x under a load of 10.
PRECISION_CLOCK = time.thread_time


def run_precision_part(config: TableBenchConfig) -> dict[str, object]:
    """Bytes per row and lookup / row-wise Adagrad rates of float32, float16 and int8 tables of
    config.precision_rows rows each, with ratios to float32. The three tables take turns within
    each round, so a slower spell of the machine hits them alike; each figure is its best round."""
    n, dim, batch = config.precision_rows, config.dim, config.batch
    rng = np.random.default_rng(3)
    all_keys = key_of_rank(np.arange(n, dtype=np.int64))
    optimizer = OptimizerConfig(kind=OptimizerKind.ROWWISE_ADAGRAD, lr=0.01)
    tables = {s: EmbeddingTable(TableConfig(name="bench", dim=dim, optimizer=optimizer, storage=s)) for s in Storage}
    fill = 1 << 18
    init_grads = np.random.default_rng(4).normal(size=(fill, dim)).astype(np.float32) * 1e-2
    with tqdm(total=n * len(tables), desc="fill precision tables", unit="row", unit_scale=True) as progress:
        for table in tables.values():
            for i in range(0, n, fill):
                chunk = all_keys[i : i + fill]
                table.apply_gradients(chunk, init_grads[: chunk.shape[0]], step=1)
                progress.update(chunk.shape[0])
    zipf = ZipfSampler(n, config.zipf, seed=5)
    grads = np.random.default_rng(6).normal(size=(batch, dim)).astype(np.float32) * 1e-3
    rates: dict[str, dict[str, dict[str, float]]] = {s: {} for s in tables}
    total = PRECISION_ROUNDS * 2 * len(tables)
    with tqdm(total=total, desc="precision rates", unit="run") as progress:
        for _ in range(PRECISION_ROUNDS):
            for stream in ("uniform", "zipf"):
                draw = (lambda: rng.integers(0, n, batch)) if stream == "uniform" else (lambda: zipf.ranks(batch))
                lookups = [key_of_rank(draw()) for _ in range(config.batches)]
                updates = [key_of_rank(draw()) for _ in range(config.batches)]
                for storage, table in tables.items():
                    best = rates[storage].setdefault(
                        stream, {"lookup_rows_per_s": 0.0, "rowwise_adagrad_rows_per_s": 0.0}
                    )
                    lookup = _rate(table.lookup, lookups, PRECISION_CLOCK)

                    def push(k: np.ndarray, table: EmbeddingTable = table) -> None:
                        table.apply_gradients(k, grads[: k.shape[0]])

                    update = _rate(push, updates, PRECISION_CLOCK)
                    best["lookup_rows_per_s"] = max(best["lookup_rows_per_s"], lookup)
                    best["rowwise_adagrad_rows_per_s"] = max(best["rowwise_adagrad_rows_per_s"], update)
                    progress.update(1)
    base = tables[Storage.FLOAT32]
    out: dict[str, object] = {"rows": n, "dim": dim, "optimizer": "rowwise_adagrad", "clock": "thread CPU time"}
    for storage, table in tables.items():
        entry: dict[str, object] = {
            "row_words": table.width,
            "bytes_per_row": table.memory_bytes / table.size,
            "bytes_per_row_vs_float32": table.memory_bytes / base.memory_bytes,
        }
        for stream, r in rates[storage].items():
            f32 = rates[Storage.FLOAT32][stream]
            entry[stream] = {
                **r,
                "lookup_vs_float32": r["lookup_rows_per_s"] / f32["lookup_rows_per_s"],
                "rowwise_adagrad_vs_float32": r["rowwise_adagrad_rows_per_s"] / f32["rowwise_adagrad_rows_per_s"],
            }
        out[str(storage)] = entry
    return out


def _print_precision(p: dict) -> None:
    m = 1e6
    print(
        f"precision: {p['rows']:,} rows x dim {p['dim']}, row-wise Adagrad, best of {PRECISION_ROUNDS} rounds "
        f"({p.get('clock', 'wall time')})"
    )
    for storage in Storage:
        e = p[str(storage)]
        print(
            f"  {storage:8s} {e['bytes_per_row']:6.1f} bytes/row ({e['bytes_per_row_vs_float32']:.0%} of float32, "
            f"{e['row_words']} words a row)"
        )
        for stream in ("uniform", "zipf"):
            s = e[stream]
            print(
                f"    {stream:8s} lookup {s['lookup_rows_per_s'] / m:6.2f} M rows/s ({s['lookup_vs_float32']:.2f}x "
                f"float32) | rowwise adagrad {s['rowwise_adagrad_rows_per_s'] / m:6.2f} M rows/s "
                f"({s['rowwise_adagrad_vs_float32']:.2f}x float32)"
            )
