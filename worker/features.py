"""Feature encoding shared by every reader: categorical strings -> int64 keys, counts -> floats.

The categorical hash is fixed and part of the data contract (keys end up in PS tables and
snapshots, so changing it orphans every trained row):

    value(s)      = int(s, 16)                        if s is 1..16 hex digits (Criteo's format)
                  = first 8 bytes of blake2b(s) (LE)  otherwise (any other non-empty string)
    salt(f)       = mix64((f + 1) * 0x9E3779B97F4A7C15 mod 2^64)
    key(f, s)     = int64(mix64(value(s) XOR salt(f)))
    missing(f)    = int64(mix64(0xFFFFFFFFFFFFFFFF XOR salt(f)))   for the empty string

`mix64` is the splitmix64 finalizer (the same bijection as csrc/hash_map.h), so keys of one
feature are a bijection of the values and equal strings in different features get different
keys. The only value that shares the missing key is the literal "ffffffffffffffff".

The readers hash with `hash_columns` (C++, csrc/string_hash.h, straight from Arrow's buffers);
`hash_categorical` is the same hash in numpy, kept as the reference the tests compare it with.

Integer (count) features follow the DLRM convention: empty -> 0, then log(1 + max(x, 0)).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ps import native

GOLDEN_GAMMA = 0x9E3779B97F4A7C15
MISSING_VALUE = 0xFFFFFFFFFFFFFFFF
_MAX_HEX_DIGITS = 16

# Nibble value of each byte, -1 for bytes that are not hex digits.
_NIBBLE = np.full(256, -1, dtype=np.int64)
for _c, _v in zip(b"0123456789abcdef", range(16), strict=True):
    _NIBBLE[_c] = _v
for _c, _v in zip(b"ABCDEF", range(10, 16), strict=True):
    _NIBBLE[_c] = _v
_NIBBLE8 = np.where(_NIBBLE >= 0, _NIBBLE, 255).astype(np.uint8)  # the same, byte-wide: 255 = not hex


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer, elementwise: x (...) uint64 -> (...) uint64 (a bijection)."""
    x = np.asarray(x, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = x ^ (x >> np.uint64(30))
        x = x * np.uint64(0xBF58476D1CE4E5B9)
        x = x ^ (x >> np.uint64(27))
        x = x * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return x


def feature_salt(feature: int) -> np.uint64:
    """The per-feature salt mixed into every key of categorical feature `feature` (0-based)."""
    if feature < 0:
        raise ValueError(f"feature: must be >= 0, got {feature}")
    with np.errstate(over="ignore"):
        gamma = np.uint64(feature + 1) * np.uint64(GOLDEN_GAMMA)
    return mix64(np.array([gamma], dtype=np.uint64))[0]


def keys_from_values(values: np.ndarray, feature: int) -> np.ndarray:
    """Raw 64-bit values of one feature -> keys: values (n,) uint64 -> keys (n,) int64."""
    values = np.asarray(values, dtype=np.uint64)
    return mix64(values ^ feature_salt(feature)).view(np.int64)


def missing_key(feature: int) -> int:
    """The key an empty categorical field of feature `feature` maps to."""
    return int(keys_from_values(np.array([MISSING_VALUE], dtype=np.uint64), feature)[0])


def _string_buffers(strings: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """A string array's (offsets (n + 1,) int64, data bytes uint8), nulls read as empty strings."""
    if strings.null_count:
        strings = pc.fill_null(strings, "")
    if pa.types.is_large_string(strings.type):
        offset_type = np.int64
    elif pa.types.is_string(strings.type):
        offset_type = np.int32
    else:
        raise TypeError(f"strings: expected a pyarrow string array, got {strings.type}")
    _, offsets_buf, data_buf = strings.buffers()
    n = len(strings)
    offsets = np.frombuffer(
        offsets_buf, dtype=offset_type, count=n + 1, offset=strings.offset * np.dtype(offset_type).itemsize
    ).astype(np.int64)
    data = np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None else np.zeros(0, np.uint8)
    return offsets, data


def hash_categorical(strings: pa.Array | pa.ChunkedArray, feature: int) -> np.ndarray:
    """One categorical column -> keys: strings (n,) pyarrow string -> keys (n,) int64.

    Strings of 8 hex digits (Criteo's) take a byte-wide fast path; other hex strings are parsed
    with numpy gathers, not per row; only strings that are not 1..16 hex digits go through
    blake2b one by one. Nulls count as empty (missing).
    """
    if isinstance(strings, pa.ChunkedArray):
        strings = strings.combine_chunks() if strings.num_chunks != 1 else strings.chunk(0)
    offsets, data = _string_buffers(strings)
    n = offsets.shape[0] - 1
    starts = offsets[:-1]
    lengths = offsets[1:] - starts
    values = np.full(n, MISSING_VALUE, dtype=np.uint64)
    rest = lengths > 0
    eight = np.flatnonzero(lengths == 8)
    if eight.shape[0]:
        eight_values, is_hex = _hex8_values(data, starts[eight], contiguous=eight.shape[0] == n)
        values[eight[is_hex]] = eight_values[is_hex]
        rest[eight[is_hex]] = False
    others = np.flatnonzero(rest)
    if others.shape[0]:
        values[others] = _values(data, starts[others], lengths[others])
    return keys_from_values(values, feature)


def hash_columns(columns: Sequence[pa.Array | pa.ChunkedArray], features: Sequence[int]) -> np.ndarray:
    """Categorical columns -> keys (n, len(columns)) int64, column j hashed as feature features[j].

    One native call for every column, the GIL released: the strings are read where pyarrow put
    them (offsets + data buffers, no copy), and a dictionary column hashes its dictionary once and
    gathers by index. The same keys as `hash_categorical`. Columns are strings, large strings or
    dictionaries of them (string views are cast); nulls count as empty (missing).
    """
    if len(columns) != len(features):
        raise ValueError(f"features: expected one per column ({len(columns)}), got {len(features)}")
    arrays = [_single_array(column) for column in columns]
    lengths = {len(array) for array in arrays}
    if len(lengths) > 1:
        raise ValueError(f"columns: must have the same length, got {sorted(lengths)}")
    num_rows = lengths.pop() if lengths else 0
    parts = []
    for array, feature in zip(arrays, features, strict=True):
        if feature < 0:
            raise ValueError(f"feature: must be >= 0, got {feature}")
        name = f"C{feature + 1}"
        if pa.types.is_dictionary(array.type):
            offsets, data, validity, validity_offset = _string_parts(_plain_strings(array.dictionary, name))
            indices = array.indices
            index_validity, index_validity_offset = _validity(indices)
            index_type = indices.type
            if not pa.types.is_signed_integer(index_type):
                indices = indices.cast(pa.int64())
                index_type = indices.type
            width = index_type.bit_width // 8
            values = np.frombuffer(
                indices.buffers()[1], dtype=f"i{width}", count=len(indices), offset=indices.offset * width
            )
            parts.append(
                (feature, offsets, data, validity, validity_offset, values, index_validity, index_validity_offset)
            )
        else:
            offsets, data, validity, validity_offset = _string_parts(_plain_strings(array, name))
            parts.append((feature, offsets, data, validity, validity_offset, None, None, 0))
    return native.hash_string_columns(parts, num_rows)


def _single_array(column: pa.Array | pa.ChunkedArray) -> pa.Array:
    if isinstance(column, pa.ChunkedArray):
        return column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
    return column


def _plain_strings(array: pa.Array, name: str) -> pa.Array:
    """`array` as a string or large_string array (string views cast); TypeError naming the column otherwise."""
    if pa.types.is_string(array.type) or pa.types.is_large_string(array.type):
        return array
    if pa.types.is_string_view(array.type):
        return array.cast(pa.large_string())
    raise TypeError(f"{name}: categorical columns must be strings, got {array.type}")


def _validity(array: pa.Array) -> tuple[np.ndarray | None, int]:
    """(validity bitmap bytes uint8 or None when no row is null, bit offset of row 0)."""
    bitmap = array.buffers()[0]
    if not array.null_count or bitmap is None:
        return None, 0
    return np.frombuffer(bitmap, dtype=np.uint8), array.offset


def _string_parts(strings: pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, int]:
    """A string array's (offsets (n + 1,) int32/int64 from its offset on, data uint8, validity, bit offset), no copy."""
    offset_type = np.int64 if pa.types.is_large_string(strings.type) else np.int32
    _, offsets_buf, data_buf = strings.buffers()
    itemsize = np.dtype(offset_type).itemsize
    offsets = np.frombuffer(offsets_buf, dtype=offset_type, count=len(strings) + 1, offset=strings.offset * itemsize)
    data = np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None else np.zeros(0, np.uint8)
    validity, validity_offset = _validity(strings)
    return offsets, data, validity, validity_offset


def _hex8_values(data: np.ndarray, starts: np.ndarray, contiguous: bool) -> tuple[np.ndarray, np.ndarray]:
    """Strings of 8 bytes at `starts` (m,) -> (int(s, 16) (m,) uint64, is_hex (m,) bool)."""
    m = starts.shape[0]
    first = int(starts[0])
    if contiguous and first + 8 * m <= data.shape[0]:
        chars = data[first : first + 8 * m].reshape(m, 8)  # every string has 8 bytes: no gather
    else:
        chars = data[starts[:, None] + np.arange(8)]
    nibbles = _NIBBLE8[chars]
    is_hex = (nibbles < 16).all(axis=1)
    packed = (nibbles[:, 0::2] << 4) | (nibbles[:, 1::2] & 15)  # (m, 4) big-endian bytes
    return np.ascontiguousarray(packed).view(">u4").reshape(m).astype(np.uint64), is_hex


def _values(data: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """value(s) (see the module doc) of non-empty strings at starts (m,) with lengths (m,) -> (m,) uint64."""
    m = starts.shape[0]
    # Right-align each string in a (m, 16) window; column c holds hex digit weight 16^(15-c).
    cols = np.arange(_MAX_HEX_DIGITS, dtype=np.int64)
    pad = _MAX_HEX_DIGITS - np.minimum(lengths, _MAX_HEX_DIGITS)
    inside = cols[None, :] >= pad[:, None]
    pos = starts[:, None] + cols[None, :] - pad[:, None]
    if data.shape[0]:
        gathered = data[np.clip(pos, 0, data.shape[0] - 1)]
    else:
        gathered = np.zeros(pos.shape, dtype=np.uint8)
    nibbles = np.where(inside, _NIBBLE[gathered], 0)
    is_hex = (lengths <= _MAX_HEX_DIGITS) & (nibbles >= 0).all(axis=1)
    shifts = (4 * (_MAX_HEX_DIGITS - 1 - cols)).astype(np.uint64)
    values = np.bitwise_or.reduce(np.maximum(nibbles, 0).astype(np.uint64) << shifts[None, :], axis=1)
    values = values.astype(np.uint64, copy=False).reshape(m)
    for i in np.flatnonzero(~is_hex):
        raw = data[starts[i] : starts[i] + lengths[i]].tobytes()
        values[i] = np.uint64(int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "little"))
    return values


def transform_dense(counts: np.ndarray) -> np.ndarray:
    """DLRM's count transform: counts (...) float64 -> log(1 + max(x, 0)) (...) float32."""
    return np.log1p(np.maximum(np.asarray(counts, dtype=np.float64), 0.0)).astype(np.float32)


_COUNT_TABLE_SIZE = 1 << 16
_count_table: np.ndarray | None = None


def transform_counts(counts: np.ndarray) -> np.ndarray:
    """`transform_dense` of counts (n,) (integers, or floats), the same float32 values, faster.

    Whole counts in [0, 65536) are looked up in a table that `transform_dense` itself filled
    (a gather instead of a log1p per value); negatives give 0 as there; other values (large,
    fractional, NaN) go through `transform_dense`.
    """
    global _count_table
    if _count_table is None:
        _count_table = transform_dense(np.arange(_COUNT_TABLE_SIZE, dtype=np.float64))
    counts = np.asarray(counts)
    if counts.dtype.kind in "iu":
        index = np.clip(counts, 0, _COUNT_TABLE_SIZE - 1)
        out = _count_table[index]
        other = counts >= _COUNT_TABLE_SIZE
    else:
        counts = counts.astype(np.float64, copy=False)
        with np.errstate(invalid="ignore"):
            index = np.clip(counts, 0, _COUNT_TABLE_SIZE - 1).astype(np.intp)
        np.clip(index, 0, _COUNT_TABLE_SIZE - 1, out=index)  # NaN cast to an integer: some index, fixed below
        out = _count_table[index]
        other = (index != counts) & ~(counts < 0)  # large, fractional or NaN: not a whole count below the size
    if other.any():
        out[other] = transform_dense(counts[other])
    return out
