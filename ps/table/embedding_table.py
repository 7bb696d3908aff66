"""EmbeddingTable: hash-keyed rows with a sparse optimizer, admission and eviction.

    keys (n,) int64 ──HashMap──> rows (n,) int64 ──RowStore──> words (n, width) float32
    width = value words + optimizer state + 2 metadata words (freq, last_step as uint32)
    value words = dim (float32 storage), ceil(dim / 2) (float16), 2 + ceil(dim / 4) (int8)

float16 and int8 rows (config.storage) are decoded to float32 for lookups and updates and encoded
back with deterministic stochastic rounding (csrc/row_codec.h); the optimizer state stays float32.

A key's row appears on its first admitted push with the value init(seed, key); until then, and
for keys never pushed, `lookup` returns init(seed, key) computed on the fly, so lookups never
allocate. Not thread-safe: one caller at a time (the PS server serialises calls).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import sys
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from ps import native
from ps.arrays import set_flags, sorted_unique
from ps.errors import CapacityError
from ps.table import fbgemm_kernels, optimizers
from ps.table.config import AdmissionKind, EvictionPolicy, Kernels, OptimizerKind, Storage, TableConfig
from ps.table.init import init_values
from ps.table.row_store import RowStore, block_shift_for, device_unavailable_reason
from ps.table.state import TableChanges, TableImage, TableLayout, TableState
from ps.table.victims import first_in_order

if TYPE_CHECKING:  # imported where a table needs it: a CPU table with native kernels never does
    import torch

_ADMISSION_SALT = 0x41444D4954  # separates admission coin flips from init values
_MAX_STEP = 2**32 - 1
_INIT_STREAM = 2**32  # rounding stream of a new row's initial value: 2^32 + step (updates: step)
_EVICTION_SLACK = 64  # a full table frees need + capacity/64 rows, so the scan is amortised
# Up to this many rows, eviction and TTL sweeps read the whole table (exact order, < ~1 ms).
# Above it they never do: capacity eviction picks the oldest of a random sample of rows (as
# Redis does, an approximate LRU/LFU) and the TTL sweep reads a window of rows per push, so no
# push pays for a pass over a large table.
EXACT_SCAN_ROWS = 1 << 16
_EVICTION_SAMPLE = 16  # rows sampled per row to free (at least _MIN_EVICTION_SAMPLE)
_MIN_EVICTION_SAMPLE = 4096
# Sub-maps of the maps a bound keeps small (pending admission keys, change tracking): each
# sub-map costs a header even when empty, and max_keys / 64 keys rehash at most per growth.
BOUNDED_MAP_SUB_MAPS = 64
# Rows (and pending keys) a push's TTL sweep of a large table reads, at most (unless the push has
# more than half as many keys): fewer when a pass every ttl_steps / 8 steps needs fewer.
_SWEEP_WINDOW = 1 << 14

log = logging.getLogger(__name__)


def _pending_map(expected: int) -> native.HashMap:
    """The map of keys pending admission, sized for `expected` of them (max_pending bounds it)."""
    return native.HashMap(int(expected / 0.7) + 16, sub_maps=BOUNDED_MAP_SUB_MAPS)


def _sweep_window(num_rows: int, steps: int, interval: int, pushed: int) -> int:
    """Rows a push's TTL sweep of a large table reads: its share of one pass over num_rows every
    `interval` steps for the `steps` it advanced (at least one), at most _SWEEP_WINDOW, and never
    less than twice the push's `pushed` keys."""
    share = -(-num_rows * max(1, steps) // interval)
    return max(2 * pushed, min(_SWEEP_WINDOW, share))


@functools.cache
def _warn_torch_fallback(device: str, reason: str) -> None:
    """Once per device and process: the rows stay right, but whoever installed the CPU extra on a
    GPU host should know why the updates are slow."""
    log.warning("tables on %s: %s; their fused updates run on torch ops instead (slower)", device, reason)


def _resolve_kernels(config: TableConfig) -> Kernels:
    """config.kernels with "auto" decided: native on CPU (faster there than fbgemm's CPU kernels,
    see `embps bench table`), fbgemm on CUDA where it fuses the optimizer, else torch."""
    kernels = Kernels(config.kernels)
    if kernels == Kernels.AUTO:
        if config.device == "cpu":
            return Kernels.NATIVE
        if config.optimizer.kind not in fbgemm_kernels.FUSED_KINDS:
            return Kernels.TORCH
        if (reason := fbgemm_kernels.unavailable_reason()) is not None:
            _warn_torch_fallback(config.device, reason)
            return Kernels.TORCH
        return Kernels.FBGEMM
    if kernels == Kernels.FBGEMM and (reason := fbgemm_kernels.unavailable_reason()) is not None:
        raise ValueError(f"{config.name}.kernels: 'fbgemm' needs fbgemm_gpu: {reason}")
    return kernels


class _ChangeTracker:
    """Sets of touched and deleted keys, kept disjoint: the last thing that happened to a key wins.

    Holds at most max_keys keys (about 25 bytes each): past that it forgets them all and reports
    its changes as incomplete until the next take().
    """

    def __init__(self, max_keys: int) -> None:
        self.max_keys = max_keys
        self.touched = native.HashMap(sub_maps=BOUNDED_MAP_SUB_MAPS)
        self.deleted = native.HashMap(sub_maps=BOUNDED_MAP_SUB_MAPS)
        self.complete = True

    def touch(self, keys: np.ndarray) -> None:
        if keys.shape[0] and self.complete:
            self.touched.find_or_insert(keys)
            if self.deleted.size:
                self.deleted.erase(keys)
            self._check_bound()

    def delete(self, keys: np.ndarray) -> None:
        if keys.shape[0] and self.complete:
            self.deleted.find_or_insert(keys)
            self.touched.erase(keys)
            self._check_bound()

    @property
    def num_keys(self) -> int:
        """Touched plus deleted keys held."""
        return self.touched.size + self.deleted.size

    def _check_bound(self) -> None:
        if self.num_keys > self.max_keys:
            self.lose()

    def lose(self) -> None:
        """Forgets the changes: they are unknown (incomplete) until the next take()."""
        self.complete = False
        self.touched.clear()
        self.deleted.clear()

    def take(self) -> TableChanges:
        touched, _ = self.touched.export()
        deleted, _ = self.deleted.export()
        complete = self.complete
        self.touched.clear()
        self.deleted.clear()
        self.complete = True
        return TableChanges(np.sort(touched), np.sort(deleted), complete)

    @property
    def memory_bytes(self) -> int:
        return self.touched.memory_bytes + self.deleted.memory_bytes


ChangeFeed = _ChangeTracker  # what open_change_feed hands out: take() -> TableChanges


@dataclass
class ApplyResult:
    """What one apply_gradients call changed."""

    num_updated: int  # unique keys whose rows the optimizer moved
    num_inserted: int  # of those, rows created by this call
    evicted_keys: np.ndarray  # (e,) int64 keys dropped by capacity or TTL eviction
    updated_keys: np.ndarray  # (num_updated,) int64 the unique keys whose rows moved, unordered


class EmbeddingTable:
    """One shard's part of a table. See TableConfig for the knobs."""

    def __init__(self, config: TableConfig, kernels: str | None = None, block_shift: int | None = None) -> None:
        """kernels: overrides config.kernels (see TableConfig), e.g. "torch" or "fbgemm" to test
        and benchmark the device paths on CPU. block_shift: 2^block_shift rows a block (None:
        row_store.block_shift_for the row's width)."""
        if kernels is not None:
            if kernels not in set(Kernels):
                choices = ", ".join(repr(k.value) for k in Kernels)
                raise ValueError(f"kernels: must be one of {choices}, got {kernels!r}")
            config = replace(config, kernels=Kernels(kernels))
        self.config = config.validate()
        if (reason := device_unavailable_reason(config.device)) is not None:
            raise ValueError(f"{config.name}.device: {config.device!r} cannot hold rows here: {reason}")
        self.dim = config.dim
        self.state_width = optimizers.state_width(config.optimizer.kind, config.dim)
        self.storage = Storage(config.storage)
        self._encoded = self.storage != Storage.FLOAT32
        self._native_storage = native.native_enum(native.Storage, self.storage)
        self.value_words = native.value_words(self._native_storage, self.dim)
        self.meta_col = self.value_words + self.state_width
        self.width = self.meta_col + 2
        self.kernels = _resolve_kernels(self.config)
        block_shift = block_shift_for(self.width) if block_shift is None else block_shift
        self._store = RowStore(self.width, config.device, block_shift)
        self._use_native = self.kernels == Kernels.NATIVE
        self._fbgemm_key = (
            fbgemm_kernels.GroupKey(config.optimizer, self.dim, config.device)
            if self.kernels == Kernels.FBGEMM
            else None
        )
        self._map = native.HashMap()
        self._map.reserve(config.expected_rows or 0)
        self._native_optimizer = native.native_enum(native.OptimizerKind, config.optimizer.kind)
        self._hyper = optimizers.hyper_parameters(config.optimizer)
        # csrc/multi_table.h's TableRef but the step: fixed for the table's life, built once, not
        # at every multi-table call (it was ~3 us a table, per call).
        state_init = 0.0
        if config.optimizer.kind in (OptimizerKind.ADAGRAD, OptimizerKind.ROWWISE_ADAGRAD):
            state_init = config.optimizer.initial_accumulator
        self._multi_fixed = (
            self._store.block_shift,
            self.width,
            self.dim,
            self.state_width,
            native.native_enum(native.Initializer, config.initializer).value,
            self._native_optimizer.value,
        )
        self._multi_reals = (config.init_scale, state_init, *self._hyper)
        self._multi_seed = config.seed & 0xFFFFFFFFFFFFFFFF
        # The key of each row, where _row_live: only tables that evict need it (9 bytes a row).
        self._indexed = config.eviction.policy != EvictionPolicy.NONE or config.eviction.ttl_steps is not None
        # What multi_push_ready needs beside the room for the keys: fixed for the table's life.
        self._multi_push_kind = self.multi_native and not self._indexed and config.admission.kind == AdmissionKind.NONE
        self._row_keys = np.zeros(0, dtype=np.int64)
        self._row_live = np.zeros(0, dtype=np.bool_)
        self._reset_pending(0)
        self._changes: _ChangeTracker | None = None
        # Change feeds of readers that copy the table over many calls (a replica's full sync). A
        # tuple, swapped whole, so another thread may close a feed while a push walks them.
        self._feeds: tuple[_ChangeTracker, ...] = ()
        # Rows pushes wrote while a live copy reads the table (track_written_rows): one byte a row.
        self._written: np.ndarray | None = None
        self._rng = np.random.default_rng(config.seed)  # eviction samples: reproducible per table
        self._sweep_cursor = 0  # next row (and pending row) a windowed TTL sweep reads
        self._pending_sweep_cursor = 0
        self.version = 0
        self.step = 0
        self.num_admitted = 0
        self.num_evicted = 0
        self.num_pending_dropped = 0  # keys forgotten because admission.max_pending was reached

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def size(self) -> int:
        """Number of rows (admitted keys)."""
        return self._map.size

    @property
    def num_pending(self) -> int:
        return self._pending.size

    @property
    def memory_bytes(self) -> int:
        """Host and device bytes held: map, row blocks, row index, admission counters, changes."""
        return (
            self._map.memory_bytes
            + self._store.memory_bytes
            + self._row_keys.nbytes
            + self._row_live.nbytes
            + self._pending.memory_bytes
            + self._pending_meta.nbytes
            + self._pending_keys.nbytes
            + self._pending_seq.nbytes
            + 16 * self._pending_order_len
            + (self._changes.memory_bytes if self._changes is not None else 0)
        )

    def enable_change_tracking(self, max_keys: int | None = None) -> None:
        """From now on, remember which keys pushes touch and evictions delete (see take_changes).

        Costs one small-map insert per unique pushed key; used by incremental snapshots.
        max_keys: the most changed keys remembered between two take_changes() (default: twice the
        capacity, at least 2^20; 2^22 without capacity); past it the changes are incomplete.
        """
        if max_keys is None:
            capacity = self.config.capacity
            max_keys = max(1 << 20, 2 * capacity) if capacity is not None else 1 << 22
        if max_keys < 1:
            raise ValueError(f"max_keys: must be >= 1, got {max_keys}")
        if self._changes is None:
            self._changes = _ChangeTracker(max_keys)

    @property
    def tracks_changes(self) -> bool:
        return self._changes is not None

    def forget_changes(self) -> None:
        """The changes since the last take_changes() are unknown (the state was replaced, e.g.
        copied from a shard's primary): the next take_changes() reports them incomplete, so an
        incremental snapshot writes every row. Turns tracking on."""
        self.enable_change_tracking()
        self._changes.lose()

    def open_change_feed(self, max_keys: int | None = None) -> ChangeFeed:
        """A feed of the keys pushes touch and evictions delete from now on, for a reader that
        copies the table over several calls: copy, then feed.take() says what changed meanwhile.
        max_keys as in enable_change_tracking. Close it with close_change_feed."""
        if max_keys is None:
            capacity = self.config.capacity
            max_keys = max(1 << 20, 2 * capacity) if capacity is not None else 1 << 22
        feed = _ChangeTracker(max_keys)
        self._feeds = (*self._feeds, feed)
        return feed

    def close_change_feed(self, feed: ChangeFeed) -> None:
        """Stops feeding `feed` (safe from any thread)."""
        self._feeds = tuple(f for f in self._feeds if f is not feed)

    def keys(self) -> np.ndarray:
        """Every key that holds a row, (u,) int64, in no particular order."""
        keys, _ = self._map.export()
        return keys

    def take_changes(self) -> TableChanges:
        """Keys touched and deleted since the previous call (or since tracking began), then resets."""
        if self._changes is None:
            raise ValueError(f"table {self.name}: change tracking is off (call enable_change_tracking first)")
        return self._changes.take()

    def init_values(self, keys: np.ndarray) -> np.ndarray:
        """keys (n,) int64 -> the rows they start with, (n, dim) float32; pure in (seed, key)."""
        return init_values(self.config, keys)

    def read(self, keys: np.ndarray | torch.Tensor, step: int | None = None) -> np.ndarray:
        """keys (n,) int64 -> values (n, dim) float32 in host memory, row i for keys[i].

        Keys without a row (never pushed, not admitted, evicted) read as their init value. step:
        the training step the rows are read for: with eviction.ttl_steps, a row not pushed for more
        than ttl_steps before it reads as its init value too, as a push of that step finds it
        (expired), whether the TTL sweep dropped it yet or not; so what a lookup sees does not
        depend on when a shard swept. None: the rows as stored.
        """
        if not self._store.native:
            return self.lookup(keys, step).cpu().numpy()
        keys = native.as_keys(keys)
        rows = self._live(self._map.find(keys), step)
        # No zero fill: gather writes every found row and the init fills every missing one.
        out = np.empty((keys.shape[0], self.dim), dtype=np.float32)
        if self._encoded:
            s = self._store
            native.gather_decode(s.block_addresses, s.block_shift, self.width, self._native_storage, rows, out)
        else:
            self._store.gather(rows, 0, self.dim, out)
        missing = rows < 0
        if missing.any():
            out[missing] = self.init_values(keys[missing])
        return out

    def lookup(self, keys: np.ndarray | torch.Tensor, step: int | None = None) -> torch.Tensor:
        """keys (n,) int64 -> values (n, dim) float32 on the table's device, as `read` gives them."""
        import torch

        if self._store.native:
            return torch.from_numpy(self.read(keys, step))
        keys = native.as_keys(keys)
        rows = self._live(self._map.find(keys), step)
        out = torch.empty((keys.shape[0], self.dim), dtype=torch.float32, device=self._store.device)
        self._store.gather(rows, 0, self.dim, out)
        missing = rows < 0
        if missing.any():
            init = torch.from_numpy(self.init_values(keys[missing])).to(out.device)
            out[torch.from_numpy(missing).to(out.device)] = init
        return out

    def lookup_stored(self, keys: np.ndarray) -> np.ndarray:
        """keys (n,) int64 -> their rows as the table stores them, (n, value_words) float32 words
        (csrc/row_codec.h; a float32 table's are its values), so a reader can keep them bit for bit.
        Keys without a row read as their init value, encoded as a row created now would be."""
        keys = native.as_keys(keys)
        if not self._encoded:
            return self.read(keys)
        rows = self._map.find(keys)
        out = np.empty((keys.shape[0], self.value_words), dtype=np.float32)
        self._store.gather(rows, 0, self.value_words, out)
        missing = rows < 0
        if missing.any():
            absent = keys[missing]
            out[missing] = native.encode_words(
                self.storage, self.config.seed, absent, _INIT_STREAM + self.step, self.init_values(absent)
            )
        return out

    def apply_gradients(
        self,
        keys: np.ndarray | torch.Tensor,
        grads: np.ndarray | torch.Tensor,
        step: int | None = None,
        counts: np.ndarray | None = None,
    ) -> ApplyResult:
        """Applies one optimizer step per unique key to the sum of its gradients.

        keys (n,) int64, may repeat; grads (n, dim) float32; step: the training step of this
        push (default: version + 1), 0 <= step < 2^32; counts (n,) int64 >= 1: how many
        sightings each entry stands for (default 1), used by frequency and admission.
        The call is all or nothing: on ValueError/TypeError/CapacityError the table is unchanged.
        """
        keys = native.as_keys(keys)
        grads_np = self._check_grads(grads, keys.shape[0])
        step = self.version + 1 if step is None else step
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or not 0 <= step <= _MAX_STEP:
            raise ValueError(f"step: must be an integer in [0, 2^32 - 1], got {step!r}")
        step = int(step)
        if counts is not None:
            counts = native.as_keys(counts, "counts")
            if counts.shape[0] != keys.shape[0]:
                raise ValueError(f"counts: expected shape ({keys.shape[0]},), got {counts.shape}")
            native.check_counts(counts)

        unique_keys, sums, sightings = native.dedupe_sum(keys, grads_np, counts, self.dim)
        capacity = self.config.capacity
        ttl = self.config.eviction.ttl_steps
        if self.config.admission.kind == AdmissionKind.NONE and (
            capacity is None or self.size + unique_keys.shape[0] <= capacity
        ):
            # Fast path: every key trains and all fit, so one probe of the map does it all. A row
            # past its TTL at this step starts again from its init where it is, as after the sweep
            # that drops it (whenever that runs) and the insert after: its key is touched.
            rows, inserted = self._insert(unique_keys)
            if ttl is not None:
                renewed = self._expired_at(np.where(inserted, -1, rows), step)
                self.num_evicted += int(renewed.sum())
                inserted |= renewed
            if inserted.any():
                new_keys = unique_keys[inserted]
                self._write_new_rows(new_keys, rows[inserted], np.zeros(new_keys.shape[0], np.uint32), step)
                self.num_admitted += new_keys.shape[0]
            self._update(unique_keys, rows, sums, sightings, step)
            return self._finish(step, unique_keys, int(inserted.sum()), np.empty(0, dtype=np.int64))

        rows = self._map.find(unique_keys)
        # Rows past their TTL at this step are new keys again (admission included), as after the
        # sweep that drops them; they leave below, once nothing can fail, and free their rows.
        expired = self._expired_at(rows, step)
        is_new = (rows < 0) | expired
        admit_new, pending_rows, pending_before, stale_pending = self._admission(unique_keys, is_new, sightings, step)
        apply_mask = ~is_new
        apply_mask[np.flatnonzero(is_new)[admit_new]] = True
        num_new = int(admit_new.sum())

        self.reserve_rows(num_new)  # before anything changes: a MemoryError leaves the table as it was
        evicted = self._make_room(num_new, rows[rows >= 0], step, freed=int(expired.sum()))
        # Nothing has changed before this point; from here on every step succeeds.
        if ttl is not None:
            self._evict(unique_keys[expired])
            self._erase_pending(stale_pending)
            # Expired keys admitted again are touched (a new row), the others deleted.
            evicted = np.concatenate([evicted, unique_keys[expired & ~apply_mask]])
        apply_keys = unique_keys[apply_mask]
        rows, inserted = self._map.find_or_insert(apply_keys)
        self._store.ensure_rows(self._map.num_rows)
        if inserted.any():
            new_freq = np.zeros(int(inserted.sum()), dtype=np.uint32)
            admitted_pending = pending_rows[admit_new]
            has_pending = admitted_pending >= 0
            new_freq[has_pending] = pending_before[admit_new][has_pending]
            self._write_new_rows(apply_keys[inserted], rows[inserted], new_freq, step)
            self._erase_pending(unique_keys[is_new][admit_new][has_pending])
            self.num_admitted += int(inserted.sum())
        self._update(apply_keys, rows, sums[apply_mask], sightings[apply_mask], step)
        self._count_pending(unique_keys[is_new][~admit_new], sightings[is_new][~admit_new], step)
        return self._finish(step, apply_keys, int(inserted.sum()), evicted)

    # -- multi-table verbs (ps/table/multi.py): one native call for many tables --------------

    @property
    def multi_native(self) -> bool:
        """True when lookups of this table can run in a multi-table native call (CPU rows, C++
        kernels, float32 values: csrc/multi_table.h neither decodes nor encodes low-precision rows)."""
        return self._use_native and self.config.storage == Storage.FLOAT32

    def multi_push_ready(self, num_keys: int) -> bool:
        """True when a push of num_keys keys takes apply_gradients' fast path for sure (no
        admission, no row index, room for every key), so the multi-table native call may apply it."""
        capacity = self.config.capacity
        return self._multi_push_kind and (capacity is None or self.size + num_keys <= capacity)

    @property
    def fbgemm_group(self) -> fbgemm_kernels.GroupKey | None:
        """What this table shares with the tables its fbgemm updates batch with (None: not fbgemm)."""
        return self._fbgemm_key

    def fbgemm_push_ready(self, num_keys: int) -> bool:
        """True when a push of num_keys keys takes apply_gradients' fast path for sure and the
        update runs in fbgemm, so push_tables may batch it with other tables of its group."""
        capacity = self.config.capacity
        return (
            self._fbgemm_key is not None
            and not self._indexed
            and self.config.admission.kind == AdmissionKind.NONE
            and (capacity is None or self.size + num_keys <= capacity)
        )

    def begin_fbgemm_push(
        self, keys: np.ndarray, grads: np.ndarray, counts: np.ndarray | None, step: int
    ) -> tuple[np.ndarray, np.ndarray, torch.Tensor, torch.Tensor, np.ndarray, int]:
        """apply_gradients' fast path up to the optimizer (see fbgemm_push_ready): dedupes, inserts
        new rows, gathers the rows. Returns (unique keys (u,), rows (u,), words (u, width) on the
        device, summed grads (u, dim) on the device, sightings (u,), rows inserted); hand the
        words, updated, to end_fbgemm_push."""
        unique_keys, sums, sightings = native.dedupe_sum(keys, grads, counts, self.dim)
        rows, inserted = self._insert(unique_keys)
        num_inserted = int(inserted.sum())
        if num_inserted:
            new_keys = unique_keys[inserted]
            self._write_new_rows(new_keys, rows[inserted], np.zeros(num_inserted, np.uint32), step)
            self.num_admitted += num_inserted
        import torch

        words = torch.as_tensor(self._store.gather(rows, 0, self.width))
        return unique_keys, rows, words, torch.from_numpy(sums).to(words.device), sightings, num_inserted

    def end_fbgemm_push(
        self, begun: tuple[np.ndarray, np.ndarray, torch.Tensor, torch.Tensor, np.ndarray, int], step: int
    ) -> ApplyResult:
        """Writes back the rows begin_fbgemm_push gathered, once fbgemm has updated them."""
        unique_keys, rows, words, _, sightings, num_inserted = begun
        if rows.shape[0]:
            self._write_back(rows, words, sightings, step)
        return self._finish(step, unique_keys, num_inserted, np.empty(0, dtype=np.int64))

    def multi_args(self, step: int | None = None) -> tuple:
        """(map, block addresses, params (9,), reals (6,), seed) for csrc/multi_table.h's TableRef;
        step: the step a lookup reads for (see read; None: the rows as stored)."""
        ttl = self.config.eviction.ttl_steps
        expiry = (0, 0) if step is None or ttl is None else (ttl, step)
        params = (*self._multi_fixed, self.step, *expiry)
        return self._map._map, self._store.block_addresses, params, self._multi_reals, self._multi_seed

    def _insert(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """find_or_insert, then the row blocks of the new rows; where a block cannot be allocated
        (MemoryError) the new keys are erased again, so no key is left without its row (it was:
        every later lookup of it raised IndexError, every push MemoryError again)."""
        rows, inserted = self._map.find_or_insert(keys)
        try:
            self._store.ensure_rows(self._map.num_rows)
        except MemoryError:
            self._map.erase(keys[inserted])
            raise
        return rows, inserted

    def reserve_rows(self, num_keys: int) -> None:
        """Allocates row blocks so that num_keys more keys fit, before anything changes (a block
        that cannot be had, MemoryError, then changes nothing). New keys take freed rows first, so
        with a capacity the rows never pass max(the rows now, the capacity)."""
        rows = self._map.num_rows + num_keys
        if self.config.capacity is not None:
            rows = min(rows, max(self._map.num_rows, self.config.capacity))
        self._store.ensure_rows(rows)

    def finish_multi_push(self, step: int, updated_keys: np.ndarray, num_inserted: int) -> ApplyResult:
        """The bookkeeping of apply_gradients after the native multi-table call applied a push."""
        self.num_admitted += num_inserted
        return self._finish(step, updated_keys, num_inserted, np.empty(0, dtype=np.int64))

    def check_step(self, step: int | None) -> int:
        """The step a push applies at (default version + 1); ValueError outside [0, 2^32 - 1]."""
        step = self.version + 1 if step is None else step
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or not 0 <= step <= _MAX_STEP:
            raise ValueError(f"step: must be an integer in [0, 2^32 - 1], got {step!r}")
        return int(step)

    def _finish(self, step: int, updated_keys: np.ndarray, num_inserted: int, evicted: np.ndarray) -> ApplyResult:
        """Advances version and step, runs the TTL sweep when one is due, records changes."""
        if self._written is not None and updated_keys.shape[0]:
            self._written = set_flags(self._written, self._map.find(updated_keys))  # before the sweep frees some
        if self._changes is not None:
            self._changes.touch(updated_keys)
        for feed in self._feeds:
            feed.touch(updated_keys)
        previous_step = self.step
        self.step = max(self.step, step)
        self.version += 1
        ttl = self.config.eviction.ttl_steps
        if ttl is not None:
            interval = max(1, ttl // 8)
            due = self.step // interval > previous_step // interval
            steps, pushed = self.step - previous_step, updated_keys.shape[0]
            if self.size > EXACT_SCAN_ROWS:
                window = _sweep_window(self._map.num_rows, steps, interval, pushed)
                evicted = np.concatenate([evicted, self._sweep_rows(self.step, window)])
            elif due:
                evicted = np.concatenate([evicted, self._sweep_rows(self.step, self._map.num_rows)])
            if self._pending.size > EXACT_SCAN_ROWS:
                self._sweep_pending(self.step, _sweep_window(self._pending.num_rows, steps, interval, pushed))
            elif due:
                self._sweep_pending(self.step, self._pending.num_rows)
        return ApplyResult(updated_keys.shape[0], num_inserted, evicted, updated_keys)

    def evict_expired(self, step: int) -> np.ndarray:
        """Drops rows (and pending keys) not pushed for more than ttl_steps before `step`.

        Inside apply_gradients a table of up to EXACT_SCAN_ROWS rows runs this every
        max(1, ttl_steps // 8) steps; a larger one sweeps a window of rows on every push instead:
        its share of one pass every max(1, ttl_steps // 8) steps, at most 16,384 rows (at least
        twice the push's keys), so expired rows leave within that interval where the share fits
        the window, within a few passes where it does not, and no push reads the whole table.
        Returns the evicted row keys (e,) int64.
        """
        if self.config.eviction.ttl_steps is None:
            return np.empty(0, dtype=np.int64)
        self._sweep_cursor = self._pending_sweep_cursor = 0
        expired = self._sweep_rows(step, self._map.num_rows)
        self._sweep_pending(step, self._pending.num_rows)
        return expired

    def _sweep_rows(self, step: int, window: int) -> np.ndarray:
        """Evicts the expired rows among the next `window` rows after the sweep cursor."""
        rows = self._next_window(window, self._map.num_rows, "_sweep_cursor")
        expired = self._expired_among(rows[self._row_live[rows]], step)
        self._evict(expired)
        return expired

    def _expired_among(self, rows: np.ndarray, step: int) -> np.ndarray:
        """Keys (e,) of the live rows (n,) not pushed for more than ttl_steps before `step`."""
        meta = self._gather_meta(rows)
        return self._row_keys[rows[step - meta[:, 1].astype(np.int64) > self.config.eviction.ttl_steps]]

    def _sweep_pending(self, step: int, window: int) -> None:
        """Forgets the stale pending keys among the next `window` pending rows."""
        rows = self._next_window(window, self._pending.num_rows, "_pending_sweep_cursor")
        rows = rows[self._pending_seq[rows] != 0]
        stale = step - self._pending_meta[rows, 1].astype(np.int64) > self.config.eviction.ttl_steps
        self._erase_pending(self._pending_keys[rows[stale]])

    def _next_window(self, window: int, num_rows: int, cursor: str) -> np.ndarray:
        """Rows [c, c + window) of [0, num_rows) from the cursor c, which moves on (wrapping)."""
        start = getattr(self, cursor)
        if start >= num_rows:
            start = 0
        stop = min(num_rows, start + window)
        setattr(self, cursor, stop if stop < num_rows else 0)
        return np.arange(start, stop, dtype=np.int64)

    def export(self, keys: np.ndarray | None = None) -> TableState:
        """Copies out all state, rows sorted by key (so equal tables export equal arrays).

        keys (k,) int64: export only the rows of these keys (absent keys are left out), e.g. the
        touched keys of take_changes() for an incremental snapshot. Pending admission counters,
        version and step are always exported whole.
        """
        if keys is None:
            keys, rows = self._map.export()
        else:
            keys = sorted_unique(native.as_keys(keys))
            rows = self._map.find(keys)
            keys, rows = keys[rows >= 0], rows[rows >= 0]
        order = np.argsort(keys)  # distinct keys: any sort gives this permutation
        keys, rows = keys[order], rows[order]
        # Each part is gathered into its own array (not all words, then copied apart): an export
        # holds one copy of the table, not two at once.
        encoded = None
        if self._encoded:
            value_words = self._store.gather_host(rows, 0, self.value_words)
            values = native.decode_words(self.storage, value_words, self.dim)
            encoded = value_words.view(np.uint8)
        else:
            values = self._store.gather_host(rows, 0, self.dim)
        meta = self._store.gather_host(rows, self.meta_col, self.width - self.meta_col).view(np.uint32)
        pkeys, prows = self._pending.export()
        porder = np.argsort(pkeys)
        pkeys, prows = pkeys[porder], prows[porder]
        layout = TableLayout(
            rows=rows,
            free_rows=self._map.free_rows(),
            num_rows=int(self._map.num_rows),
            pending_rows=prows,
            pending_seq=self._pending_seq[prows].copy(),
            pending_free_rows=self._pending.free_rows(),
            pending_num_rows=int(self._pending.num_rows),
            next_seq=int(self._next_seq),
            sweep_cursor=int(self._sweep_cursor),
            pending_sweep_cursor=int(self._pending_sweep_cursor),
            rng=self._rng.bit_generator.state,
        )
        return TableState(
            keys=keys,
            values=values,
            optimizer_state=self._store.gather_host(rows, self.value_words, self.meta_col - self.value_words),
            freq=np.ascontiguousarray(meta[:, 0]),
            last_step=np.ascontiguousarray(meta[:, 1]),
            pending_keys=pkeys,
            pending_counts=self._pending_meta[prows, 0].copy(),
            pending_last_step=self._pending_meta[prows, 1].copy(),
            version=self.version,
            step=self.step,
            storage=str(self.storage),
            encoded=encoded,
            layout=layout,
        )

    def state_of_image(self, image: TableImage) -> TableState:
        """export() of the table `image` was taken of (this table's image() of every row, or an
        image of a table of this config): rows sorted by key, values decoded. Reads nothing of this
        table's rows or maps, only its config's shapes: it may run while pushes change the table.
        A snapshot copies a whole table so (image(): the words in row order, no sort, a third of
        export()'s time where pushes wait) and builds its state once pushes go on."""
        a, c = image.arrays, image.counters
        if a["word_rows"].shape[0] != c["num_rows"]:
            raise ValueError(f"image: holds {a['word_rows'].shape[0]} rows' words, the table {c['num_rows']}")
        order = np.argsort(a["keys"])  # distinct keys: any sort gives this permutation
        keys, rows = a["keys"][order], a["rows"][order]
        words = a["words"]  # word_rows is every row in order: a row's words are at its index
        encoded = None
        if self._encoded:
            value_words = words[rows, : self.value_words]
            values = native.decode_words(self.storage, value_words, self.dim)
            encoded = value_words.view(np.uint8)
        else:
            values = words[rows, : self.dim]
        meta = words[rows, self.meta_col : self.width].view(np.uint32)
        porder = np.argsort(a["pending_keys"])
        pkeys, prows = a["pending_keys"][porder], a["pending_rows"][porder]
        layout = TableLayout(
            rows=rows,
            free_rows=a["free_rows"],
            num_rows=c["num_rows"],
            pending_rows=prows,
            pending_seq=a["pending_seq"][prows],
            pending_free_rows=a["pending_free_rows"],
            pending_num_rows=c["pending_num_rows"],
            next_seq=c["next_seq"],
            sweep_cursor=c["sweep_cursor"],
            pending_sweep_cursor=c["pending_sweep_cursor"],
            rng=image.rng,
        )
        return TableState(
            keys=keys,
            values=values,
            optimizer_state=words[rows, self.value_words : self.meta_col],
            freq=np.ascontiguousarray(meta[:, 0]),
            last_step=np.ascontiguousarray(meta[:, 1]),
            pending_keys=pkeys,
            pending_counts=a["pending_meta"][prows, 0].copy(),
            pending_last_step=a["pending_meta"][prows, 1].copy(),
            version=c["version"],
            step=c["step"],
            storage=str(self.storage),
            encoded=encoded,
            layout=layout,
        )

    def load(self, state: TableState) -> None:
        """Replaces all state with `state` (as returned by export). Checks shapes first. With its
        layout, rows go where they lay and eviction goes on from where it was (TableLayout), so
        this table evicts what the exported one would have; without it, rows are laid out by key."""
        self._check_state(state)
        u = state.keys.shape[0]
        if self.config.capacity is not None and u > self.config.capacity:
            raise CapacityError(f"table {self.name}: state has {u} rows, capacity is {self.config.capacity}")
        layout = state.layout
        if layout is None:
            table_map = native.HashMap()
            table_map.reserve(max(u, self.config.expected_rows or 0))
        else:
            rng = self._check_layout(state, layout)
            table_map, pending = self._laid_out_maps(
                (state.keys, layout.rows, layout.num_rows, layout.free_rows),
                (state.pending_keys, layout.pending_rows, layout.pending_num_rows, layout.pending_free_rows),
            )
        self._map = table_map
        self._store = RowStore(self.width, self.config.device, self._store.block_shift)
        self._row_keys = np.zeros(0, dtype=np.int64)
        self._row_live = np.zeros(0, dtype=np.bool_)
        self._write_state_rows(state)
        if layout is None:
            self._load_pending_and_counters(state)
            # Eviction starts afresh, as in a table made for this state: a table that had trained
            # kept its sampler and sweep cursors, and evicted other rows than a fresh one would.
            self._rng = np.random.default_rng(self.config.seed)
            self._sweep_cursor = self._pending_sweep_cursor = 0
        else:
            self._load_laid_out_pending(state, layout, pending)
            self._rng = rng
            self._sweep_cursor, self._pending_sweep_cursor = layout.sweep_cursor, layout.pending_sweep_cursor
        if self._changes is not None:
            self._changes = _ChangeTracker(self._changes.max_keys)
        for feed in self._feeds:
            feed.lose()

    def load_delta(self, state: TableState, deleted_keys: np.ndarray) -> None:
        """Applies an incremental state on top of the current one: drops deleted_keys (d,) int64,
        then inserts or overwrites the rows of `state`; pending counters, version and step are
        replaced by those of `state`. Its layout is not used: new keys take rows as a push's do."""
        self._check_state(state)
        deleted_keys = native.as_keys(deleted_keys, "deleted_keys")
        if np.intersect1d(deleted_keys, state.keys).shape[0]:
            raise ValueError("deleted_keys: a key cannot be both deleted and written by one delta")
        freed = int((self._map.find(np.unique(deleted_keys)) >= 0).sum())
        grow = int((self._map.find(state.keys) < 0).sum()) - freed
        if self.config.capacity is not None and self.size + grow > self.config.capacity:
            raise CapacityError(f"table {self.name}: delta grows past capacity {self.config.capacity}")
        for feed in self._feeds:
            feed.lose()
        freed = self._map.erase(deleted_keys)
        if self._indexed:
            self._row_live[freed[freed >= 0]] = False
        self._write_state_rows(state)
        self._load_pending_and_counters(state)

    def image(self, word_rows: np.ndarray | None = None) -> TableImage:
        """Copies out the table as it lies in memory (see TableImage): a new standby loads it with
        load_image and goes on exactly as this table does. word_rows (d,) int64: the rows whose
        words the image holds (a live copy's last part: the rows written since their copy, the rest
        in the RowStore the standby filled from copy_rows); default every row."""
        keys, rows = self._map.export()
        num_rows = self._map.num_rows
        if word_rows is None:
            word_rows = np.arange(num_rows, dtype=np.int64)
        pending_keys, pending_rows = self._pending.export()
        q = self._pending.num_rows
        order = list(self._pending_order)
        arrays = {
            "keys": keys,
            "rows": rows,
            "free_rows": self._map.free_rows(),
            "word_rows": word_rows,
            "words": self.copy_rows(word_rows),
            "pending_keys": pending_keys,
            "pending_rows": pending_rows,
            "pending_free_rows": self._pending.free_rows(),
            "pending_meta": self._pending_meta[:q].copy(),
            "pending_row_keys": self._pending_keys[:q].copy(),
            "pending_seq": self._pending_seq[:q].copy(),
            "pending_order_keys": np.concatenate([np.zeros(0, np.int64), *(k for k, _ in order)]),
            "pending_order_seqs": np.concatenate([np.zeros(0, np.int64), *(seqs for _, seqs in order)]),
            "pending_order_chunks": np.array([k.shape[0] for k, _ in order], dtype=np.int64),
        }
        counters = {
            "num_rows": num_rows, "pending_num_rows": q, "next_seq": self._next_seq,
            "sweep_cursor": self._sweep_cursor, "pending_sweep_cursor": self._pending_sweep_cursor,
            "version": self.version, "step": self.step, "num_admitted": self.num_admitted,
            "num_evicted": self.num_evicted, "num_pending_dropped": self.num_pending_dropped,
        }
        return TableImage(arrays, {k: int(v) for k, v in counters.items()}, self._rng.bit_generator.state)

    # -- a live copy (ps/shard/replication.py): rows copied between pushes, then those written since --

    @property
    def num_rows(self) -> int:
        """Rows handed out (live or free): the rows a copy of the table's words spans."""
        return self._map.num_rows

    def copy_rows(self, rows: np.ndarray) -> np.ndarray:
        """The words (n, width) float32 of rows (n,) int64 < num_rows, as stored, in host memory."""
        if rows.shape[0] and not (0 <= int(rows.min()) and int(rows.max()) < self._map.num_rows):
            raise ValueError(f"rows: must be in [0, {self._map.num_rows})")
        return self._store.gather_host(np.ascontiguousarray(rows, dtype=np.int64), 0, self.width)

    def track_written_rows(self) -> int:
        """From now on, marks the rows pushes write (take_written_rows); marks from before are
        dropped. Rows change only where a push updates or creates a key (eviction frees rows and
        leaves their words), so a row copied earlier and not marked since still holds its words.
        Returns num_rows: the rows a copy begun now spans."""
        self._written = np.zeros(self._map.num_rows + 1024, dtype=np.bool_)
        return self._map.num_rows

    def num_written_rows(self) -> int:
        """Rows marked since track_written_rows or the last take_written_rows."""
        return 0 if self._written is None else int(np.count_nonzero(self._written))

    def take_written_rows(self, below: int | None = None) -> np.ndarray:
        """The rows (d,) int64 marked since track_written_rows or their last take, ascending, those
        below `below` only when given; clears their marks (tracking goes on)."""
        if self._written is None:
            raise ValueError(f"table {self.name}: take_written_rows without track_written_rows")
        rows = np.flatnonzero(self._written[:below]).astype(np.int64)
        self._written[rows] = False
        return rows

    def stop_tracking_written_rows(self) -> None:
        self._written = None

    def new_row_store(self) -> RowStore:
        """An empty RowStore of this table's width, device and blocks: a standby writes a live
        copy's rows into it as they come, and load_image takes it."""
        return RowStore(self.width, self.config.device, self._store.block_shift)

    def load_image(self, image: TableImage, store: RowStore | None = None, stored: np.ndarray | None = None) -> None:
        """Replaces all state with `image` (another table's image(), of this table's config).
        store: the rows copied before the image (new_row_store), with stored (>= num_rows,) bool
        saying which rows it holds; the image's words go over them. Without a store the image must
        hold every row's words. ValueError naming the part that does not fit this table (or a row
        neither holds); the table is unchanged then."""
        arrays, counters = image.arrays, image.counters
        num_rows, q = counters["num_rows"], counters["pending_num_rows"]
        u, pu, d = arrays["keys"].shape[0], arrays["pending_keys"].shape[0], arrays["word_rows"].shape[0]
        expected = {
            "keys": ((u,), np.int64), "rows": ((u,), np.int64), "free_rows": ((num_rows - u,), np.uint32),
            "word_rows": ((d,), np.int64), "words": ((d, self.width), np.float32),
            "pending_keys": ((pu,), np.int64), "pending_rows": ((pu,), np.int64),
            "pending_free_rows": ((q - pu,), np.uint32), "pending_meta": ((q, 2), np.uint32),
            "pending_row_keys": ((q,), np.int64), "pending_seq": ((q,), np.int64),
            "pending_order_keys": ((arrays["pending_order_keys"].shape[0],), np.int64),
            "pending_order_seqs": ((arrays["pending_order_keys"].shape[0],), np.int64),
            "pending_order_chunks": ((arrays["pending_order_chunks"].shape[0],), np.int64),
        }
        for name, (shape, dtype) in expected.items():
            array = arrays[name]
            if array.shape != shape or array.dtype != dtype:
                got = f"{array.shape} {array.dtype}"
                raise ValueError(f"image.{name}: expected shape {shape} {np.dtype(dtype)}, got {got}")
        chunks = arrays["pending_order_chunks"]
        if (chunks < 1).any() or int(chunks.sum()) != arrays["pending_order_keys"].shape[0]:
            raise ValueError("image.pending_order_chunks: chunk lengths must be >= 1 and add up to the entries")
        if self.config.capacity is not None and u > self.config.capacity:
            raise CapacityError(f"table {self.name}: image has {u} rows, capacity is {self.config.capacity}")
        word_rows = arrays["word_rows"]
        if d and not (0 <= int(word_rows.min()) and int(word_rows.max()) < num_rows):
            raise ValueError(f"image.word_rows: rows must be in [0, {num_rows})")
        held = np.zeros(num_rows, dtype=np.bool_)
        if store is not None:
            if stored is None:
                raise ValueError("stored: which rows the store holds, required with a store")
            if store.width != self.width or store.device != self.config.device:
                raise ValueError(f"store: rows of width {store.width} on {store.device!r}, the table's are "
                                 f"{self.width} on {self.config.device!r}")
            held[: min(num_rows, stored.shape[0])] = stored[:num_rows]
        held[word_rows] = True
        if not held.all():
            raise ValueError(f"image.word_rows: the words of row {int(np.flatnonzero(~held)[0])} are neither in the "
                             "image nor in the rows copied before it")
        rng = self._sampler(image.rng, "image.rng")
        table_map, pending = self._laid_out_maps(
            (arrays["keys"], arrays["rows"], num_rows, arrays["free_rows"]),
            (arrays["pending_keys"], arrays["pending_rows"], q, arrays["pending_free_rows"]),
        )
        if store is None:
            store = self.new_row_store()
        store.ensure_rows(num_rows)
        store.scatter(word_rows, 0, arrays["words"])
        self._map, self._store, self._rng = table_map, store, rng
        self._row_keys = np.zeros(0, dtype=np.int64)
        self._row_live = np.zeros(0, dtype=np.bool_)
        self._index_rows(arrays["keys"], arrays["rows"])
        self._pending = pending
        self._pending_meta = arrays["pending_meta"].copy()
        self._pending_keys = arrays["pending_row_keys"].copy()
        self._pending_seq = arrays["pending_seq"].copy()
        ends = np.cumsum(chunks)
        self._pending_order = deque(
            (arrays["pending_order_keys"][end - n : end].copy(), arrays["pending_order_seqs"][end - n : end].copy())
            for n, end in zip(chunks.tolist(), ends.tolist(), strict=True)
        )
        self._pending_order_len = int(chunks.sum())
        self._next_seq = counters["next_seq"]
        self._sweep_cursor, self._pending_sweep_cursor = counters["sweep_cursor"], counters["pending_sweep_cursor"]
        self.version, self.step = counters["version"], counters["step"]
        self.num_admitted, self.num_evicted = counters["num_admitted"], counters["num_evicted"]
        self.num_pending_dropped = counters["num_pending_dropped"]
        if self._changes is not None:
            self._changes = _ChangeTracker(self._changes.max_keys)
        for feed in self._feeds:
            feed.lose()

    def _check_state(self, state: TableState) -> None:
        u = state.keys.shape[0]
        expected = {
            "keys": ((u,), np.int64),
            "values": ((u, self.dim), np.float32),
            "optimizer_state": ((u, self.state_width), np.float32),
            "freq": ((u,), np.uint32),
            "last_step": ((u,), np.uint32),
        }
        p = state.pending_keys.shape[0]
        expected.update(
            pending_keys=((p,), np.int64), pending_counts=((p,), np.uint32), pending_last_step=((p,), np.uint32)
        )
        for name, (shape, dtype) in expected.items():
            array = getattr(state, name)
            if not isinstance(array, np.ndarray) or array.shape != shape or array.dtype != dtype:
                got = f"{array.shape} {array.dtype}" if isinstance(array, np.ndarray) else type(array).__name__
                raise ValueError(f"state.{name}: expected shape {shape} {np.dtype(dtype)}, got {got}")
        if state.encoded is not None:
            e = state.encoded
            width = native.value_words(native.native_enum(native.Storage, Storage(state.storage)), self.dim) * 4
            if not isinstance(e, np.ndarray) or e.shape != (u, width) or e.dtype != np.uint8:
                got = f"{e.shape} {e.dtype}" if isinstance(e, np.ndarray) else type(e).__name__
                raise ValueError(
                    f"state.encoded: expected shape {(u, width)} uint8 for {state.storage} rows, got {got}"
                )
        if sorted_unique(state.keys).shape[0] != u:
            raise ValueError("state.keys: keys must be unique")

    def _write_state_rows(self, state: TableState) -> None:
        u = state.keys.shape[0]
        rows, _ = self._map.find_or_insert(state.keys)
        self._store.ensure_rows(self._map.num_rows)
        self._index_rows(state.keys, rows)
        words = np.empty((u, self.width), dtype=np.float32)
        if not self._encoded:
            words[:, : self.dim] = state.values
        elif state.encoded is not None and Storage(state.storage) == self.storage:
            words[:, : self.value_words] = np.ascontiguousarray(state.encoded).view(np.float32)
        else:  # another storage's rows: encode their float32 values
            stream = _INIT_STREAM + int(state.step)
            words[:, : self.value_words] = native.encode_words(
                self.storage, self.config.seed, state.keys, stream, state.values
            )
        words[:, self.value_words : self.meta_col] = state.optimizer_state
        meta = words[:, self.meta_col :].view(np.uint32)
        meta[:, 0] = state.freq
        meta[:, 1] = state.last_step
        self._store.scatter(rows, 0, words)

    def _load_pending_and_counters(self, state: TableState) -> None:
        p = state.pending_keys.shape[0]
        self._reset_pending(p)
        # The state does not say which key was first seen first: the least recently pushed go first.
        order = np.argsort(state.pending_last_step, kind="stable")
        self._count_pending(state.pending_keys[order], np.zeros(p, dtype=np.int64), 0)
        prows = self._pending.find(state.pending_keys)
        kept = prows >= 0  # all of them, unless the state holds more than max_pending
        self._pending_meta[prows[kept], 0] = state.pending_counts[kept]
        self._pending_meta[prows[kept], 1] = state.pending_last_step[kept]
        self.version = int(state.version)
        self.step = int(state.step)

    def _check_layout(self, state: TableState, layout: TableLayout) -> np.random.Generator:
        """ValueError naming what of `layout` does not fit `state`; returns the sampler it holds
        (the maps' own checks come with their restore)."""
        u, p = state.keys.shape[0], state.pending_keys.shape[0]
        for name, array, length, dtype in (
            ("rows", layout.rows, u, np.int64), ("free_rows", layout.free_rows, None, np.uint32),
            ("pending_rows", layout.pending_rows, p, np.int64), ("pending_seq", layout.pending_seq, p, np.int64),
            ("pending_free_rows", layout.pending_free_rows, None, np.uint32),
        ):
            if not isinstance(array, np.ndarray) or array.ndim != 1 or array.dtype != dtype or (
                length is not None and array.shape[0] != length
            ):
                got = f"{array.shape} {array.dtype}" if isinstance(array, np.ndarray) else type(array).__name__
                raise ValueError(f"state.layout.{name}: expected ({length or 'f'},) {np.dtype(dtype)}, got {got}")
        counts = (layout.num_rows, layout.pending_num_rows, layout.next_seq, layout.sweep_cursor,
                  layout.pending_sweep_cursor)
        if any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in counts):
            raise ValueError(f"state.layout: counters must be integers >= 0, got {counts}")
        if p and not (1 <= int(layout.pending_seq.min()) and int(layout.pending_seq.max()) < layout.next_seq):
            raise ValueError("state.layout.pending_seq: first-seen numbers must be in [1, next_seq)")
        return self._sampler(layout.rng, "state.layout.rng")

    def _sampler(self, state: dict, where: str) -> np.random.Generator:
        """The eviction sampler at `state` (its bit generator's state); ValueError naming `where`."""
        rng = np.random.default_rng(self.config.seed)
        try:
            rng.bit_generator.state = state
        except (TypeError, ValueError, KeyError) as exc:
            raise ValueError(f"{where}: not a {type(rng.bit_generator).__name__} state ({exc})") from None
        return rng

    def _laid_out_maps(self, rows: tuple, pending: tuple) -> tuple[native.HashMap, native.HashMap]:
        """New key and pending-key maps with another table's layout: each of `rows` and `pending` is
        (keys, their rows, rows handed out, free rows), as HashMap.restore takes them."""
        table_map = native.HashMap()
        table_map.reserve(max(rows[0].shape[0], self.config.expected_rows or 0))
        table_map.restore(*rows)
        pending_map = _pending_map(pending[0].shape[0])
        pending_map.restore(*pending)
        return table_map, pending_map

    def _load_laid_out_pending(self, state: TableState, layout: TableLayout, pending: native.HashMap) -> None:
        """The pending keys of `state` at their rows in `pending` (restored), first seen in the
        order of their numbers."""
        q = layout.pending_num_rows
        self._reset_pending(0)
        self._pending = pending
        rows = layout.pending_rows
        self._pending_meta = np.zeros((q, 2), dtype=np.uint32)
        self._pending_meta[rows, 0] = state.pending_counts
        self._pending_meta[rows, 1] = state.pending_last_step
        self._pending_keys = np.zeros(q, dtype=np.int64)
        self._pending_keys[rows] = state.pending_keys
        self._pending_seq = np.zeros(q, dtype=np.int64)
        self._pending_seq[rows] = layout.pending_seq
        order = np.argsort(layout.pending_seq, kind="stable")
        if order.shape[0]:
            self._pending_order.append((state.pending_keys[order].copy(), layout.pending_seq[order].copy()))
            self._pending_order_len = order.shape[0]
        self._next_seq = layout.next_seq
        self.version = int(state.version)
        self.step = int(state.step)
        excess = self._pending.size - self.config.admission.max_pending
        if excess > 0:  # a state of a table with a larger bound: the first seen go, as in a push
            self._drop_oldest_pending(excess)

    def _reset_pending(self, expected: int) -> None:
        self._pending = _pending_map(expected)
        self._pending_meta = np.zeros((0, 2), dtype=np.uint32)  # [count, last_step] per pending row
        self._pending_keys = np.zeros(0, dtype=np.int64)  # the key of each pending row
        self._pending_seq = np.zeros(0, dtype=np.int64)  # when each pending row was first seen; 0: free
        # (keys, seqs) chunks in first-seen order; entries of keys no longer pending (or pending
        # again, with a newer seq) are skipped when read and dropped by compaction.
        self._pending_order: deque[tuple[np.ndarray, np.ndarray]] = deque()
        self._pending_order_len = 0
        self._next_seq = 1

    # -- internals -------------------------------------------------------------------------

    def _check_grads(self, grads: np.ndarray | torch.Tensor, n: int) -> np.ndarray:
        torch = sys.modules.get("torch")  # not imported: grads cannot be a tensor
        if torch is not None and isinstance(grads, torch.Tensor):
            if grads.dtype != torch.float32:
                raise TypeError(f"grads: expected dtype float32, got {grads.dtype}")
            grads = grads.detach().cpu().numpy()
        if not isinstance(grads, np.ndarray):
            raise TypeError(f"grads: expected a numpy array or torch tensor, got {type(grads).__name__}")
        if grads.dtype != np.float32:
            raise TypeError(f"grads: expected dtype float32, got {grads.dtype}")
        if grads.shape != (n, self.dim):
            raise ValueError(f"grads: expected shape ({n}, {self.dim}) for {n} keys, got {grads.shape}")
        grads = np.ascontiguousarray(grads)
        native.check_gradients(grads, self.dim)
        return grads

    def _admission(
        self, unique_keys: np.ndarray, is_new: np.ndarray, sightings: np.ndarray, step: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """For the new keys: (admitted (m,) bool, pending row (m,) or -1, pending count (m,) uint32,
        the keys (s,) whose pending counts are past the TTL at `step`: they count from zero, as
        after the sweep that forgets them, and the caller erases them once the push cannot fail)."""
        new_keys = unique_keys[is_new]
        m = new_keys.shape[0]
        a = self.config.admission
        none = np.empty(0, dtype=np.int64)
        if a.kind == AdmissionKind.NONE or m == 0:
            return np.ones(m, dtype=bool), np.full(m, -1, dtype=np.int64), np.zeros(m, dtype=np.uint32), none
        pending_rows = self._pending.find(new_keys)
        stale_keys = none
        ttl = self.config.eviction.ttl_steps
        if ttl is not None:
            stale = pending_rows >= 0
            stale[stale] = step - self._pending_meta[pending_rows[stale], 1].astype(np.int64) > ttl
            stale_keys = new_keys[stale]
            pending_rows = np.where(stale, -1, pending_rows)
        before = np.zeros(m, dtype=np.uint32)
        known = pending_rows >= 0
        before[known] = self._pending_meta[pending_rows[known], 0]
        if a.kind == AdmissionKind.COUNT:
            admitted = before.astype(np.int64) + sightings[is_new] >= a.min_count
        else:
            # One deterministic coin per (seed, step, key, sightings so far): reproducible on any
            # shard (the trainer sends the step). Without the step, a key whose count was
            # forgotten (its TTL, max_pending) drew the coins it had lost again, and a key seen
            # less often than its TTL was admitted at its first sighting or never.
            seeded = np.array([(self.config.seed ^ (step << 20)) & 0x7FFFFFFFFFFFFFFF], dtype=np.int64)
            stream = np.int64(int(native.mix64(seeded)[0]) & 0x7FFFFFFFFFFFFFFF)
            salted = new_keys ^ np.int64(_ADMISSION_SALT) ^ (before.astype(np.int64) << np.int64(32))
            coin = native.mix64(salted ^ stream) >> np.uint64(11)
            admitted = coin.astype(np.float64) * (1.0 / 2**53) < a.probability
        return admitted, pending_rows, before, stale_keys

    def _make_room(self, num_new: int, protected_rows: np.ndarray, step: int, freed: int = 0) -> np.ndarray:
        """Evicts rows so that num_new more fit, beside the `freed` protected rows that leave after
        (a push's own expired rows); the evicted keys. CapacityError, changing nothing, when
        it cannot."""
        capacity = self.config.capacity
        if capacity is None or self.size - freed + num_new <= capacity:
            return np.empty(0, dtype=np.int64)
        need = self.size - freed + num_new - capacity
        policy = self.config.eviction.policy
        if policy == EvictionPolicy.NONE:
            # Rows past their TTL go first: the sweep that would drop them runs only after a push
            # that succeeded, so a full table whose every push brings a new key refused them all,
            # for good, however many of its rows had expired.
            expired = self._expired_keys(max(self.step, step), protected_rows)
            if expired.shape[0] < need:
                raise self._full_error(num_new, expired.shape[0])
            self._evict(expired)
            return expired
        at = max(self.step, step)
        if self.size > EXACT_SCAN_ROWS:
            victims = self._sampled_victims(need, protected_rows, policy, at)
            if victims is not None:
                self._evict(victims)
                return victims
        with self._hidden(protected_rows) as live:
            rows = np.flatnonzero(live[: self._map.num_rows])  # the map's rows, in row order, without a walk of it
        keys = self._row_keys[rows]
        if keys.shape[0] < need:
            raise self._too_few_victims_error(num_new, keys.shape[0])
        pushes, last_step = self._eviction_meta(rows, policy, at)
        victims = first_in_order(keys, pushes, last_step, need + capacity // _EVICTION_SLACK, policy)
        self._evict(victims)
        return victims

    def _eviction_meta(self, rows: np.ndarray, policy: EvictionPolicy, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(push counts, last steps) (n,) of rows (n,) as eviction ranks them at `step`: under LFU a
        row past its TTL counts no push (it reads as absent, and it went first only by its count:
        a trained row of fewer pushes went while it kept its place until the sweep). Under LRU
        such rows already come first, by their last step."""
        meta = self._gather_meta(rows)
        pushes, last_step = meta[:, 0], meta[:, 1]
        ttl = self.config.eviction.ttl_steps
        if ttl is not None and policy == EvictionPolicy.LFU:
            pushes = np.where(step - last_step.astype(np.int64) > ttl, np.uint32(0), pushes)
        return pushes, last_step

    def check_push(
        self, keys: np.ndarray, grads: np.ndarray, step: int | None = None, counts: np.ndarray | None = None
    ) -> None:
        """Raises what apply_gradients(keys, grads, step, counts) would raise, changing nothing
        (a PushBatch checks every part before it applies one)."""
        keys = native.as_keys(keys)
        self._check_grads(grads, keys.shape[0])
        step = self.version + 1 if step is None else step
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or not 0 <= step <= _MAX_STEP:
            raise ValueError(f"step: must be an integer in [0, 2^32 - 1], got {step!r}")
        if counts is not None:
            counts = native.as_keys(counts, "counts")
            if counts.shape[0] != keys.shape[0]:
                raise ValueError(f"counts: expected shape ({keys.shape[0]},), got {counts.shape}")
            native.check_counts(counts)
        self.check_room(keys, counts, int(step))

    def check_room(
        self, keys: np.ndarray, counts: np.ndarray | None, step: int, every_new_key: bool = False
    ) -> None:
        """Raises the CapacityError apply_gradients(keys, ..., step=step, counts=counts) would raise,
        changing nothing: push_tables checks every table of a multi-table push first, so that the
        push is all or nothing across its tables, as apply_gradients is within one. keys (n,)
        int64, counts (n,) int64 >= 1 or None, both checked by the caller; step checked too.
        every_new_key: count every new key as admitted (the most rows the keys could take)."""
        capacity = self.config.capacity
        if capacity is None:
            return
        if self.config.eviction.policy != EvictionPolicy.NONE and self.size >= keys.shape[0]:
            # Of u <= n unique keys, e exist: at most u - e rows must go, and size - e >= u - e rows
            # are not the push's own, so room is certain without the dedupe and probe below.
            return
        unique_keys, _, sightings = native.dedupe_sum(keys, None, counts, self.dim)
        rows = self._map.find(unique_keys)
        expired_own = self._expired_at(rows, step)
        is_new = (rows < 0) | expired_own
        if every_new_key:
            num_new = int(np.count_nonzero(is_new))
        else:
            admit_new, _, _, _ = self._admission(unique_keys, is_new, sightings, step)
            num_new = int(admit_new.sum())
        size = self.size - int(expired_own.sum())  # the push's own expired rows leave first
        if size + num_new <= capacity:
            return
        if self.config.eviction.policy == EvictionPolicy.NONE:
            expired = self._expired_keys(max(self.step, step), rows[rows >= 0])
            if size - expired.shape[0] + num_new > capacity:
                raise self._full_error(num_new, expired.shape[0])
            return
        evictable = size - int(np.count_nonzero(~is_new))  # a push's own rows are never evicted
        if evictable < size + num_new - capacity:
            raise self._too_few_victims_error(num_new, evictable)

    def _expired_keys(self, step: int, protected_rows: np.ndarray) -> np.ndarray:
        """Keys (e,) of the rows a TTL sweep at `step` would drop, but for protected_rows (a push's
        own); none without a TTL. A pass over the row index: only a full table without an eviction
        policy asks, instead of refusing a push."""
        if self.config.eviction.ttl_steps is None:
            return np.empty(0, dtype=np.int64)
        with self._hidden(protected_rows) as live:
            rows = np.flatnonzero(live[: self._map.num_rows])
        return self._expired_among(rows, step)

    def _full_error(self, num_new: int, expired: int = 0) -> CapacityError:
        ttl = self.config.eviction.ttl_steps
        past_ttl = "" if ttl is None else f", {expired} of them past ttl_steps {ttl}"
        return CapacityError(
            f"table {self.name} is full: {self.size} rows{past_ttl} + {num_new} new > capacity "
            f"{self.config.capacity}, and eviction.policy is 'none' (set 'lfu' or 'lru' to make room)"
        )

    def _too_few_victims_error(self, num_new: int, evictable: int) -> CapacityError:
        return CapacityError(
            f"table {self.name}: one push brings {num_new} new keys but only {evictable} rows "
            f"can be evicted (capacity {self.config.capacity})"
        )

    def _sampled_victims(
        self, need: int, protected_rows: np.ndarray, policy: EvictionPolicy, step: int
    ) -> np.ndarray | None:
        """The least recently (LRU) or least often (LFU) used rows of a random sample of
        max(4096, 16 * need) rows: the oldest sixteenth of its evictable rows, and at least `need`
        of them; None when the sample holds fewer than `need` evictable rows.

        Why more than `need`: reading the sample's rows is most of an evicting push's cost, and
        a push to a full table usually needs far fewer rows than a sixteenth of 4,096 (a few
        dozen for Zipf keys). Taking the sixteenth frees room for the next pushes, which then
        sample nothing, at the same sample-to-victim ratio a push that needs many rows gets;
        the table runs at most 256 rows below its capacity."""
        num_rows = self._map.num_rows
        sample = min(num_rows, max(_MIN_EVICTION_SAMPLE, _EVICTION_SAMPLE * need))
        rows = sorted_unique(self._rng.integers(0, num_rows, sample))
        with self._hidden(protected_rows) as live:
            rows = rows[live[rows]]
        if rows.shape[0] < need:
            return None
        pushes, last_step = self._eviction_meta(rows, policy, step)
        count = max(need, rows.shape[0] // _EVICTION_SAMPLE)
        return first_in_order(self._row_keys[rows], pushes, last_step, count, policy)

    @contextlib.contextmanager
    def _hidden(self, rows: np.ndarray) -> Iterator[np.ndarray]:
        """The row index's live flags (`_row_live`) with `rows` (live rows: a push's own) marked not
        live while the block runs: eviction reads its candidates as "live" in one pass, which costs
        O(candidates + rows) where np.isin sorted both."""
        live = self._row_live
        live[rows] = False
        try:
            yield live
        finally:
            live[rows] = True

    def _index_rows(self, keys: np.ndarray, rows: np.ndarray) -> None:
        """Records keys (n,) as the owners of rows (n,) (the row -> key index of sampling and sweeps)."""
        if not self._indexed:
            return
        num_rows = self._map.num_rows
        if num_rows > self._row_keys.shape[0]:
            size = max(16, num_rows, 2 * self._row_keys.shape[0])
            self._row_keys = np.concatenate([self._row_keys, np.zeros(size - self._row_keys.shape[0], np.int64)])
            self._row_live = np.concatenate([self._row_live, np.zeros(size - self._row_live.shape[0], np.bool_)])
        self._row_keys[rows] = keys
        self._row_live[rows] = True

    def _evict(self, keys: np.ndarray) -> None:
        if keys.shape[0]:
            freed = self._map.erase(keys)
            if self._indexed:
                self._row_live[freed[freed >= 0]] = False
            self.num_evicted += int(keys.shape[0])
            if self._changes is not None:
                self._changes.delete(keys)
            for feed in self._feeds:
                feed.delete(keys)

    def _expired_at(self, rows: np.ndarray, step: int) -> np.ndarray:
        """(n,) bool: which of rows (n,) (-1: no row) were last pushed more than ttl_steps before
        `step` (all False without a TTL). A lookup or push of that step takes them as absent."""
        ttl = self.config.eviction.ttl_steps
        if ttl is None:
            return np.zeros(rows.shape[0], dtype=np.bool_)
        last = self._gather_meta(rows)[:, 1]  # the rows -1 gather nothing (zeros): masked below
        return (rows >= 0) & (step - last.astype(np.int64) > ttl)

    def _live(self, rows: np.ndarray, step: int | None) -> np.ndarray:
        """rows (n,) with the rows expired at `step` as -1 (None: rows unchanged)."""
        if step is None or self.config.eviction.ttl_steps is None:
            return rows
        return np.where(self._expired_at(rows, step), -1, rows)

    def _gather_meta(self, rows: np.ndarray) -> np.ndarray:
        """rows (n,) -> (n, 2) uint32 [freq, last_step]."""
        return self._store.gather_host(rows, self.meta_col, 2).view(np.uint32)

    def _write_new_rows(self, keys: np.ndarray, rows: np.ndarray, freq: np.ndarray, step: int) -> None:
        """New rows of keys at rows: init value (encoded with rounding stream 2^32 + step, which
        is shard independent), initial optimizer state, freq, last_step = the table's step."""
        words = np.zeros((keys.shape[0], self.width), dtype=np.float32)
        if self._encoded:
            stream = _INIT_STREAM + step
            words[:, : self.value_words] = native.encode_words(
                self.storage, self.config.seed, keys, stream, self.init_values(keys)
            )
        else:
            words[:, : self.dim] = self.init_values(keys)
        state = optimizers.initial_state(self.config.optimizer, keys.shape[0], self.dim)
        words[:, self.value_words : self.meta_col] = state
        meta = words[:, self.meta_col :].view(np.uint32)
        meta[:, 0] = freq
        meta[:, 1] = self.step
        self._store.scatter(rows, 0, words)
        self._index_rows(keys, rows)

    def _update(self, keys: np.ndarray, rows: np.ndarray, sums: np.ndarray, sightings: np.ndarray, step: int) -> None:
        """One optimizer step on rows (u,) of keys (u,) with their summed gradients (u, dim)."""
        if rows.shape[0] == 0:
            return
        if self._encoded:
            native.apply_update_encoded(
                self._native_optimizer,
                self._hyper,
                self._store.block_addresses,
                self._store.block_shift,
                self.width,
                self._native_storage,
                self.dim,
                self.state_width,
                self.config.seed & 0xFFFFFFFFFFFFFFFF,
                keys,
                rows,
                sums,
                sightings,
                step,
            )
            return
        if self._use_native:
            native.apply_update(
                self._native_optimizer,
                self._hyper,
                self._store.block_addresses,
                self._store.block_shift,
                self.width,
                self.dim,
                self.state_width,
                rows,
                sums,
                sightings,
                step,
            )
            return
        import torch

        words = torch.as_tensor(self._store.gather(rows, 0, self.width))  # shares the CPU array
        grads = torch.from_numpy(sums).to(words.device)
        if self._fbgemm_key is not None:
            fbgemm_kernels.KERNELS.apply(self._fbgemm_key, [words], [grads])
        else:
            optimizers.apply_torch(self.config.optimizer, words[:, : self.meta_col], grads, self.dim)
        self._write_back(rows, words, sightings, step)

    def _write_back(self, rows: np.ndarray, words: torch.Tensor, sightings: np.ndarray, step: int) -> None:
        """Scatters updated words (u, width) of rows (u,) with freq += sightings, last_step =
        max(last_step, step): a stale push (async training) does not make a row look older."""
        import torch

        meta = words[:, self.meta_col :].view(torch.int32).to(torch.int64) & 0xFFFFFFFF
        freq = torch.clamp(meta[:, 0] + torch.from_numpy(sightings).to(words.device), max=_MAX_STEP)
        meta = torch.stack([freq, torch.clamp(meta[:, 1], min=step)], dim=1)
        meta = torch.where(meta >= 2**31, meta - 2**32, meta).to(torch.int32)
        words[:, self.meta_col :] = meta.view(torch.float32)
        self._store.scatter(rows, 0, words.numpy() if self._store.native else words)

    def _count_pending(self, keys: np.ndarray, sightings: np.ndarray, step: int) -> None:
        """Counts sightings (n,) of keys (n,) unique that wait for admission, within max_pending."""
        if keys.shape[0] == 0:
            return
        rows, inserted = self._pending.find_or_insert(keys)
        num_rows = self._pending.num_rows
        if num_rows > self._pending_meta.shape[0]:
            size = max(16, num_rows, 2 * self._pending_meta.shape[0])
            grow = size - self._pending_meta.shape[0]
            self._pending_meta = np.concatenate([self._pending_meta, np.zeros((grow, 2), np.uint32)])
            self._pending_keys = np.concatenate([self._pending_keys, np.zeros(grow, np.int64)])
            self._pending_seq = np.concatenate([self._pending_seq, np.zeros(grow, np.int64)])
        total = self._pending_meta[rows, 0].astype(np.int64) + sightings
        self._pending_meta[rows, 0] = np.minimum(total, _MAX_STEP).astype(np.uint32)
        # A stale push (an older step, async training) leaves a key's last sighting where it was.
        self._pending_meta[rows, 1] = np.where(inserted, step, np.maximum(self._pending_meta[rows, 1], step))
        if inserted.any():
            new_keys, new_rows = keys[inserted], rows[inserted]
            seqs = np.arange(self._next_seq, self._next_seq + new_keys.shape[0], dtype=np.int64)
            self._next_seq += new_keys.shape[0]
            self._pending_keys[new_rows] = new_keys
            self._pending_seq[new_rows] = seqs
            self._pending_order.append((new_keys, seqs))
            self._pending_order_len += new_keys.shape[0]
        excess = self._pending.size - self.config.admission.max_pending
        if excess > 0:
            self._drop_oldest_pending(excess)
        if self._pending_order_len > 2 * max(self._pending.size, _MIN_EVICTION_SAMPLE):
            self._compact_pending_order()

    def _live_pending(self, keys: np.ndarray, seqs: np.ndarray) -> np.ndarray:
        """Which first-seen entries (keys, seqs) still stand for a pending key: (n,) bool."""
        rows = self._pending.find(keys)
        live = rows >= 0
        live[live] = self._pending_seq[rows[live]] == seqs[live]
        return live

    def _drop_oldest_pending(self, excess: int) -> None:
        """Forgets the `excess` pending keys first seen longest ago."""
        dropped = 0
        while dropped < excess and self._pending_order:
            keys, seqs = self._pending_order.popleft()
            self._pending_order_len -= keys.shape[0]
            live = np.flatnonzero(self._live_pending(keys, seqs))
            take = live[: excess - dropped]
            if take.shape[0] < live.shape[0]:
                rest = slice(int(take[-1]) + 1 if take.shape[0] else 0, None)
                self._pending_order.appendleft((keys[rest], seqs[rest]))
                self._pending_order_len += keys[rest].shape[0]
            self._erase_pending(keys[take])
            dropped += take.shape[0]
        self.num_pending_dropped += dropped

    def _compact_pending_order(self) -> None:
        keys = np.concatenate([k for k, _ in self._pending_order])
        seqs = np.concatenate([q for _, q in self._pending_order])
        live = self._live_pending(keys, seqs)
        self._pending_order = deque([(keys[live], seqs[live])])
        self._pending_order_len = int(live.sum())

    def _erase_pending(self, keys: np.ndarray) -> None:
        if keys.shape[0]:
            rows = self._pending.erase(keys)
            rows = rows[rows >= 0]
            self._pending_meta[rows] = 0
            self._pending_seq[rows] = 0
