"""Bulk arrays on the wire: raw little-endian bytes <-> numpy, checked on the way in.

Layout (also written in proto/embps/ps.proto):

    keys   (n,)      int64    8 bytes per key, little-endian
    values (n, dim)  float32  row-major, little-endian, no padding; row i belongs to keys[i]
    counts (n,)      int64    little-endian

Decoding never copies: it returns read-only views over the message's bytes. Every check
raises ValueError/TypeError naming the field, which the server turns into INVALID_ARGUMENT.
"""

from __future__ import annotations

import sys

import numpy as np

from ps.rpc import ps_pb2

KEY_DTYPE = np.dtype("<i8")
VALUE_DTYPE = np.dtype("<f4")
_VALUE_DTYPES = {ps_pb2.DTYPE_UNSPECIFIED: VALUE_DTYPE, ps_pb2.FLOAT32: VALUE_DTYPE}
_NATIVE_LITTLE = sys.byteorder == "little"


# The bulk bytes fields of a push request (Push, PushMulti), read where they arrived (ps/bulk_messages.py).
PUSH_BULK_FIELDS = ("keys", "grads", "counts")

# Flow control of the channels that carry bulk messages (lookups' rows, pushes' gradients): a
# fixed per-stream window of BULK_WINDOW_BYTES on the receiving side, instead of gRPC's default,
# which starts at 64 KiB and moves the window by BDP probes. On loopback (2.2 MB messages, 400
# calls a run, 4 runs, 2026-12-05), with the default the receiver's CPU per message moved between
# runs from 0.9 to 3.9 ms (a reply, on a blocking client) and from 1.7 to 4.1 ms (a request, on
# a grpc.aio server), as the probes settled on one window or another; with a fixed 16 MiB window
# 0.9-1.2 and 1.3-1.4 ms in every run. Either side sets it for what it receives.
BULK_WINDOW_BYTES = 16 << 20
BULK_CHANNEL_OPTIONS = (("grpc.http2.lookahead_bytes", BULK_WINDOW_BYTES), ("grpc.http2.bdp_probe", 0))

# Call metadata (client -> paired shard) and reply trailing metadata (paired shard -> client): the
# newest epoch of the shard's membership each side has seen (DESIGN.md section 10), and the lineage of
# that epoch (ps/shard/arbiter.py): epochs compare only within one lineage.
EPOCH_METADATA_KEY = "embps-epoch"
LINEAGE_METADATA_KEY = "embps-lineage"
# The lineage a client sends for an epoch of a record without one (written before lineages): not a
# lineage id (those are alphanumeric). A call with no lineage key is an older client's.
NO_LINEAGE = "-"
# Trailing metadata of a shard's refusal of a snapshot round while its files of an earlier step are
# still being written (ps.errors.SnapshotWriteRunningError): that step, in decimal.
WRITING_STEP_METADATA_KEY = "embps-writing-step"

# Parts of one LookupBatch / PushBatch. Each costs the shard ~10-30 us of Python whatever its size,
# so 250,000 empty parts in 2.5 MB held its event loop for 7 s; many tables travel in one
# LookupMulti / PushMulti instead, with no such cost per table.
MAX_BATCH_PARTS = 1024
# What a shard counts a part as when it decides whether a call runs on its event loop or its
# tables thread (ps/shard/server.py run): a part's fixed cost in bytes of work.
BATCH_PART_WORK_BYTES = 64 << 10


def encode_keys(keys: np.ndarray) -> bytes:
    """keys (n,) int64 -> n * 8 bytes, little-endian."""
    return keys_buffer(keys).tobytes()


def keys_buffer(keys: np.ndarray, name: str = "keys") -> np.ndarray:
    """encode_keys' bytes without the copy: keys (n,) int64 as a C-contiguous little-endian array
    (the same array when it is one already), for ps/bulk_messages.py."""
    keys = np.asarray(keys)
    if keys.dtype != np.int64:
        raise TypeError(f"{name}: expected dtype int64, got {keys.dtype}")
    if keys.ndim != 1:
        raise ValueError(f"{name}: expected shape (n,), got {keys.shape}")
    return np.ascontiguousarray(keys, dtype=KEY_DTYPE)


