"""The one import point of the C++ core (`_embps_native`, built from csrc/ by the package build).

Every array that crosses into C++ is checked here for dtype, shape and contiguity, so the native
code only sees what it expects; native exceptions already arrive as ValueError/IndexError.
The C++ enums (initializer, optimizer) are bound as Python enums; `native_enum` maps the
config's StrEnums onto them by member name, so no integer code is written down in Python.
"""

from __future__ import annotations

from enum import Enum

import numpy as np

try:
    import _embps_native as _native
except ImportError as exc:  # pragma: no cover - only when the package was not built
    raise ImportError(
        "embps's C++ core `_embps_native` is not installed: build the package with "
        "`pip install .` (see README), a plain checkout on sys.path has no compiled module"
    ) from exc


Initializer = _native.Initializer
OptimizerKind = _native.OptimizerKind


def native_enum(native_type: type[Enum], value: Enum) -> Enum:
    """The member of the bound C++ enum `native_type` named like `value` (e.g. the config's
    OptimizerKind.ADAM -> the native OptimizerKind.ADAM); ValueError when C++ has no such member."""
    try:
        return native_type[value.name]
    except KeyError:
        raise ValueError(
            f"{type(value).__name__}.{value.name}: the C++ core has no {native_type.__name__} of that name "
            f"(it has {', '.join(m.name for m in native_type)}); rebuild the package after changing csrc/"
        ) from None


def as_keys(keys: object, name: str = "keys") -> np.ndarray:
    """Returns `keys` as a C-contiguous (n,) int64 numpy array, or raises TypeError/ValueError."""
    if hasattr(keys, "detach") and hasattr(keys, "cpu"):  # torch.Tensor
        keys = keys.detach().cpu().numpy()
    if not isinstance(keys, np.ndarray):
        raise TypeError(f"{name}: expected a numpy array or torch tensor of int64, got {type(keys).__name__}")
    if keys.dtype != np.int64:
        raise TypeError(f"{name}: expected dtype int64, got {keys.dtype}")
    if keys.ndim != 1:
        raise ValueError(f"{name}: expected shape (n,), got {keys.shape}")
    return np.ascontiguousarray(keys)


