"""`embps bench table`, growth part: call times while a table fills, and lookups under a grower.

1. Fill: `rows` new keys in calls of `batch`, into the sub-mapped HashMap, then the same keys
   into the former single-array map (FlatHashMap, the yardstick, csrc/flat_hash_map.h). Median,
   p99.9 and max call time up to each checkpoint (10M, 30M): the flat map's max is its
   whole-map rehash; the sub-mapped map rehashes one sub-map at a time.
   Each call is also timed on the thread's CPU clock, and its run-queue wait (time runnable but
   without a core: the shared machine's pauses, not the map's work) is taken off its wall time
   (bench/thread_clock.py), so a descheduled call shows as such beside the entries it rehashed.
   Find rates of both on the same batches, in interleaved rounds (median of the rounds' ratios).
2. A reader thread looks up existing keys while a grower thread inserts new ones, on the bare
   map (no lock: find runs beside the writer), on the PS table (both calls queued to one thread,
   first come first served, as the shard server runs every table call, so a lookup waits for at
   most the push in progress) and
   on the serving store (its own lock, held per 8,192 rows written). Reader latency: median,
   p99.9, max, on the wall clock and with the reader's own run-queue wait taken off (waits for
   the GIL or a lock stay counted). Before this change a reader waited for the whole-map rehash:
   the flat map's max.

The PS table and the store here hold `dim`-wide rows (default 8) so that 30M rows fit a 24 GiB
machine beside the map; the map's stalls do not depend on the row width.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from bench.thread_clock import OtherThreadWait, ThreadClock
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
    fresh_keys: int = 24_000_000  # new keys drawn for each grower: more than it inserts in grow_seconds


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


def off_queue(wall: np.ndarray, waiting: np.ndarray) -> np.ndarray:
    """Wall times less the run-queue waits inside them (the wall times when the wait is unknown)."""
    return wall - np.nan_to_num(waiting)


def run_growth(config: GrowthConfig) -> dict[str, object]:
    rng = np.random.default_rng(7)
    keys = rng.integers(-(2**63), 2**63 - 1, size=config.rows, dtype=np.int64)
    results: dict[str, object] = {"config": {**config.__dict__}, "load_average_at_start": os.getloadavg()}
    results["fill"], results["find"] = _fill_both(config, keys, rng)
    results["reader_under_grower"] = {
        "hash_map": _map_reader(config, keys, rng),
        "ps_table": _table_reader(config, keys, rng),
        "serving_store": _store_reader(config, keys, rng),
    }
    results["load_average_at_end"] = os.getloadavg()
    return results


def _fill_both(config: GrowthConfig, keys: np.ndarray, rng: np.random.Generator) -> tuple[dict, dict]:
    maps = {"sub_maps": native.HashMap(), "flat": native.FlatHashMap()}
    times: dict[str, list[float]] = {name: [] for name in maps}
    cpu: dict[str, list[float]] = {name: [] for name in maps}  # the thread's CPU time in each call
    waits: dict[str, list[float]] = {name: [] for name in maps}  # run-queue wait inside each call
    moved: dict[str, list[int]] = {name: [] for name in maps}  # entries rehashed by each call
    clock = ThreadClock()
    rows = np.empty(config.batch, dtype=np.int64)
    inserted = np.empty(config.batch, dtype=np.uint8)
    sizes = [min(i + config.batch, keys.shape[0]) for i in range(0, keys.shape[0], config.batch)]
    # One map after the other, not call by call in turn: the flat map's whole-map rehash (a few
    # hundred MB allocated, copied and freed) would land in the sub-mapped map's next call.
    for name, m in maps.items():
        for i in tqdm(range(0, keys.shape[0], config.batch), desc=f"fill {name} map", unit="call"):
            part = keys[i : i + config.batch]
            n = part.shape[0]
            before = m.capacity if name == "flat" else m.rehashed
            call = m.find_or_insert if name == "flat" else m._map.find_or_insert
            start = time.perf_counter()
            cpu_start, wait_start = clock.read()
            call(part, rows[:n], inserted[:n])
            cpu_end, wait_end = clock.read()
            times[name].append(time.perf_counter() - start)
            cpu[name].append(cpu_end - cpu_start)
            waits[name].append(np.nan if wait_start is None else wait_end - wait_start)
            if name == "flat":
                moved[name].append(i if m.capacity != before else 0)  # a growth moves every entry
            else:
                moved[name].append(m.rehashed - before)
    clock.close()
    sizes_np = np.array(sizes)
    fill: dict[str, object] = {}
    for checkpoint in config.checkpoints:
        upto = sizes_np <= checkpoint
        if checkpoint <= keys.shape[0]:
            fill[f"to_{checkpoint}"] = {name: _fill_stats(np.array(t)[upto], np.array(cpu[name])[upto],
                                                          np.array(waits[name])[upto], np.array(moved[name])[upto],
                                                          sizes_np[upto])
                                         for name, t in times.items()}
    fill["bytes_per_key"] = {"sub_maps": maps["sub_maps"].memory_bytes / keys.shape[0],
                             "flat": maps["flat"].memory_bytes / keys.shape[0]}
    return fill, _find_rates(maps, keys, rng, config.read_batch)


def _fill_stats(wall: np.ndarray, cpu: np.ndarray, waiting: np.ndarray, moved: np.ndarray,
                sizes: np.ndarray) -> dict[str, object]:
    """Call-time stats of one map's fill up to a checkpoint: on the wall clock, on the thread's CPU
    clock and off the run queue; where the slowest call fell, what it rehashed, where its time went."""
    slowest = int(np.argmax(wall))
    return {
        **call_stats(wall),
        "cpu": call_stats(cpu),
        "off_queue": call_stats(off_queue(wall, waiting)),
        "slowest_call_at_keys": int(sizes[slowest]),
        "slowest_call_entries_rehashed": int(moved[slowest]),
        "slowest_call_cpu_s": float(cpu[slowest]),
        "slowest_call_run_queue_wait_s": None if np.isnan(waiting[slowest]) else float(waiting[slowest]),
        "max_entries_rehashed_by_one_call": int(moved.max()),
        "median_entries_rehashed_per_call": float(np.median(moved)),
    }


FIND_ROUNDS = 9  # interleaved rounds of the find rates; each round's ratio counts, the median is reported


def _find_rates(maps: dict, keys: np.ndarray, rng: np.random.Generator, read_batch: int) -> dict[str, object]:
    """Find rates of both maps on the same batches, in FIND_ROUNDS rounds; within a round each map
    runs every batch, which one goes first alternates, so both see the same moments of the machine."""
    batches = [keys[rng.integers(0, keys.shape[0], read_batch)] for _ in range(200)]
    out = np.empty(read_batch, dtype=np.int64)
    targets = [("sub_maps", maps["sub_maps"]._map), ("flat", maps["flat"])]
    rates: dict[str, list[float]] = {name: [] for name, _ in targets}
    for r in tqdm(range(FIND_ROUNDS), desc="find rates", unit="round"):
        for name, target in targets if r % 2 else targets[::-1]:
            start = time.perf_counter()
            for b in batches:
                target.find(b, out)
            rates[name].append(len(batches) * read_batch / (time.perf_counter() - start))
    ratios = np.array(rates["sub_maps"]) / np.array(rates["flat"])
    return {
        **{f"{name}_keys_per_s": float(np.median(r)) for name, r in rates.items()},
        "sub_maps_vs_flat": float(np.median(ratios)),
        "sub_maps_vs_flat_rounds": [round(float(x), 3) for x in ratios],
    }


def _reader_under(grow: Callable[[], bool], read: Callable[[np.ndarray], object], existing: np.ndarray,
                  config: GrowthConfig, desc: str, server: int | None = None) -> dict[str, object]:
    """Runs grow() in a loop on one thread (until it returns False or grow_seconds pass) while
    this thread calls read(batch of existing keys); returns the reader's latency stats.

    Off the run queue: each lookup's wall time less the run-queue waits inside it of this thread
    and of `server` (the native id of the thread that runs read's work, if another); waits for the
    GIL or a lock stay in. The grower's own run-queue wait during the slowest lookup is reported
    beside it: a grower paused while it holds the GIL keeps the reader waiting for the GIL."""
    rng = np.random.default_rng(8)
    done = threading.Event()
    grower_calls = [0]
    grower_id: list[int] = []
    started = threading.Event()

    def grower() -> None:
        grower_id.append(threading.get_native_id())
        started.set()
        end = time.perf_counter() + config.grow_seconds
        while time.perf_counter() < end and grow():
            grower_calls[0] += 1
        done.set()

    thread = threading.Thread(target=grower, name=f"grower-{desc}")
    latencies: list[float] = []
    waits: list[list[float | None]] = []  # per lookup: this thread's, the server's, the grower's wait
    clock = ThreadClock()
    thread.start()
    started.wait()
    others = [OtherThreadWait(server) if server is not None else None, OtherThreadWait(grower_id[0])]

    def read_waits() -> list[float | None]:
        return [clock.wait()] + [o.wait() if o is not None else 0.0 for o in others]

    with tqdm(desc=f"reader beside {desc} grower", unit="lookup") as progress:
        while not done.is_set():
            batch = existing[rng.integers(0, existing.shape[0], config.read_batch)]
            start = time.perf_counter()
            before = read_waits()
            read(batch)
            after = read_waits()
            latencies.append(time.perf_counter() - start)
            waits.append([np.nan if a is None or b is None else b - a for a, b in zip(before, after, strict=True)])
            progress.update()
    thread.join()
    clock.close()
    for o in others:
        if o is not None:
            o.close()
    wall, waiting = np.array(latencies), np.array(waits)
    slowest = int(np.argmax(wall))
    own_wait = waiting[:, 0] + waiting[:, 1]
    slowest_off = int(np.argmax(off_queue(wall, own_wait)))

    def seconds(x: float) -> float | None:
        return None if np.isnan(x) else float(x)

    return {
        "grower_calls": grower_calls[0],
        "reader": call_stats(wall),
        "reader_off_queue": call_stats(off_queue(wall, own_wait)),
        "slowest_lookup_run_queue_wait_s": seconds(own_wait[slowest]),
        "slowest_lookup_grower_run_queue_wait_s": seconds(waiting[slowest, 2]),
        # The lookup slowest off the run queue, and how long the grower (which may hold the GIL)
        # waited for a core meanwhile.
        "slowest_off_queue_lookup_grower_run_queue_wait_s": seconds(waiting[slowest_off, 2]),
    }


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


def _map_reader(config: GrowthConfig, keys: np.ndarray, rng: np.random.Generator) -> dict[str, object]:
    m = native.HashMap()
    for i in tqdm(range(0, keys.shape[0], 1 << 20), desc="fill map", unit="Mkey"):
        m.find_or_insert(keys[i : i + (1 << 20)])
    before = m.rehashed
    fresh = _FreshKeys(rng, config.fresh_keys)

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
    server = tables_thread.submit(threading.get_native_id).result()
    grads = np.zeros((config.push_batch, config.dim), np.float32)
    pushes: list[float] = []
    fresh = _FreshKeys(rng, config.fresh_keys // 2)

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
        result = _reader_under(grow, read, keys, config, "PS table", server)
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
    fresh = _FreshKeys(rng, config.fresh_keys)

    def grow() -> bool:
        part = fresh.take(config.batch)
        if part is not None:
            shard.upsert(part, new_values)
        return part is not None

    return _reader_under(grow, replica.lookup, keys, config, "serving store")


def _ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1e3:.2f} ms"


def print_growth(r: dict) -> None:
    ms = 1e3
    for checkpoint, by_map in ((k, v) for k, v in r["fill"].items() if k.startswith("to_")):
        for name, s in by_map.items():
            c, q = s["cpu"], s["off_queue"]
            wait = s["slowest_call_run_queue_wait_s"]
            print(
                f"fill {int(checkpoint[3:]) / 1e6:g}M keys, calls of {r['config']['batch']:,} ({name:8s}) "
                f"median {s['median_s'] * ms:7.2f} ms | p99.9 {s['p99_9_s'] * ms:7.2f} ms | "
                f"max {s['max_s'] * ms:7.2f} ms ({s['max_over_median']:.1f}x median, at "
                f"{s['slowest_call_at_keys'] / 1e6:.1f}M: rehashed {s['slowest_call_entries_rehashed'] / 1e6:.2f}M, "
                f"CPU {s['slowest_call_cpu_s'] * ms:.2f} ms, "
                f"run-queue wait {'n/a' if wait is None else f'{wait * ms:.2f} ms'}) | most entries one call "
                f"rehashed {s['max_entries_rehashed_by_one_call'] / 1e6:.2f}M (median "
                f"{s['median_entries_rehashed_per_call'] / 1e6:.2f}M)\n"
                f"    on the thread's CPU clock: median {c['median_s'] * ms:.2f} ms, max {c['max_s'] * ms:.2f} ms "
                f"({c['max_over_median']:.1f}x) | off the run queue: median {q['median_s'] * ms:.2f} ms, "
                f"max {q['max_s'] * ms:.2f} ms ({q['max_over_median']:.1f}x)"
            )
    b = r["fill"]["bytes_per_key"]
    print(f"map bytes per key: sub-maps {b['sub_maps']:.1f}, flat {b['flat']:.1f}")
    f = r["find"]
    print(
        f"find (batches of {r['config']['read_batch']}): sub-maps {f['sub_maps_keys_per_s'] / 1e6:.2f} M keys/s, "
        f"flat {f['flat_keys_per_s'] / 1e6:.2f} M keys/s ({f['sub_maps_vs_flat']:.2f}x, median of "
        f"{len(f['sub_maps_vs_flat_rounds'])} interleaved rounds: {f['sub_maps_vs_flat_rounds']})"
    )
    for name, g in r["reader_under_grower"].items():
        s = g["reader"]
        extra = ""
        if "push" in g:
            extra = f", push median {g['push']['median_s'] * ms:.2f} ms, max {g['push']['max_s'] * ms:.2f} ms"
        q = g["reader_off_queue"]
        wait, grower_wait = g["slowest_lookup_run_queue_wait_s"], g["slowest_lookup_grower_run_queue_wait_s"]
        print(
            f"reader beside a grower, {name:13s}: lookup median {s['median_s'] * ms:6.2f} ms | "
            f"p99.9 {s['p99_9_s'] * ms:6.2f} ms | max {s['max_s'] * ms:6.2f} ms "
            f"(its run-queue wait {'n/a' if wait is None else f'{wait * ms:.2f} ms'}, the grower's "
            f"{'n/a' if grower_wait is None else f'{grower_wait * ms:.2f} ms'}) | off the run queue: "
            f"p99.9 {q['p99_9_s'] * ms:6.2f} ms, max {q['max_s'] * ms:6.2f} ms (the grower's run-queue wait "
            f"meanwhile {_ms(g['slowest_off_queue_lookup_grower_run_queue_wait_s'])}) "
            f"({s['calls']} lookups, {g['grower_calls']} grower calls{extra})"
        )
    print(f"load average: {r['load_average_at_start'][0]:.1f} at start, {r['load_average_at_end'][0]:.1f} at end")