def encode_values(values: np.ndarray, dim: int, name: str = "values") -> bytes:
    """values (n, dim) float32 -> n * dim * 4 bytes, row-major, little-endian."""
    values = np.asarray(values)
    if values.ndim != 2 or values.shape[1] != dim:
        raise ValueError(f"{name}: expected shape (n, {dim}), got {values.shape}")
    return values_buffer(values, name).tobytes()


FLOAT16_MAX = 65504.0  # the largest finite binary16


def to_float16(values: np.ndarray) -> np.ndarray:
    """float32 values -> float16, as a float16 table stores them (csrc/row_codec.h): a finite value
    beyond the range saturates at +-65504, where numpy's astype made it +-inf; inf and NaN stay."""
    values = np.asarray(values, dtype=np.float32)
    beyond = np.isfinite(values) & (np.abs(values) > FLOAT16_MAX)
    if beyond.any():
        values = np.where(beyond, np.copysign(np.float32(FLOAT16_MAX), values), values)
    return values.astype(np.float16)


def values_buffer(values: np.ndarray, name: str = "values") -> np.ndarray:
    """float32 values of any shape as a C-contiguous little-endian array (the same array when it is
    one already): their bytes as encode_values writes them, for ps/bulk_messages.py."""
    values = np.asarray(values)
    if values.dtype != np.float32:
        raise TypeError(f"{name}: expected dtype float32, got {values.dtype}")
    return np.ascontiguousarray(values, dtype=VALUE_DTYPE)


def decode_keys(data: bytes, name: str = "keys") -> np.ndarray:
    """n * 8 bytes -> keys (n,) int64 (a read-only view in native byte order)."""
    if len(data) % KEY_DTYPE.itemsize:
        raise ValueError(
            f"{name}: byte length {len(data)} is not a multiple of 8; keys travel as little-endian int64"
        )
    keys = np.frombuffer(data, dtype=KEY_DTYPE)
    return keys if _NATIVE_LITTLE else keys.astype(np.int64)


def check_dim(dim: int, table_dim: int, table: str) -> None:
    """Raises ValueError unless the dim a request carries equals the table's."""
    if dim != table_dim:
        raise ValueError(f"dim: table {table!r} has dim {table_dim}, the request says {dim}")


def value_dtype(dtype: int, name: str = "dtype") -> np.dtype:
    """The numpy dtype of a wire DType; only float32 is accepted."""
    if dtype not in _VALUE_DTYPES:
        known = ", ".join(ps_pb2.DType.Name(d) for d in _VALUE_DTYPES if d)
        raise ValueError(f"{name}: unsupported dtype {dtype}; supported: {known}")
    return _VALUE_DTYPES[dtype]


def decode_values(data: bytes, n: int, dim: int, dtype: int = ps_pb2.FLOAT32, name: str = "values") -> np.ndarray:
    """n * dim * itemsize bytes -> values (n, dim) float32 (a read-only view in native byte order)."""
    wire_dtype = value_dtype(dtype)
    expected = n * dim * wire_dtype.itemsize
    if len(data) != expected:
        raise ValueError(
            f"{name}: byte length {len(data)} does not match {n} keys x dim {dim} x "
            f"{wire_dtype.itemsize} bytes = {expected}"
        )
    values = np.frombuffer(data, dtype=wire_dtype).reshape(n, dim)
    return values if _NATIVE_LITTLE else values.astype(np.float32)


# Subscribe rows in a table's stored form (SubscribeRequest.stored_rows, proto/embps/ps.proto).
STORED_DTYPES = {"float32": ps_pb2.FLOAT32, "float16": ps_pb2.FLOAT16, "int8": ps_pb2.INT8_ROWWISE}
_STORAGE_OF_DTYPE = {ps_pb2.DTYPE_UNSPECIFIED: "float32", **{d: s for s, d in STORED_DTYPES.items()}}


