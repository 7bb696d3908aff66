"""What the file readers share: config, units and shares, shuffle buffer, batching, state.

Each rank reads only its share of the data (worker/shares.py): the units (Parquet row groups,
TSV byte ranges, whole gzip files) r, r + W, ... of each epoch's unit list. So W ranks together
parse every row once, whatever W is. The rank's row stream is its share of epoch 0, then of
epoch 1, ... up to `epochs`; rows pass through a bounded shuffle buffer and come out as local
batches of B / W rows:

    global batch b = concat over ranks r = 0..W-1 of rank r's local batch b

which is a pure function of (files, seed, W): tests/worker/reference_features.py rebuilds it by
reading every rank's share. Ranks' shares differ in rows, so a job ends when the first rank's
stream ends (the trainer agrees on that with one all-reduce per step, worker/worker_main.py);
the rows left in other ranks are not trained on.

Shuffle buffer (`shuffle_buffer` = K rows): a pool of K + B/W slots. Rows fill free slots in
slot order; when none is free, B/W slots drawn with rng(seed, rank, W, batch number) become the
next local batch and are freed. When the stream ends the pool is drained the same way. With
K = 0 the batch is the pool in slot order: rows come in file order. Batches do not depend on
how the readers chunk the files, so resuming in the middle of a unit gives the same batches.

Position (`state()`), after the last yielded batch: epoch, unit (index in the rank's share of
that epoch), offset (units of that unit consumed: lines from the range's first line for TSV,
rows of the row group for Parquet), the batch count, the rows in the shuffle buffer, and the
files it indexes (their count and a digest of their names and sizes, worker/data_paths.py::
files_digest). A position is an index into the units of that file list: restoring it over
another list (a glob that matches a file added since) is refused, naming the paths field.
"""

from __future__ import annotations

import base64
import dataclasses
import logging
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ps.arrays import sorted_unique
from ps.snapshot.storage import StorageConfig
from worker.batch import Batch, check_rank
from worker.data_options import ArrowMemoryPool, BadRowPolicy
from worker.data_paths import expand_paths, files_digest
from worker.features import hash_columns, transform_counts
from worker.prefetch import prefetched
from worker.shares import Unit, epoch_units, rank_share

logger = logging.getLogger(__name__)

_INT_PATTERN = r"^[+-]?[0-9]+$"
_FLOAT_PATTERN = r"^[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?$"


