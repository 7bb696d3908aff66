"""`embps bench snapshot`: snapshot write and read rates, to local disk and to a local S3 server.

One table of N rows x dim (rowwise Adagrad, so 1 state word per row), or with --tables T the rows
spread over T tables (a model of many sparse features: each table's 3-4 files per snapshot are
requests whose latency, more than their bytes, sets a round's time). For each target:
  full write       ShardSnapshotter.snapshot(kind="full"): export, parquet, sha256, store, commit
  full read        restore() of that snapshot: fetch, verify, parse into a TableState
  incremental write  after pushes touching `touched` of the rows: only those rows (+ deletions)
  restore chain    restore() of the incremental: full + delta, merged
  staged full      a full write as a shard's StageSnapshot takes it: stage() copies the tables
                   (what a shard's pushes wait for: `full_staged_held`), finish() writes the copies
                   (`full_staged_write`: both together); --staging-bytes bounds the copies
MB/s counts the bytes of the snapshot's files (as listed in its manifest); rows/s the rows in it.
The S3 target is SeaweedFS on 127.0.0.1 (bench/s3_server.py): loopback, sharing this machine's cores.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from bench.keys import key_of_rank
from bench.machine import machine_facts
from ps.snapshot.files import SnapshotWriter, open_snapshot, restore
from ps.snapshot.ops import ShardSnapshotter
from ps.snapshot.storage import StorageConfig
from ps.table.config import OptimizerConfig, OptimizerKind, TableConfig
from ps.table.embedding_table import EmbeddingTable
from ps.table.state import TableState

JOB = "bench"


@dataclass(frozen=True)
class SnapshotBenchConfig:
    rows: int = 10_000_000  # in all: rows // tables per table
    dim: int = 64
    tables: int = 1
    touched: float = 0.01  # fraction of rows an incremental snapshot holds
    staging_bytes: int = 1 << 62  # the staged full write's budget (default: every table is copied)
    targets: tuple[str, ...] = ("local", "s3")
    out: str | None = None

    def validate(self) -> SnapshotBenchConfig:
        if self.tables < 1:
            raise ValueError(f"tables: must be >= 1, got {self.tables}")
        if self.rows < self.tables:
            raise ValueError(f"rows: must be >= tables ({self.tables}: a row each at least), got {self.rows}")
        if not 0 < self.touched <= 1:
            raise ValueError(f"touched: must be in (0, 1], got {self.touched}")
        if self.staging_bytes < 0:
            raise ValueError(f"staging_bytes: must be >= 0, got {self.staging_bytes}")
        unknown = set(self.targets) - {"local", "s3"}
        if unknown or not self.targets:
            raise ValueError(f"targets: choose from 'local', 's3', got {self.targets}")
        return self


def _table_names(config: SnapshotBenchConfig) -> list[str]:
    return ["emb"] if config.tables == 1 else [f"emb{i:03d}" for i in range(config.tables)]


def _make_tables(config: SnapshotBenchConfig) -> dict[str, EmbeddingTable]:
    """The bench's tables, each holding rows // tables rows (its own keys) of random values."""
    n, dim = config.rows // config.tables, config.dim
    rng = np.random.default_rng(0)
    tables = {}
    for i, name in enumerate(_table_names(config)):
        table = EmbeddingTable(
            TableConfig(name, dim=dim, optimizer=OptimizerConfig(kind=OptimizerKind.ROWWISE_ADAGRAD, lr=0.01))
        )
        keys = np.sort(key_of_rank(np.arange(i * n, (i + 1) * n, dtype=np.int64)))
        state = TableState(
            keys=keys,
            values=rng.random((n, dim), dtype=np.float32) - np.float32(0.5),
            optimizer_state=rng.random((n, 1), dtype=np.float32),
            freq=rng.integers(1, 1000, n, dtype=np.uint32),
            last_step=np.ones(n, dtype=np.uint32),
            pending_keys=np.empty(0, np.int64),
            pending_counts=np.empty(0, np.uint32),
            pending_last_step=np.empty(0, np.uint32),
            version=1,
            step=1,
        )
        table.load(state)
        tables[name] = table
    return tables


def _touch(table: EmbeddingTable, fraction: float, step: int) -> int:
    """Pushes one gradient to `fraction` of the rows (in batches); returns how many rows."""
    keys = table.export().keys  # sorted; a random subset of them
    rng = np.random.default_rng(step)
    chosen = rng.choice(keys, size=max(1, int(keys.shape[0] * fraction)), replace=False)
    for i in range(0, chosen.shape[0], 65536):
        batch = chosen[i : i + 65536]
        grads = rng.standard_normal((batch.shape[0], table.dim), dtype=np.float32)
        table.apply_gradients(batch, grads, step=step)
    return int(chosen.shape[0])