def stored_row_bytes(storage: str, dim: int) -> int:
    """Bytes of one row of `storage` on the wire: float32 4 dim, float16 2 dim, int8 8 + the
    codes padded to a multiple of 4 (csrc/row_codec.h)."""
    return {"float32": 4 * dim, "float16": 2 * dim, "int8": 8 + (dim + 3) // 4 * 4}[storage]


def encode_stored_rows(words: np.ndarray, storage: str, dim: int) -> np.ndarray:
    """A table's stored rows (n, value_words) float32 words -> (n, stored_row_bytes) uint8, the
    wire form of each row (float16: the halves without an odd dim's padding half)."""
    raw = np.ascontiguousarray(words, dtype=np.float32).view(np.uint8)
    return raw[:, : stored_row_bytes(storage, dim)]


def decode_stored_rows(data: bytes, n: int, dim: int, dtype: int, name: str = "values") -> tuple[str, np.ndarray]:
    """The values of an UpdateBatch in dtype -> (storage, rows): float32 (n, dim) float32,
    float16 (n, dim) float16, int8 (n, 2 + ceil(dim / 4)) float32 words as csrc/row_codec.h
    keeps them. Read-only views in native byte order."""
    storage = _STORAGE_OF_DTYPE.get(dtype)
    if storage is None:
        known = ", ".join(ps_pb2.DType.Name(d) for d in STORED_DTYPES.values())
        raise ValueError(f"dtype: unsupported dtype {dtype} for rows; supported: {known}")
    row_bytes = stored_row_bytes(storage, dim)
    if len(data) != n * row_bytes:
        raise ValueError(
            f"{name}: byte length {len(data)} does not match {n} keys x {row_bytes} bytes "
            f"of a {storage} row of dim {dim}"
        )
    if storage == "float32":
        return storage, decode_values(data, n, dim, ps_pb2.FLOAT32, name)
    if storage == "float16":
        rows = np.frombuffer(data, dtype=np.dtype("<f2")).reshape(n, dim)
        return storage, rows if _NATIVE_LITTLE else rows.astype(np.float16)
    rows = np.frombuffer(data, dtype=VALUE_DTYPE).reshape(n, row_bytes // 4)
    return storage, rows if _NATIVE_LITTLE else rows.astype(np.float32)


def decode_counts(data: bytes, n: int, name: str = "counts") -> np.ndarray | None:
    """Empty -> None (one sighting each); else n * 8 bytes -> counts (n,) int64."""
    if not data:
        return None
    counts = decode_keys(data, name)
    if counts.shape[0] != n:
        raise ValueError(f"{name}: {counts.shape[0]} counts for {n} keys")
    return counts


def check_multi_shape(request, max_tables: int) -> None:
    """ValueError unless a LookupMulti / PushMulti names at most `max_tables` tables with one dim
    each and one offset more: checked from the repeated fields' lengths alone, before any of them
    is read. A request of no tables and 64M offsets (61 MiB, under the message limit) held a shard's
    event loop 10-15 s and grew it by 2.6 GB while they were turned into arrays, before their count
    was checked."""
    tables = len(request.tables)
    if tables > max_tables:
        raise ValueError(f"tables: at most {max_tables} tables in one request, got {tables}")
    if len(request.dims) != tables:
        raise ValueError(f"dims: {len(request.dims)} dims for {tables} tables")
    if len(request.offsets) != tables + 1:
        raise ValueError(f"offsets: expected {tables + 1} offsets for {tables} tables, got {len(request.offsets)}")


def decode_offsets(offsets, num_tables: int, num_keys: int, name: str = "offsets") -> np.ndarray:
    """A multi-table request's (T + 1,) key offsets, checked: 0 first, non-decreasing, num_keys last."""
    if len(offsets) != num_tables + 1:  # before they are read: 64M offsets took the loop 15 s and 2.6 GB
        raise ValueError(f"{name}: expected {num_tables + 1} offsets for {num_tables} tables, got {len(offsets)}")
    wide = np.array(list(offsets), dtype=np.uint64)
    out = np.minimum(wide, np.uint64(num_keys + 1)).astype(np.int64)
    if out[0] != 0 or out[-1] != num_keys or (np.diff(out) < 0).any():
        raise ValueError(f"{name}: must go from 0 to the number of keys ({num_keys}) without decreasing")
    return out
