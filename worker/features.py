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

Integer (count) features follow the DLRM convention: empty -> 0, then log(1 + max(x, 0)).
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

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