@dataclass(frozen=True)
class ReaderConfig:
    """Options shared by the TSV and Parquet readers.

    Columns, in this order: `label`, `I1..I{num_dense}`, `C1..C{num_sparse}` (Criteo's layout).
    """

    global_batch_size: int = 2048  # rows per global batch; each rank makes B/W of them from its share
    num_dense: int = 13  # integer (count) features
    num_sparse: int = 26  # categorical features, one value each
    bad_rows: BadRowPolicy = BadRowPolicy.SKIP
    drop_last: bool = False  # drop a short last local batch instead of yielding it
    epochs: int = 1  # passes over the data
    seed: int = 0  # file order per epoch, shuffle buffer draws
    shuffle_files: bool = False  # a new file order every epoch (from seed and epoch)
    shuffle_buffer: int = 0  # rows held back and drawn at random (0: file order)
    range_bytes: int = 64 << 20  # TSV: size of the byte ranges ranks read (at most total / W)
    prefetch_batches: int = 4  # batches made ahead in a background thread, Parquet decoded in another (0: no thread)
    read_block_bytes: int = 1 << 20  # TSV: bytes parsed per block
    read_batch_rows: int = 65536  # Parquet: rows decoded per record batch
    bad_row_log_interval_s: float = 10.0  # at most one "skipped bad rows" log line per interval
    # Per process, set when a reader is built (see configure_arrow):
    arrow_threads: int = 0  # Arrow's CPU threads (Parquet decode); 0: this process's cores / LOCAL_WORLD_SIZE
    arrow_memory_pool: ArrowMemoryPool = ArrowMemoryPool.AUTO

    def __post_init__(self) -> None:
        for name, kind in (("bad_rows", BadRowPolicy), ("arrow_memory_pool", ArrowMemoryPool)):
            try:
                object.__setattr__(self, name, kind(getattr(self, name)))
            except ValueError:
                choices = ", ".join(repr(p.value) for p in kind)
                raise ValueError(f"{name}: must be one of {choices}, got {getattr(self, name)!r}") from None
        for name in ("global_batch_size", "num_sparse", "read_block_bytes", "read_batch_rows", "epochs", "range_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("num_dense", "shuffle_buffer", "prefetch_batches", "arrow_threads"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if self.num_dense < 0:
            raise ValueError(f"num_dense: must be >= 0, got {self.num_dense}")
        if self.bad_row_log_interval_s < 0:
            raise ValueError(f"bad_row_log_interval_s: must be >= 0, got {self.bad_row_log_interval_s}")

    @property
    def column_names(self) -> list[str]:
        """label, I1..I{num_dense}, C1..C{num_sparse}."""
        return ["label"] + [f"I{i + 1}" for i in range(self.num_dense)] + [f"C{i + 1}" for i in range(self.num_sparse)]


def configure_arrow(config: ReaderConfig, auto_pool: ArrowMemoryPool = ArrowMemoryPool.DEFAULT) -> int:
    """Sets this process's Arrow CPU thread count and memory pool from `config`; returns the threads.

    Both are per process, so the ranks of one machine (LOCAL_WORLD_SIZE of them, as torchrun
    sets it) would otherwise each size Arrow's thread pool for the whole machine: W ranks, each
    with a parse thread, a decode thread and a pool of one thread per core, oversubscribe the cores.

    The pool (`auto_pool` is the reader's choice for "auto"): pyarrow's mimalloc marks its 1 GiB
    arenas for transparent huge pages, so a new process zeroes 2 MiB pages as its memory grows.
    The Parquet reader holds whole decoded record batches and paid 0.1-0.4 CPU-s per process for
    it on a 2-core VM, most of the extra CPU per row of 4 ranks over one. It uses jemalloc, which
    does not ask for huge pages: on a quiet machine, three interleaved pairs, 4 ranks read
    0.90-0.93x the rows/s of one with it against 0.69-0.83x with malloc (1.17-1.22x the CPU per
    row of one rank against 1.17-1.41x), one rank as fast either way. The TSV reader's memory is
    a few 1 MiB blocks, and there malloc cost about 20% more CPU per row than mimalloc (README,
    notes on `bench data`). A pyarrow built without the chosen allocator keeps its default.
    """
    threads = config.arrow_threads
    if not threads:
        local = os.environ.get("LOCAL_WORLD_SIZE", "1")
        try:
            local_ranks = int(local)
        except ValueError:
            raise ValueError(f"LOCAL_WORLD_SIZE: must be an integer, got {local!r}") from None
        threads = max(1, len(os.sched_getaffinity(0)) // max(1, local_ranks))
    pa.set_cpu_count(threads)
    pool = auto_pool if config.arrow_memory_pool is ArrowMemoryPool.AUTO else config.arrow_memory_pool
    if pool not in (ArrowMemoryPool.DEFAULT, ArrowMemoryPool.AUTO):
        make = {
            ArrowMemoryPool.SYSTEM: pa.system_memory_pool,
            ArrowMemoryPool.JEMALLOC: pa.jemalloc_memory_pool,
            ArrowMemoryPool.MIMALLOC: pa.mimalloc_memory_pool,
        }[pool]
        try:
            pa.set_memory_pool(make())
        except NotImplementedError:
            if config.arrow_memory_pool is not ArrowMemoryPool.AUTO:  # "auto" keeps the default then
                raise ValueError(f"arrow_memory_pool: this pyarrow has no {pool.value} allocator") from None
    return threads


@dataclass
class _Rows:
    """Parsed good rows of one unit, in file order; next_offset[i] is the unit offset after row i."""

    next_offset: np.ndarray  # (n,) int64
    dense: np.ndarray  # (n, num_dense) float32
    sparse: np.ndarray  # (n, num_sparse) int64
    labels: np.ndarray  # (n,) float32

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass
class BadRowLog:
    """Counts bad rows and logs them at most once per `interval_s` (the first one at once)."""

    interval_s: float
    count: int = 0
    _logged_count: int = 0
    _last_log: float = field(default=-float("inf"))

    def add(self, where: str, reason: str) -> None:
        self.count += 1
        now = time.monotonic()
        if now - self._last_log >= self.interval_s:
            skipped = self.count - self._logged_count
            logger.warning("skipped %d bad row(s), %d in all; latest %s: %s", skipped, self.count, where, reason)
            self._logged_count = self.count
            self._last_log = now

    def log_total(self) -> None:
        """Logs the bad rows not logged yet with the count in all (the lines above come at most one
        per interval: a reader that skipped half its rows in a burst had said "1 in all")."""
        if self.count > self._logged_count:
            logger.warning("skipped %d bad row(s) in all (%d since the last line)", self.count,
                           self.count - self._logged_count)
            self._logged_count = self.count


@dataclass(frozen=True)
class _PoolChanges:
    """What the shuffle buffer went through up to one batch: `rows` (_Pool.snapshot's form) put into
    their slots, then the slots `drawn` for the batch. Replayed on the consumer's copy of the
    buffer (FileReader.__iter__), so that a position needs no copy of the whole buffer: one per
    batch cost 68 ms a batch and a 270 MB copy at shuffle_buffer = 1M (27x the batch's own work)."""

    rows: dict[str, np.ndarray] | None
    drawn: np.ndarray


class _Pool:
    """The shuffle buffer: `capacity` slots of rows, `occupied` marks the filled ones. With
    `record`, what add() and draw() do is kept for take_changes()."""

    def __init__(self, capacity: int, num_dense: int, num_sparse: int, record: bool = False) -> None:
        self.dense = np.zeros((capacity, num_dense), dtype=np.float32)
        self.sparse = np.zeros((capacity, num_sparse), dtype=np.int64)
        self.labels = np.zeros(capacity, dtype=np.float32)
        self.occupied = np.zeros(capacity, dtype=bool)
        self.num_free = capacity
        self._record = record
        self._added: list[np.ndarray] = []  # slots filled since take_changes()
        self._drawn = np.empty(0, dtype=np.int64)

    def add(self, rows: _Rows, start: int, stop: int) -> None:
        """Rows [start, stop) of `rows` into the lowest free slots (stop - start <= num_free)."""
        slots = np.flatnonzero(~self.occupied)[: stop - start]
        self.dense[slots] = rows.dense[start:stop]
        self.sparse[slots] = rows.sparse[start:stop]
        self.labels[slots] = rows.labels[start:stop]
        self.occupied[slots] = True
        self.num_free -= stop - start
        if self._record:
            self._added.append(slots)

    def draw(self, count: int, rng: np.random.Generator | None) -> Batch:
        """`count` occupied slots (random with rng, else the lowest) as a batch; they become free."""
        filled = np.flatnonzero(self.occupied)
        picked = filled[:count] if rng is None else rng.choice(filled, size=count, replace=False)
        self.occupied[picked] = False
        self.num_free += picked.shape[0]
        if self._record:
            self._drawn = picked
        return Batch.from_numpy(self.dense[picked], self.sparse[picked], self.labels[picked])

    def take_changes(self) -> _PoolChanges:
        """What add() and draw() did since the last call (needs `record`). The rows added are read
        from the slots they went to: a draw frees slots, only a later add writes over them."""
        slots = np.concatenate(self._added) if self._added else np.empty(0, dtype=np.int64)
        rows = self._rows(slots) if slots.shape[0] else None
        changes = _PoolChanges(rows, self._drawn)
        self._added = []
        self._drawn = np.empty(0, dtype=np.int64)
        return changes

    def replay(self, changes: _PoolChanges) -> None:
        """Goes through `changes` (another pool's take_changes()) as that pool did."""
        if changes.rows is not None:
            self.load(changes.rows)
        self.occupied[changes.drawn] = False
        self.num_free += changes.drawn.shape[0]

    def _rows(self, slots: np.ndarray) -> dict[str, np.ndarray]:
        return {"slots": slots, "dense": self.dense[slots], "sparse": self.sparse[slots], "labels": self.labels[slots]}

    def snapshot(self) -> dict[str, np.ndarray] | None:
        """Copies of the occupied slots and their rows (None when empty), for the state."""
        slots = np.flatnonzero(self.occupied)
        return self._rows(slots) if slots.shape[0] else None

    def load(self, saved: dict[str, np.ndarray]) -> None:
        """Puts `saved` (snapshot()'s form) into its slots, free ones."""
        slots = saved["slots"]
        self.dense[slots], self.sparse[slots], self.labels[slots] = saved["dense"], saved["sparse"], saved["labels"]
        self.occupied[slots] = True
        self.num_free -= slots.shape[0]


@dataclass(frozen=True)
class _Position:
    """Where a rank's stream stands after a batch (see the module doc)."""

    epoch: int = 0
    unit: int = 0
    offset: int = 0
    num_batches: int = 0
    buffer: dict[str, np.ndarray] | None = None  # _Pool.snapshot(), where a pass starts (a restore)


class FileReader(ABC):
    """Base of the file readers: shares, shuffle buffer, batching, bad-row policy, state. See module doc.

    paths: files, directories or globs, local or URIs (worker/data_paths.py); storage: S3 settings.
    """

    _auto_memory_pool = ArrowMemoryPool.DEFAULT  # Arrow's allocator for arrow_memory_pool = "auto"

    def __init__(
        self,
        paths: Sequence[str | Path],
        config: ReaderConfig,
        rank: int = 0,
        world_size: int = 1,
        storage: StorageConfig | None = None,
        paths_field: str = "data.paths",
    ) -> None:
        """paths_field: the job file's field the paths came from, which errors reading them name."""
        if isinstance(paths, (str, Path)):
            raise TypeError("paths: expected a sequence of paths, got a single path (wrap it in a list)")
        if not paths:
            raise ValueError("paths: need at least one file")
        if not isinstance(config, ReaderConfig):
            raise TypeError(f"config: expected ReaderConfig, got {type(config).__name__}")
        check_rank(rank, world_size)
        if config.global_batch_size % world_size:
            raise ValueError(
                f"global_batch_size: must be divisible by world_size={world_size} so every rank gets "
                f"the same local batch size, got {config.global_batch_size}"
            )
        self.config = config
        self.arrow_threads = configure_arrow(config, self._auto_memory_pool)
        self.rank = rank
        self.world_size = world_size
        self.local_batch_size = config.global_batch_size // world_size
        self.files = expand_paths([str(p) for p in paths], storage, paths_field)
        self.paths = [f.name for f in self.files]
        self._paths_field = paths_field
        self._files_digest = files_digest(self.files)
        self._units_by_file = self._plan()
        num_units = sum(len(u) for u in self._units_by_file)
        if num_units == 0:  # it said "write smaller row groups or more files" of files with no row
            shown = ", ".join(self.paths[:3]) + (f" and {len(self.paths) - 3} more" if len(self.paths) > 3 else "")
            raise ValueError(f"{paths_field}: no rows to read: {shown} hold no Parquet row group")
        if num_units < world_size:
            raise ValueError(
                f"data.paths: {num_units} unit(s) of work (Parquet row groups, gzip files) for {world_size} "
                "workers; every worker reads its own units, so write smaller row groups or more files"
            )
        self._bad = BadRowLog(config.bad_row_log_interval_s)
        self._position = _Position()
        self._pool: _Pool | None = None  # the shuffle buffer as of _position, once a pass yielded a batch
        self.num_parsed = 0  # lines (TSV) or rows (Parquet) this object has parsed, bad ones included

    @property
    def num_bad_rows(self) -> int:
        """Bad rows this reader object has met (read-ahead included; not part of the state)."""
        return self._bad.count

    def log_bad_rows_total(self) -> None:
        """Logs the bad rows met so far that no line counted yet (at the end of training)."""
        self._bad.log_total()

    @property
    def units_by_file(self) -> list[list[Unit]]:
        """The units of each file, in `paths` order: the same on every rank."""
        return self._units_by_file

    def share(self, epoch: int) -> list[Unit]:
        """This rank's units of epoch `epoch`, in reading order."""
        cfg = self.config
        units = epoch_units(self._units_by_file, epoch, cfg.seed, cfg.shuffle_files)
        return rank_share(units, self.rank, self.world_size)

    def state(self) -> dict:
        """Position after the last yielded batch (JSON-serialisable; see the module doc)."""
        p = self._position
        saved = self._pool.snapshot() if self._pool is not None else p.buffer
        buffer = None
        if saved is not None:
            buffer = {name: base64.b64encode(np.ascontiguousarray(a).tobytes()).decode() for name, a in saved.items()}
        files = {"count": len(self.files), "sha256": self._files_digest}
        return {
            "epoch": p.epoch,
            "unit": p.unit,
            "offset": p.offset,
            "num_batches": p.num_batches,
            "buffer": buffer,
            "files": files,
        }

    def restore(self, state: dict) -> None:
        """Continues from `state` (from `state()` of a reader over the same files, config, rank and W)."""
        if not isinstance(state, dict):
            raise TypeError(f"state: expected a dict from state(), got {type(state).__name__}")
        for name in ("epoch", "unit", "offset", "num_batches"):
            value = state.get(name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"state.{name}: must be an int >= 0, got {value!r}")
        self._check_files(state.get("files"))
        epochs = self.config.epochs
        if state["epoch"] > epochs:
            raise ValueError(f"state.epoch: must be <= epochs={epochs}, got {state['epoch']}")
        if state["epoch"] < epochs and state["unit"] > len(self.share(state["epoch"])):
            raise ValueError(
                f"state.unit: rank {self.rank} has {len(self.share(state['epoch']))} units in epoch "
                f"{state['epoch']}, got {state['unit']} (another file list, W or seed?)"
            )
        self._position = _Position(
            state["epoch"],
            state["unit"],
            state["offset"],
            state["num_batches"],
            self._decode_buffer(state.get("buffer")),
        )
        self._pool = None

    def _check_files(self, saved: object) -> None:
        """ValueError naming the paths field when the position was taken over other files: its
        unit indices (and TSV byte ranges) would point at other rows, read twice or never. Such a
        position cannot be moved onto the new list: the epochs' file orders, the ranks' shares and
        the byte ranges all follow from the list, so the batches that would have come next do not
        exist in it. A position from before positions held their files (None) is taken as it is."""
        field = self._paths_field
        if saved is None:
            logger.warning("reader position without its file list (an older snapshot): not checked against %s", field)
            return
        well_formed = isinstance(saved, dict) and isinstance(saved.get("count"), int)
        if not well_formed or not isinstance(saved.get("sha256"), str):
            raise ValueError(f"state.files: expected {{'count': int, 'sha256': str}} from state(), got {saved!r}")
        if saved["count"] == len(self.files) and saved["sha256"] == self._files_digest:
            return
        raise ValueError(
            f"{field}: the position to resume from was taken over {saved['count']} file(s) (sha256 "
            f"{saved['sha256'][:12]}), {field} now gives {len(self.files)} (sha256 {self._files_digest[:12]}): "
            "a file was added, removed, renamed or changed size since, and the position, an index into the old "
            f"list, would skip or repeat rows. To resume, make {field} give the files it gave then; to train on "
            "the new list, start a new job"
        )

    def _decode_buffer(self, saved: dict | None) -> dict[str, np.ndarray] | None:
        if saved is None:
            return None
        cfg = self.config
        try:
            slots = np.frombuffer(base64.b64decode(saved["slots"]), dtype=np.int64)
            n = slots.shape[0]
            buffer = {
                "slots": slots,
                "dense": np.frombuffer(base64.b64decode(saved["dense"]), dtype=np.float32).reshape(n, cfg.num_dense),
                "sparse": np.frombuffer(base64.b64decode(saved["sparse"]), dtype=np.int64).reshape(n, cfg.num_sparse),
                "labels": np.frombuffer(base64.b64decode(saved["labels"]), dtype=np.float32).reshape(n),
            }
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"state.buffer: not a saved shuffle buffer of this config ({exc})") from None
        capacity = cfg.shuffle_buffer + self.local_batch_size
        if n and (slots.min() < 0 or slots.max() >= capacity or sorted_unique(slots).shape[0] != n):
            raise ValueError(f"state.buffer: slots must be distinct and < {capacity} (shuffle_buffer + B/W)")
        return buffer

    def __iter__(self) -> Iterator[Batch]:
        """Yields this rank's local batches, from the current position to the end of its stream.

        Each call starts a new pass from the position (`state()`), so use one iterator at a time.
        With `prefetch_batches` > 0 the batches are made ahead in a background thread.
        """
        start = self._position
        if self._pool is not None:  # a pass after another: it starts where that one's consumer is
            start = dataclasses.replace(start, buffer=self._pool.snapshot())
        stream = self._batches(start)
        if self.config.prefetch_batches:
            stream = prefetched(stream, self.config.prefetch_batches)
        pool = self._new_pool(start)  # the buffer as of the batches yielded (the producer's runs ahead)
        try:
            for batch, position, changes in stream:
                pool.replay(changes)
                self._position, self._pool = position, pool
                yield batch
        finally:
            stream.close()

    def _new_pool(self, start: _Position, record: bool = False) -> _Pool:
        size = self.local_batch_size
        pool = _Pool(self.config.shuffle_buffer + size, self.config.num_dense, self.config.num_sparse, record)
        if start.buffer is not None:
            pool.load(start.buffer)
        return pool

    def _batches(self, start: _Position) -> Iterator[tuple[Batch, _Position, _PoolChanges]]:
        """(local batch, position after it, what the shuffle buffer went through for it), from
        `start` on; see the module doc."""
        cfg = self.config
        size = self.local_batch_size
        pool = self._new_pool(start, record=True)
        num_batches = start.num_batches

        def draw(count: int) -> Batch:
            rng = None
            if cfg.shuffle_buffer:
                rng = np.random.default_rng([cfg.seed, 0xB0F, self.rank, self.world_size, num_batches])
            return pool.draw(count, rng)

        stream = self._rows_from(start)
        try:
            for epoch, index, rows in stream:
                done = 0
                while done < len(rows):
                    take = min(pool.num_free, len(rows) - done)
                    pool.add(rows, done, done + take)
                    done += take
                    if pool.num_free == 0:
                        batch = draw(size)
                        num_batches += 1
                        offset = int(rows.next_offset[done - 1])
                        yield batch, _Position(epoch, index, offset, num_batches), pool.take_changes()
        finally:
            stream.close()  # stops a read-ahead thread when the consumer stops early
        while int(pool.occupied.sum()) >= size:
            batch = draw(size)
            num_batches += 1
            yield batch, _Position(cfg.epochs, 0, 0, num_batches), pool.take_changes()
        if pool.occupied.any() and not cfg.drop_last:
            batch = draw(int(pool.occupied.sum()))
            num_batches += 1
            yield batch, _Position(cfg.epochs, 0, 0, num_batches), pool.take_changes()

    def _tasks(self, start: _Position) -> Iterator[tuple[int, int, Unit, int]]:
        """(epoch, index in the epoch's share, unit, offset to start at) of every unit from `start` on."""
        for epoch in range(start.epoch, self.config.epochs):
            share = self.share(epoch)
            first_unit = start.unit if epoch == start.epoch else 0
            for index in range(first_unit, len(share)):
                skip = start.offset if (epoch, index) == (start.epoch, start.unit) else 0
                yield epoch, index, share[index], skip

    def _rows_from(self, start: _Position) -> Iterator[tuple[int, int, _Rows]]:
        """(epoch, unit index, parsed rows) from `start` on, unit after unit (a reader may read ahead)."""
        for epoch, index, unit, skip in self._tasks(start):
            for rows in self._read_unit(unit, skip):
                yield epoch, index, rows

    @abstractmethod
    def _plan(self) -> list[list[Unit]]:
        """The units of each file of `self.files`, in file order; checks each file can be read."""

    @abstractmethod
    def _read_unit(self, unit: Unit, start: int) -> Iterator[_Rows]:
        """Good rows of `unit` from unit offset `start` on, in chunks, via `_parse`; counts num_parsed."""

    def _bad_row(self, where: str, reason: str) -> None:
        """Applies the bad-row policy to one row at `where` ("path:line")."""
        if self.config.bad_rows is BadRowPolicy.FAIL:
            raise ValueError(f'{where}: bad row: {reason} (set bad_rows = "skip" to skip such rows)')
        self._bad.add(where, reason)

    def _parse(self, table: pa.RecordBatch | pa.Table, next_offset: np.ndarray, where: Callable[[int], str]) -> _Rows:
        """Validates and converts a chunk of raw rows; bad rows go through the policy and are dropped.

        table: columns `config.column_names` as strings (TSV) or numbers/strings (Parquet);
        next_offset (n,) int64; where(i) names row i ("path:line") for messages.
        """
        cfg = self.config
        n = table.num_rows
        bad = np.zeros(n, dtype=bool)
        reasons: dict[int, str] = {}
        label, label_bad = _to_float(table.column("label"), _FLOAT_PATTERN, empty_ok=False)
        _note(bad, reasons, label_bad, "label: not a number")
        _note(bad, reasons, (label < 0) | (label > 1), "label: must be in [0, 1] (a click probability)")
        dense = np.empty((n, cfg.num_dense), dtype=np.float32)
        for i in range(cfg.num_dense):
            name = f"I{i + 1}"
            column = table.column(name)
            counts = _integers(column)
            if counts is None:
                values, col_bad = _to_float(column, _INT_PATTERN, empty_ok=True)
                _note(bad, reasons, col_bad, f"{name}: not an integer within float64's range")
                dense[:, i] = transform_counts(values)
            else:
                values, null = counts
                dense[:, i] = transform_counts(values)
                if null is not None:
                    dense[null, i] = 0.0  # log1p(0): an empty count
        for row in np.flatnonzero(bad):
            self._bad_row(where(int(row)), reasons[int(row)])
        sparse = hash_columns([table.column(f"C{f + 1}") for f in range(cfg.num_sparse)], range(cfg.num_sparse))
        if bad.any():
            good = np.flatnonzero(~bad)
            return _Rows(next_offset[good], dense[good], sparse[good], label[good].astype(np.float32))
        return _Rows(next_offset, dense, sparse, label.astype(np.float32))


def _note(bad: np.ndarray, reasons: dict[int, str], col_bad: np.ndarray, reason: str) -> None:
    for row in np.flatnonzero(col_bad & ~bad):
        reasons[int(row)] = reason
    bad |= col_bad


def _integers(column: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray | None] | None:
    """An integer column's (values (n,), null (n,) bool or None), read in place; None for other types.

    Values under a null are whatever the buffer holds: the caller overrides them."""
    if isinstance(column, pa.ChunkedArray):
        if column.num_chunks != 1:
            return None
        column = column.chunk(0)
    if not pa.types.is_integer(column.type):
        return None
    n = len(column)
    bitmap, data = column.buffers()
    dtype = np.dtype(column.type.to_pandas_dtype())
    values = np.frombuffer(data, dtype=dtype, count=n, offset=column.offset * dtype.itemsize)
    if not column.null_count:
        return values, None
    bits = np.unpackbits(np.frombuffer(bitmap, dtype=np.uint8), count=column.offset + n, bitorder="little")
    return values, bits[column.offset :] == 0


def _to_float(column: pa.Array | pa.ChunkedArray, pattern: str, empty_ok: bool) -> tuple[np.ndarray, np.ndarray]:
    """A number column -> (values (n,) float64 with empty/null as 0, bad (n,) bool)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if pa.types.is_dictionary(column.type):  # Parquet writers dictionary-encode repetitive columns
        column = column.dictionary_decode()
    kind = column.type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        column = pc.fill_null(column, "")
        empty = np.asarray(pc.equal(column, "").to_numpy(zero_copy_only=False), dtype=bool)
        ok = np.asarray(pc.match_substring_regex(column, pattern).to_numpy(zero_copy_only=False), dtype=bool)
        bad = ~ok & ~(empty & empty_ok)
        cleaned = pc.if_else(pa.array(ok), column, pa.scalar("0", column.type))
        values = np.asarray(pc.cast(cleaned, pa.float64()).to_numpy(zero_copy_only=False), dtype=np.float64)
        bad |= ~np.isfinite(values)  # digits past float64's range read as inf
        return np.where(bad, 0.0, values), bad
    if pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind) or pa.types.is_null(kind):
        null = np.asarray(column.is_null().to_numpy(zero_copy_only=False), dtype=bool)
        values = pc.fill_null(pc.cast(column, pa.float64()), 0.0).to_numpy(zero_copy_only=False)
        values = np.asarray(values, dtype=np.float64)
        bad = ~np.isfinite(values) | (null & (not empty_ok))
        return np.where(bad, 0.0, values), bad
    raise TypeError(f"number column of type {kind}: expected integer, floating point or string")


def line_reason(text: str, expected: int, actual: int) -> str:
    """The message for a row with the wrong number of fields."""
    shown = text if len(text) <= 80 else text[:77] + "..."
    return f"expected {expected} tab-separated fields, got {actual}: {shown!r}"
