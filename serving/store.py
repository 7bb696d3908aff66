"""The rows a serving replica holds: per (table, shard), a C++ hash map key -> row slot plus value
blocks, readable while they are written.

Where the serving gate is built (`_embps_gate`), the rows live in its native store
(csrc/serving_store.h: ShardStore per shard, ServingTable per table), which the gate's lookup
threads read without the GIL or any lock (a per-row seqlock; see that header), and a resync
publishes a whole shard's store at once (`TableReplica.replace_shard`). Without it, the rows live
as below and only Python reads them.

    TableReplica "user"
      shards[0] = ShardRows ──HashMap──> slot ──RowStore──> words (slot, width)     version, incarnation
      shards[1] = ShardRows ...

A row is `width` 4-byte words: float32 values (width = dim), float16 values packed two per
word (width = ceil(dim / 2)) or row-wise int8 (width = 2 + ceil(dim / 4): scale, bias, codes; the
PS table's int8 format, csrc/row_codec.h, rounded stochastically from (key, SERVING_STREAM)),
kept in the PS table's block store (ps/table/row_store.py, on the CPU: numpy blocks and the C++
gather/scatter, no torch), which copies words and never looks at them.

Never half-written: the map and the blocks of one ShardRows change only under its lock, and a
lookup does its find and its gather in one hold of the same lock (both C++ calls release the GIL
but not the lock). A writer holds the lock for at most MAX_ROWS_PER_HOLD rows at a time, so a
lookup waits for at most one such slice, never for a whole batch. A resync builds a new
ShardRows off to the side and swaps it in with one assignment, so a lookup sees either the old
shard's rows or the new ones, never a mix of two histories.
"""

from __future__ import annotations

import threading
import time

import numpy as np

from ps import native, wire
from ps.sharding import ShardMap
from ps.table.config import Storage, TableConfig
from ps.table.init import init_values
from ps.table.row_store import RowStore
from serving.config import DefaultRow, StorageDType

try:
    import _embps_gate
except ImportError:  # built without grpc++: rows in the Python store below
    _embps_gate = None

BLOCK_SHIFT = 14  # 16k rows per block (the PS table's are 64k): growth allocates a block, never copies
MIN_BLOCK_SHIFT = 6  # a store made for a few rows (expected_rows) has blocks of at least 64 rows
MAX_ROWS_PER_HOLD = 8192  # rows written per lock hold (~0.2 ms at dim 64)
# csrc/row_codec.h's Storage codes of the gate's ServingTable
_NATIVE_STORAGE = {StorageDType.FLOAT32: 0, StorageDType.FLOAT16: 1, StorageDType.INT8: 2}
SERVING_STREAM = 2**33  # rounding stream of int8 rows a replica encodes (the PS uses steps < 2^33)


def _hand_over() -> None:
    """Lets a lookup that waits for the lock take it between two slices of a write. Without it
    the writer, which holds the GIL when it lets go of the lock, takes the lock again before the
    woken reader can run, and a lookup waits for the whole write instead of one slice."""
    time.sleep(0)  # releases the GIL: the waiting reader runs and takes the lock first


def _block_shift(expected_rows: int) -> int:
    """The Python store's blocks for expected_rows, as the native ShardStore picks its own."""
    if expected_rows <= 0:
        return BLOCK_SHIFT
    return min(BLOCK_SHIFT, max(MIN_BLOCK_SHIFT, (expected_rows - 1).bit_length()))