def _measure(results: dict, target: str, phase: str, seconds: float, nbytes: int, rows: int) -> None:
    results[f"{target}.{phase}"] = {
        "seconds": seconds,
        "bytes": nbytes,
        "rows": rows,
        "mb_per_s": nbytes / seconds / 1e6,
        "rows_per_s": rows / seconds,
    }


def _run_target(
    target: str, uri: str, storage_config: StorageConfig | None, config: SnapshotBenchConfig, progress: tqdm
) -> dict:
    results: dict[str, dict] = {}
    tables = _make_tables(config)
    snapper = ShardSnapshotter(tables, 0)
    progress.set_postfix_str(f"{target}: full write")
    start = time.perf_counter()
    full = snapper.snapshot(uri, JOB, 1, "full", storage_config=storage_config)
    _measure(results, target, "full_write", time.perf_counter() - start, full.total_bytes, full.total_rows)
    progress.update()

    progress.set_postfix_str(f"{target}: full read")
    start = time.perf_counter()
    states = restore(uri, JOB, 1, storage_config)
    _measure(results, target, "full_read", time.perf_counter() - start, full.total_bytes, full.total_rows)
    del states
    progress.update()

    progress.set_postfix_str(f"{target}: touch {config.touched:.0%} of rows")
    for table in tables.values():
        _touch(table, config.touched, step=2)
    progress.set_postfix_str(f"{target}: incremental write")
    start = time.perf_counter()
    inc = snapper.snapshot(uri, JOB, 2, "incremental", storage_config=storage_config)
    _measure(results, target, "incremental_write", time.perf_counter() - start, inc.total_bytes, inc.total_rows)
    progress.update()

    progress.set_postfix_str(f"{target}: incremental read")
    start = time.perf_counter()
    snapshot = open_snapshot(uri, JOB, 2, storage_config)
    for name in tables:
        snapshot.load_table_shard(name, 0)
    _measure(results, target, "incremental_read", time.perf_counter() - start, inc.total_bytes, inc.total_rows)
    progress.update()

    progress.set_postfix_str(f"{target}: restore full + incremental")
    start = time.perf_counter()
    restored = restore(uri, JOB, 2, storage_config)
    seconds = time.perf_counter() - start
    restored_rows = sum(shards[0].keys.shape[0] for shards in restored.values())
    _measure(results, target, "restore_chain", seconds, full.total_bytes + inc.total_bytes, restored_rows)
    for name, table in tables.items():
        if not np.array_equal(restored[name][0].values, table.export().values):
            raise RuntimeError(f"{target}: restored values of table {name} differ from the live table")
    del restored
    progress.update()

    progress.set_postfix_str(f"{target}: staged full write")
    writer = SnapshotWriter(uri, JOB, 3, "full", None, num_shards=1, storage_config=storage_config)
    start = time.perf_counter()
    staged = snapper.stage(writer, config.staging_bytes)
    held = time.perf_counter() - start
    staged.finish()  # the writer keeps its records: it commits them
    staged_full = writer.commit()
    total = time.perf_counter() - start
    snapper.mark_committed(3)
    _measure(results, target, "full_staged_held", held, staged_full.total_bytes, staged_full.total_rows)
    _measure(results, target, "full_staged_write", total, staged_full.total_bytes, staged_full.total_rows)
    progress.update()
    return results


def run_snapshot_bench(config: SnapshotBenchConfig) -> int:
    config.validate()
    print(
        f"embps bench snapshot: {config.rows // config.tables * config.tables:,} rows x dim {config.dim} "
        "(+1 optimizer word, freq, last_step) "
        f"in {config.tables} table{'s' if config.tables > 1 else ''}, "
        f"incremental = {config.touched:.1%} of rows, targets {', '.join(config.targets)}"
    )
    results: dict[str, object] = {"config": asdict(config), "machine": machine_facts()}
    progress = tqdm(total=6 * len(config.targets), desc="snapshot bench", unit="phase")
    with tempfile.TemporaryDirectory(prefix="embps-snapshot-bench-") as tmp:
        for target in config.targets:
            if target == "local":
                results.update(_run_target(target, str(Path(tmp) / "local"), None, config, progress))
                continue
            from bench.s3_server import S3Server

            progress.set_postfix_str("starting SeaweedFS")
            with S3Server.start(Path(tmp) / "seaweedfs") as server:
                server.create_bucket("bench")
                results.update(_run_target(target, "s3://bench/snaps", server.storage_config(), config, progress))
    progress.close()
    print(f"{'target.phase':<28} {'seconds':>8} {'MB':>9} {'MB/s':>8} {'rows':>12} {'rows/s':>12}")
    for name, r in results.items():
        if name in ("config", "machine"):
            continue
        print(
            f"{name:<28} {r['seconds']:>8.2f} {r['bytes'] / 1e6:>9.1f} {r['mb_per_s']:>8.1f} "
            f"{r['rows']:>12,} {r['rows_per_s']:>12,.0f}"
        )
    if config.out:
        Path(config.out).write_text(json.dumps(results, indent=1))
    return 0