class HashMap:
    """int64 key -> int64 row slot, open addressing, rows allocated densely by the map.

    Rows of erased keys are reused (last freed first). The map is `sub_maps` sub-maps that grow
    one at a time, so no call rehashes the whole map (csrc/hash_map.h). Thread-safe: writers
    (find_or_insert, erase, clear, reserve, export) run one at a time, `find` runs alongside them
    without waiting for a rehash; every verb releases the GIL while it runs.
    """

    def __init__(self, initial_capacity: int = 0, sub_maps: int = 1024) -> None:
        """initial_capacity: slots to start with (0: allocate on first insert); sub_maps: a power
        of two in [1, 65536]; small maps in tests use few, so that growth happens in them."""
        if initial_capacity < 0:
            raise ValueError(f"initial_capacity: must be >= 0, got {initial_capacity}")
        self._map = _native.HashMap(initial_capacity, sub_maps)

    @property
    def size(self) -> int:
        """Number of live keys."""
        return self._map.size

    @property
    def num_rows(self) -> int:
        """Rows ever handed out: every live row is < num_rows."""
        return self._map.num_rows

    @property
    def memory_bytes(self) -> int:
        return self._map.memory_bytes

    def __len__(self) -> int:
        return self._map.size

    @property
    def capacity(self) -> int:
        """Slots allocated over all sub-maps."""
        return self._map.capacity

    @property
    def sub_maps(self) -> int:
        return self._map.sub_maps

    @property
    def rehashed(self) -> int:
        """Entries moved by growth since the map was made (each growth moves one sub-map's)."""
        return self._map.rehashed

    def reserve(self, num_keys: int) -> None:
        """Pre-sizes every sub-map so that num_keys keys fit without growth (keys spread by the
        hash: each sub-map gets room for its share plus 4 standard deviations)."""
        if num_keys < 0:
            raise ValueError(f"num_keys: must be >= 0, got {num_keys}")
        self._map.reserve(num_keys)

    def clear(self) -> None:
        self._map.clear()

    def find(self, keys: np.ndarray) -> np.ndarray:
        """keys (n,) int64 -> rows (n,) int64, -1 where a key is absent."""
        keys = as_keys(keys)
        rows = np.empty(keys.shape[0], dtype=np.int64)
        self._map.find(keys, rows)
        return rows

    def find_or_insert(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """keys (n,) int64 -> (rows (n,) int64, inserted (n,) bool).

        inserted[i] is True where this call created keys[i]'s row; a key repeated inside the
        batch is inserted at its first occurrence only.
        """
        keys = as_keys(keys)
        rows = np.empty(keys.shape[0], dtype=np.int64)
        inserted = np.empty(keys.shape[0], dtype=np.uint8)
        self._map.find_or_insert(keys, rows, inserted)
        return rows, inserted.view(np.bool_)

    def erase(self, keys: np.ndarray) -> np.ndarray:
        """Removes keys (absent ones are ignored); returns the freed rows (n,), -1 where absent."""
        keys = as_keys(keys)
        rows = np.empty(keys.shape[0], dtype=np.int64)
        self._map.erase(keys, rows)
        return rows

    def export(self) -> tuple[np.ndarray, np.ndarray]:
        """All live (keys (size,) int64, rows (size,) int64), in slot order."""
        while True:
            n = self._map.size
            keys = np.empty(n, dtype=np.int64)
            rows = np.empty(n, dtype=np.int64)
            try:
                self._map.export(keys, rows)
                return keys, rows
            except ValueError:
                if self._map.size == n:  # not a writer that changed the size meanwhile
                    raise


    def free_rows(self) -> np.ndarray:
        """Rows released by erase and not taken again, (f,) uint32, in the order new keys take
        them: the last one first. With export() it is the map's layout (see restore)."""
        while True:
            n = self._map.num_free_rows
            out = np.empty(n, dtype=np.uint32)
            try:
                self._map.export_free_rows(out)
                return out
            except ValueError:
                if self._map.num_free_rows == n:  # not a writer that changed the list meanwhile
                    raise

    def restore(self, keys: np.ndarray, rows: np.ndarray, num_rows: int, free_rows: np.ndarray) -> None:
        """Makes this empty map another's layout: keys (u,) int64 at rows (u,) int64 (its export()),
        rows [0, num_rows) handed out, free_rows (num_rows - u,) uint32 its free_rows(). Both maps
        then give the same rows to the same keys. ValueError (the map left empty) when the rows do
        not make such a layout: each row below num_rows live once or free once, keys distinct."""
        keys = as_keys(keys)
        rows = np.ascontiguousarray(rows, dtype=np.int64)
        free_rows = np.ascontiguousarray(free_rows, dtype=np.uint32)
        if num_rows < 0:
            raise ValueError(f"num_rows: must be >= 0, got {num_rows}")
        self._map.restore(keys, rows, num_rows, free_rows)

# The former single-array map (csrc/flat_hash_map.h): the yardstick of `embps bench table` only.
FlatHashMap = _native.FlatHashMap
prefault_threads = _native.prefault_threads  # arena threads started and not yet joined


def mix64(keys: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer of each key: keys (n,) int64 -> (n,) uint64."""
    keys = as_keys(keys)
    out = np.empty(keys.shape[0], dtype=np.uint64)
    _native.mix64(keys, out)
    return out


# The largest gradient magnitude a push may carry. A key's gradients in one push are summed (at
# most ~1.8e8 of them fit a 2 GiB message: a sum within 1.8e18), and Adagrad, Adam and FTRL square
# that sum, which stays below float32's largest value (3.4e38): no row or optimizer state turns
# infinite or NaN in one push. A gradient of 1e10 on an embedding is a diverged trainer, not a step.
MAX_GRADIENT = 1e10


def first_out_of_range(values: np.ndarray, limit: float) -> int:
    """Flat index of the first NaN, infinity or |value| > limit of values (float32, any shape; C
    order), or -1: one pass, nothing allocated, the GIL released."""
    return _native.first_out_of_range(np.ascontiguousarray(values, dtype=np.float32), limit)


# The most sightings one entry of a push may stand for: a key's counts summed over a push (at
# most ~2^28 entries) stay far from int64's overflow, which let INT64_MAX counts wrap to a negative
# sum and left the key unadmitted.
MAX_COUNT = 2**32 - 1


def check_counts(counts: np.ndarray) -> None:
    """ValueError unless every entry of counts (n,) int64 is in [1, MAX_COUNT]."""
    if counts.size and (counts.min() < 1 or counts.max() > MAX_COUNT):
        raise ValueError(f"counts: every entry must be in [1, {MAX_COUNT}]")


def first_bad_gradient(grads: np.ndarray) -> tuple[int, str] | None:
    """(flat index, what is wrong with it) of the first gradient that is NaN, infinite or beyond
    +-MAX_GRADIENT; None when every one is within the bound."""
    first_bad = first_out_of_range(grads, MAX_GRADIENT)
    if first_bad < 0:
        return None
    value = float(np.ascontiguousarray(grads).reshape(-1)[first_bad])
    return first_bad, "non-finite value" if not np.isfinite(value) else f"value {value:.3g} beyond +-{MAX_GRADIENT:g}"


def check_gradients(grads: np.ndarray, dim: int | None) -> None:
    """ValueError naming the row (of `dim` values; None: the flat position) of the first gradient
    that is NaN, infinite or beyond +-MAX_GRADIENT: the whole push is refused, so that one bad
    gradient cannot poison a row."""
    if (bad := first_bad_gradient(grads)) is None:
        return
    first_bad, what = bad
    where = f"row {first_bad // dim}" if dim else f"position {first_bad}"
    raise ValueError(
        f"grads: {what} in {where}; the whole push is rejected so that one bad gradient cannot poison a row"
    )


def first_foreign_key(keys: np.ndarray, buckets: np.ndarray, shard: int) -> int:
    """Index of the first key of keys (n,) int64 whose bucket (ps/sharding.py: mix64(key) masked to
    len(buckets), a power of two) buckets (int32) does not give to `shard`, or -1."""
    return _native.first_foreign_key(as_keys(keys), np.ascontiguousarray(buckets, dtype=np.int32), shard)


def init_values(seed: int, initializer: Enum, scale: float, keys: np.ndarray, dim: int) -> np.ndarray:
    """Deterministic initial rows: keys (n,) int64 -> (n, dim) float32 (formula in csrc/row_ops.h).

    initializer: a ps.table.config.Initializer (mapped by name) or a native Initializer.
    """
    keys = as_keys(keys)
    out = np.empty((keys.shape[0], dim), dtype=np.float32)
    _native.init_values(seed & 0xFFFFFFFFFFFFFFFF, native_enum(Initializer, initializer), scale, keys, out)
    return out


def dedupe_sum(
    keys: np.ndarray, grads: np.ndarray | None, weights: np.ndarray | None, dim: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sums grads of equal keys, first-occurrence order.

    keys (n,) int64, grads (n, dim) float32 or None, weights (n,) int64 or None ->
    unique_keys (u,), sums (u, dim) float32, counts (u,) int64 (summed weights, 1 each if None).
    """
    n = keys.shape[0]
    unique_keys = np.empty(n, dtype=np.int64)
    sums = np.empty((n, dim), dtype=np.float32)
    counts = np.empty(n, dtype=np.int64)
    u = _native.dedupe_sum(keys, grads, weights, unique_keys, sums, counts)
    return unique_keys[:u], sums[:u], counts[:u]


gather = _native.gather
scatter = _native.scatter
apply_update = _native.apply_update


Storage = _native.Storage
value_words = _native.value_words
gather_decode = _native.gather_decode
encode_scatter = _native.encode_scatter
apply_update_encoded = _native.apply_update_encoded
set_isa_limit = _native.set_isa_limit  # caps the row kernels' instruction set: 0, 1 (AVX2), 2 (AVX-512)
cpu_isa = _native.cpu_isa


def decode_words(storage: Enum, words: np.ndarray, dim: int) -> np.ndarray:
    """Raw value words (n, value_words) float32 of `storage` (a config Storage, mapped by name)
    -> values (n, dim) float32 (format in csrc/row_codec.h)."""
    words = np.ascontiguousarray(words, dtype=np.float32)
    out = np.empty((words.shape[0], dim), dtype=np.float32)
    _native.decode_words(native_enum(Storage, storage), words, out)
    return out


def encode_words(storage: Enum, seed: int, keys: np.ndarray, stream: int, values: np.ndarray) -> np.ndarray:
    """values (n, dim) float32 of keys (n,) -> raw value words (n, value_words) float32, rounded
    stochastically with the bits of (seed, key, stream) (csrc/row_codec.h)."""
    keys = as_keys(keys)
    native_storage = native_enum(Storage, storage)
    values = np.ascontiguousarray(values, dtype=np.float32)
    words = np.empty((keys.shape[0], value_words(native_storage, values.shape[1])), dtype=np.float32)
    _native.encode_words(native_storage, seed & 0xFFFFFFFFFFFFFFFF, keys, stream, values, words)
    return words

# Multi-table verbs (csrc/multi_table.h); ps/table/multi.py builds their per-table arguments.
lookup_multi = _native.lookup_multi
lookup_multi_reply = _native.lookup_multi_reply  # a serialised reply: header + the values as one field
push_multi = _native.push_multi


def unique_by_table(
    keys: np.ndarray, group: np.ndarray, num_groups: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One dedupe over every table of a batch: keys (b, f) int64, group (f,) int64 the table of
    each column -> unique (u,) table after table (first-occurrence order within a table),
    offsets (num_groups + 1,), inverse (b, f) positions into unique, counts (u,) occurrences."""
    keys = np.ascontiguousarray(keys, dtype=np.int64)
    b, f = keys.shape
    unique = np.empty(b * f, dtype=np.int64)
    counts = np.empty(b * f, dtype=np.int64)
    offsets = np.empty(num_groups + 1, dtype=np.int64)
    inverse = np.empty((b, f), dtype=np.int64)
    u = _native.unique_by_table(
        keys, np.ascontiguousarray(group, dtype=np.int64), num_groups, unique, offsets, inverse, counts
    )
    return unique[:u], offsets, inverse, counts[:u]


def unique_by_segment(keys: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One dedupe of ragged segments: keys (n,) int64, segment t at [offsets[t], offsets[t + 1])
    (offsets (g + 1,) from 0 to n) -> (unique (u,) segment after segment, each in first-occurrence
    order; unique_offsets (g + 1,); inverse (n,), each key's position among its own segment's
    distinct keys)."""
    keys = as_keys(keys)
    offsets = as_keys(offsets, "offsets")
    unique = np.empty(keys.shape[0], dtype=np.int64)
    unique_offsets = np.empty(offsets.shape[0], dtype=np.int64)
    inverse = np.empty(keys.shape[0], dtype=np.int64)
    u = _native.unique_by_segment(keys, offsets, unique, unique_offsets, inverse)
    return unique[:u], unique_offsets, inverse


def sum_by_table_key(
    keys: np.ndarray, tags: np.ndarray, rows: np.ndarray, num_groups: int, counts: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """Sums rows (m, w) float32 sharing (tag, key): keys (m,), tags (m,) in [0, num_groups) ->
    unique (u,) grouped by tag in tag order (first-occurrence order within a tag), sums (u, w)
    contiguous, offsets (num_groups + 1,), and the summed counts (u,) float32 of counts (m,)
    float32, or None without counts.

    rows and counts are read in place when each row's values are contiguous, whatever the
    strides between rows: columns of a wider buffer (what an all_to_all received) need no copy."""
    m, w = rows.shape
    if rows.dtype != np.float32 or (m > 0 and w > 1 and rows.strides[1] != rows.itemsize):
        rows = np.ascontiguousarray(rows, dtype=np.float32)
    unique = np.empty(m, dtype=np.int64)
    sums = np.empty((m, w), dtype=np.float32)
    offsets = np.empty(num_groups + 1, dtype=np.int64)
    count_sums = None
    if counts is not None:
        if counts.dtype != np.float32:
            counts = counts.astype(np.float32)
        count_sums = np.empty(m, dtype=np.float32)
    u = _native.sum_by_table_key(
        as_keys(keys), as_keys(tags, "tags"), rows, counts, num_groups, unique, sums, count_sums, offsets
    )
    return unique[:u], sums[:u], offsets, None if count_sums is None else count_sums[:u]


def hash_string_columns(columns: list[tuple], num_rows: int) -> np.ndarray:
    """Categorical keys of F string columns in one call (csrc/string_hash.h) -> (num_rows, F) int64.

    Each column is (feature, offsets, data, validity, validity_offset, indices, index_validity,
    index_validity_offset): Arrow buffers as numpy arrays (see csrc/string_hash_binding.h), which
    the C++ side checks (dtypes, lengths, offsets inside the data, indices inside the dictionary);
    worker/features.py::hash_columns builds them from pyarrow arrays.
    """
    out = np.empty((num_rows, len(columns)), dtype=np.int64)
    _native.hash_string_columns(columns, out)
    return out
