"""shard_of: splitmix64 -> 2^16 buckets -> bucket table, against a pure-Python reference."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ps.sharding import NUM_BUCKETS, ShardMap, bucket_of, shard_of

M64 = (1 << 64) - 1
int64s = st.integers(-(2**63), 2**63 - 1)


def splitmix64_finalizer(key: int) -> int:
    x = key & M64
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & M64
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & M64
    return x ^ (x >> 31)


@settings(max_examples=200, deadline=None)
@given(st.lists(int64s, max_size=50))
def test_buckets_match_the_reference_mix(keys):
    keys = np.array(keys, dtype=np.int64)
    expected = [splitmix64_finalizer(int(k)) & 0xFFFF for k in keys]
    assert bucket_of(keys).tolist() == expected


def test_pinned_assignments_never_change():
    # Changing these moves keys between shards of a running job: a resharding, not a refactor.
    keys = np.array([0, 1, -1, 2**63 - 1, -(2**63), 12345], dtype=np.int64)
    assert bucket_of(keys).tolist() == [0, 1509, 48507, 57021, 43402, 56657]
    assert shard_of(keys, 2).tolist() == [0, 0, 1, 1, 1, 1]
    assert shard_of(keys, 3).tolist() == [0, 0, 2, 2, 1, 2]


@pytest.mark.parametrize("num_shards", [1, 2, 3, 7, 16])
def test_uniform_map_balances_sequential_and_random_keys(num_shards):
    rng = np.random.default_rng(num_shards)
    for keys in (np.arange(200_000, dtype=np.int64), rng.integers(-(2**63), 2**63 - 1, 200_000, dtype=np.int64)):
        counts = np.bincount(shard_of(keys, num_shards), minlength=num_shards)
        assert counts.shape == (num_shards,)
        expected = keys.shape[0] / num_shards
        assert np.all(np.abs(counts - expected) < 0.03 * expected + 50), counts


def test_uniform_map_uses_contiguous_equal_bucket_ranges():
    m = ShardMap.uniform(3)
    assert m.buckets.shape == (NUM_BUCKETS,)
    assert np.all(np.diff(m.buckets) >= 0)
    assert np.bincount(m.buckets).tolist() == [21846, 21845, 21845]


def test_from_ranges_moves_whole_buckets():
    keys = np.arange(10_000, dtype=np.int64)
    moved = ShardMap.from_ranges(2, [[0, 100, 1], [100, 32768, 0], [32768, 65536, 1]])
    base = ShardMap.uniform(2)
    changed = moved.shard_of(keys) != base.shard_of(keys)
    assert changed.any()
    assert np.all(bucket_of(keys[changed]) < 100)


@pytest.mark.parametrize(
    "ranges, message",
    [
        ([[0, 65536, 2]], r"\[0\]: shard must be in \[0, 2\)"),
        ([[0, 100, 0], [101, 65536, 1]], r"\[1\]: ranges must cover"),
        ([[0, 100, 0]], "ranges end at 100"),
        ([[0, 100]], r"\[0\]: must be \[start, stop, shard\]"),
    ],
)
def test_from_ranges_rejects_bad_tables(ranges, message):
    with pytest.raises(ValueError, match=message):
        ShardMap.from_ranges(2, ranges)


@settings(max_examples=50, deadline=None)
@given(st.lists(int64s, max_size=200), st.integers(1, 5))
def test_split_partitions_positions_by_owner(keys, num_shards):
    keys = np.array(keys, dtype=np.int64)
    m = ShardMap.uniform(num_shards)
    parts = m.split(keys)
    assert len(parts) == num_shards
    assert sorted(np.concatenate(parts).tolist()) == list(range(keys.shape[0]))
    owners = m.shard_of(keys)
    for shard, positions in enumerate(parts):
        assert np.all(owners[positions] == shard)
        assert np.all(np.diff(positions) > 0), "positions keep the caller's order"


def test_owner_rank_is_shard_modulo_world_size():
    keys = np.random.default_rng(0).integers(-(2**63), 2**63 - 1, 5000, dtype=np.int64)
    m = ShardMap.uniform(4)
    assert np.array_equal(m.owner_rank(keys, 2), m.shard_of(keys) % 2)
    assert np.array_equal(m.owner_rank(keys, 4), m.shard_of(keys))
