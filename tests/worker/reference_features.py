"""Plain-Python reference of the feature encoding in worker/features.py, one value at a time."""

from __future__ import annotations

import hashlib
import math

import numpy as np

from worker.batch import Batch

MASK = (1 << 64) - 1


def mix64(x: int) -> int:
    x &= MASK
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & MASK
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & MASK
    x ^= x >> 31
    return x


def to_int64(x: int) -> int:
    return x - (1 << 64) if x >= 1 << 63 else x


def key(feature: int, text: str | bytes) -> int:
    """text: a str is its UTF-8 bytes; bytes (which need not be UTF-8) are taken as they are."""
    salt = mix64(((feature + 1) * 0x9E3779B97F4A7C15) & MASK)
    raw = text.encode() if isinstance(text, str) else text
    if raw == b"":
        value = MASK
    elif len(raw) <= 16 and all(c in b"0123456789abcdefABCDEF" for c in raw):
        value = int(raw, 16)
    else:
        value = int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "little")
    return to_int64(mix64(value ^ salt))


def dense(text: str | bytes) -> float:
    return math.log1p(max(int(text), 0)) if text else 0.0


def batch_of_rows(rows: list[list[str]] | list[list[bytes]], num_dense: int) -> Batch:
    """Criteo rows (label, I*, C* as strings or bytes) -> the Batch a reader must produce for them."""
    return Batch.from_numpy(
        dense=np.array([[dense(t) for t in row[1 : 1 + num_dense]] for row in rows], dtype=np.float32).reshape(
            len(rows), num_dense
        ),
        sparse=np.array([[key(f, t) for f, t in enumerate(row[1 + num_dense :])] for row in rows], dtype=np.int64),
        labels=np.array([float(row[0]) for row in rows], dtype=np.float32),
    )


def assert_batches_equal(actual: Batch, expected: Batch) -> None:
    assert actual.batch_size == expected.batch_size
    np.testing.assert_array_equal(actual.sparse, expected.sparse)
    np.testing.assert_allclose(actual.dense.numpy(), expected.dense.numpy(), rtol=1e-6)
    np.testing.assert_array_equal(actual.labels.numpy(), expected.labels.numpy())


def global_batches(make_reader, world_size: int) -> list[Batch]:
    """The global batches W ranks train on: batch b = concat over ranks of each rank's local batch b,
    as many as the shortest rank has (worker/readers.py). make_reader(rank) -> that rank's reader;
    a pure function of the file list, the seed, W and the epochs, since every share is."""
    locals_ = [list(make_reader(rank)) for rank in range(world_size)]
    count = min(len(batches) for batches in locals_)
    return [Batch.cat([batches[b] for batches in locals_]) for b in range(count)]


def rows_of(batch: Batch) -> list[tuple]:
    """The rows of a batch as sortable tuples (keys, label), to compare multisets of rows."""
    return sorted(zip(map(tuple, batch.sparse.tolist()), batch.labels.tolist(), strict=True))