class ShardRows:
    """The rows of one table shard. Thread-safe: one writer and any number of readers.

    version: the PS version of the newest complete range applied; incarnation: the PS process the
    rows came from (0: an export, or nothing yet). Both are set by the follower.
    """

    def __init__(self, dim: int, dtype: StorageDType = StorageDType.FLOAT32, version: int = 0,
                 incarnation: int = 0, expected_rows: int = 0) -> None:
        """expected_rows: the rows the store is made for, which it is sized to (blocks of the next
        power of two, at least 2^MIN_BLOCK_SHIFT rows; it still grows past them); 0: a store that
        grows without bound, in blocks of 2^BLOCK_SHIFT rows (csrc/serving_store.h)."""
        if dim < 1:
            raise ValueError(f"dim: must be >= 1, got {dim}")
        self.dim = dim
        self.dtype = StorageDType(dtype)
        self.width = dim if self.dtype == StorageDType.FLOAT32 else (dim + 1) // 2
        if self.dtype == StorageDType.INT8:
            self.width = native.value_words(native.Storage.INT8, dim)
        self.native = _embps_gate.ShardStore(self.width, expected_rows) if _embps_gate is not None else None
        if self.native is None:
            self._map = native.HashMap()
            self._store = RowStore(self.width, "cpu", _block_shift(expected_rows))
            self._lock = threading.Lock()
            self._version = self._incarnation = 0
        self.version = version
        self.incarnation = incarnation

    @property
    def version(self) -> int:
        return self.native.version if self.native is not None else self._version

    @version.setter
    def version(self, value: int) -> None:
        if self.native is not None:
            self.native.version = value
        else:
            self._version = value

    @property
    def incarnation(self) -> int:
        return self.native.incarnation if self.native is not None else self._incarnation

    @incarnation.setter
    def incarnation(self, value: int) -> None:
        if self.native is not None:
            self.native.incarnation = value
        else:
            self._incarnation = value

    @property
    def size(self) -> int:
        return self.native.size if self.native is not None else self._map.size

    @property
    def memory_bytes(self) -> int:
        if self.native is not None:
            return self.native.memory_bytes
        return self._map.memory_bytes + self._store.memory_bytes

    @property
    def block_bytes(self) -> int:
        """Bytes of the row blocks (the map's not counted)."""
        return self.native.block_bytes if self.native is not None else self._store.memory_bytes

    def encode(self, values: np.ndarray, keys: np.ndarray | None = None) -> np.ndarray:
        """values (n, dim) float32 -> words (n, width) float32 in this store's layout; int8 rows
        need their keys (n,) int64 (the rounding draws are a function of the key)."""
        values = np.asarray(values)
        if values.ndim != 2 or values.shape[1] != self.dim:
            raise ValueError(f"values: expected shape (n, {self.dim}), got {values.shape}")
        if self.dtype == StorageDType.INT8:
            if keys is None or keys.shape[0] != values.shape[0]:
                raise ValueError("keys: int8 rows are encoded with their keys, one per value row")
            return native.encode_words(Storage.INT8, 0, keys, SERVING_STREAM, values.astype(np.float32, copy=False))
        if self.dtype == StorageDType.FLOAT32:
            return np.ascontiguousarray(values, dtype=np.float32)
        half = np.zeros((values.shape[0], 2 * self.width), dtype=np.float16)
        half[:, : self.dim] = wire.to_float16(values)
        return half.view(np.float32)

    def decode(self, words: np.ndarray, dtype: np.dtype = np.float32) -> np.ndarray:
        """words (n, width) -> values (n, dim) in dtype (float32 or float16)."""
        if self.dtype == StorageDType.FLOAT32:
            return words if dtype == np.float32 else wire.to_float16(words)
        if self.dtype == StorageDType.INT8:
            values = native.decode_words(Storage.INT8, words, self.dim)
            return values if dtype == np.float32 else wire.to_float16(values)
        half = words.view(np.float16)[:, : self.dim]
        return np.ascontiguousarray(half) if dtype == np.float16 else half.astype(dtype)

    def upsert(self, keys: np.ndarray, values: np.ndarray) -> None:
        """Inserts or overwrites the rows of keys (n,) int64 unique with values (n, dim) float32."""
        keys = native.as_keys(keys)
        if np.asarray(values).shape[0] != keys.shape[0]:
            raise ValueError(f"values: {np.asarray(values).shape[0]} rows for {keys.shape[0]} keys")
        words = self.encode(values, keys)
        if words.shape[0] != keys.shape[0]:
            raise ValueError(f"values: {words.shape[0]} rows for {keys.shape[0]} keys")
        self._write_words(keys, words)

    def _write_words(self, keys: np.ndarray, words: np.ndarray) -> None:
        """Inserts or overwrites the rows of keys (n,) int64 unique with words (n, width)."""
        if words.shape != (keys.shape[0], self.width):
            raise ValueError(f"words: expected shape ({keys.shape[0]}, {self.width}), got {words.shape}")
        if self.native is not None:  # readers never wait for the writer: no slices needed
            self.native.upsert(keys, words)
            return
        for start in range(0, keys.shape[0], MAX_ROWS_PER_HOLD):
            part = slice(start, start + MAX_ROWS_PER_HOLD)
            with self._lock:
                slots, _ = self._map.find_or_insert(keys[part])
                self._store.ensure_rows(self._map.num_rows)
                self._store.scatter(slots, 0, words[part])
            _hand_over()

    def upsert_rows(self, keys: np.ndarray, rows: np.ndarray, storage: str) -> None:
        """Like upsert, with rows as a PS table of `storage` keeps them (ps/wire.py
        decode_stored_rows): float32 values (n, dim), float16 halves (n, dim) or int8 words (n,
        width). Rows already in this store's layout are kept bit for bit; others are decoded to
        float32 and encoded as upsert does."""
        if storage == self.dtype == StorageDType.INT8:
            self._write_words(native.as_keys(keys), np.ascontiguousarray(rows, dtype=np.float32))
        elif storage == self.dtype == StorageDType.FLOAT16:
            half = np.zeros((rows.shape[0], 2 * self.width), dtype=np.float16)
            half[:, : self.dim] = rows
            self._write_words(native.as_keys(keys), half.view(np.float32))
        elif storage == "int8":
            self.upsert(keys, native.decode_words(Storage.INT8, rows, self.dim))
        else:
            self.upsert(keys, np.asarray(rows, dtype=np.float32))

    def erase(self, keys: np.ndarray) -> None:
        """Drops the rows of keys (d,) int64 (absent keys are ignored)."""
        keys = native.as_keys(keys)
        if self.native is not None:
            self.native.erase(keys)
            return
        for start in range(0, keys.shape[0], MAX_ROWS_PER_HOLD):
            with self._lock:
                self._map.erase(keys[start : start + MAX_ROWS_PER_HOLD])
            _hand_over()

    def gather(self, keys: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Writes the words of keys (n,) int64 into out (n, width) float32 (rows of absent keys are
        left as they were); returns found (n,) bool."""
        keys = native.as_keys(keys)
        if self.native is not None:
            found = np.zeros(keys.shape[0], dtype=np.uint8)
            self.native.gather(keys, out, found)
            return found.view(np.bool_)
        slots = np.empty(keys.shape[0], dtype=np.int64)
        with self._lock:
            if self._map.size:
                slots = self._map.find(keys)
                self._store.gather(slots, 0, self.width, out)
            else:
                slots.fill(-1)
        return slots >= 0

    def export(self) -> tuple[np.ndarray, np.ndarray]:
        """(keys (u,) int64 sorted, values (u, dim) float32): every row, for tests and checks."""
        if self.native is not None:
            key_bytes, word_bytes = self.native.export()
            keys = np.frombuffer(key_bytes, dtype=np.int64)
            order = np.argsort(keys)
            words = np.frombuffer(word_bytes, dtype=np.float32).reshape(keys.shape[0], self.width)
            return keys[order], self.decode(np.ascontiguousarray(words[order]))
        with self._lock:
            keys, slots = self._map.export()
            order = np.argsort(keys)
            keys, slots = keys[order], slots[order]
            words = self._store.gather(slots, 0, self.width, np.empty((keys.shape[0], self.width), dtype=np.float32))
        return keys, self.decode(words)


class TableReplica:
    """All shards of one table in this replica; `shards[s]` is replaced whole by a resync."""

    def __init__(self, config: TableConfig, shard_map: ShardMap, default: DefaultRow = DefaultRow.ZEROS,
                 dtype: StorageDType = StorageDType.FLOAT32) -> None:
        self.config = config
        self.name = config.name
        self.dim = config.dim
        self.dtype = StorageDType(dtype)
        self.default = DefaultRow(default)
        self.shard_map = shard_map
        self.shards = [ShardRows(self.dim, self.dtype) for _ in range(shard_map.num_shards)]
        self.native = None  # the gate's view of this table (csrc/serving_store.h)
        if _embps_gate is not None:
            self.native = _embps_gate.ServingTable(
                self.name, self.dim, _NATIVE_STORAGE[self.dtype], self.default == DefaultRow.INIT,
                config.seed & 0xFFFFFFFFFFFFFFFF, int(native.native_enum(native.Initializer, config.initializer).value),
                float(config.init_scale), shard_map.buckets, shard_map.num_shards,
            )
            for s, rows in enumerate(self.shards):
                self.native.set_shard(s, rows.native)

    def replace_shard(self, shard: int, rows: ShardRows) -> None:
        """Serves `rows` as shard `shard` from now on, whole (a resync's or an export's copy)."""
        self.shards[shard] = rows
        if self.native is not None:
            self.native.set_shard(shard, rows.native)

    def set_link(self, shard: int, connected: bool, last_message: float) -> None:
        """The follower's stream state of `shard` (time.monotonic()), for the gate's `stale` flags."""
        if self.native is not None:
            self.native.set_link(shard, connected, last_message)

    def lookup(self, keys: np.ndarray, dtype: np.dtype = np.float32,
               version: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """keys (n,) int64 -> (values (n, dim) in dtype, found (n,) bool); row i for keys[i].

        Keys without a row read as the table's default (zeros or the deterministic init).
        version: the model version to read at (serving/cut.py's ModelCut.read gives it and checks
        the read afterwards); None: each shard's current rows.
        """
        values, found, _ = self.lookup_served(keys, dtype, version)
        return values, found

    def lookup_served(self, keys: np.ndarray, dtype: np.dtype = np.float32,
                      version: int | None = None) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int]]]:
        """lookup, and each shard's (PS version, incarnation) of the rows it read: at a model
        version, the cut's (a shard's pending store while the cut merges); else that of the store
        read, taken before its rows (they hold at least that version), even if a resync swaps the
        store meanwhile."""
        keys = native.as_keys(keys)
        shards = list(self.shards)  # one consistent set, even if a resync swaps one meanwhile
        width = shards[0].width
        words = np.zeros((keys.shape[0], width), dtype=np.float32)
        if version is not None and self.native is not None:
            found = np.zeros(keys.shape[0], dtype=np.uint8)
            served = [tuple(pair) for pair in self.native.gather_at(keys, words, found, version)]
            found = found.view(np.bool_)
        else:
            served = [(rows.version, rows.incarnation) for rows in shards]
            if len(shards) == 1:
                found = shards[0].gather(keys, words)
            else:
                found = np.zeros(keys.shape[0], dtype=np.bool_)
                for s, positions in enumerate(self.shard_map.split(keys)):
                    if positions.shape[0]:
                        part = np.zeros((positions.shape[0], width), dtype=np.float32)
                        found[positions] = shards[s].gather(keys[positions], part)
                        words[positions] = part
        values = shards[0].decode(words, dtype)
        if self.default == DefaultRow.INIT and not found.all():
            missing = ~found
            init = self.init_values(keys[missing])
            # In a float16 reply saturated as the rows are (and as the gate answers): numpy's cast
            # made an init beyond 65504 inf.
            values[missing] = init if values.dtype == np.float32 else wire.to_float16(init)
        return values, found, served

    def init_values(self, keys: np.ndarray) -> np.ndarray:
        """The PS's initial rows of keys (n,) int64: (n, dim) float32, pure in (seed, key)."""
        return init_values(self.config, keys)

    @property
    def size(self) -> int:
        return sum(s.size for s in self.shards)

    @property
    def memory_bytes(self) -> int:
        return sum(s.memory_bytes for s in self.shards)
