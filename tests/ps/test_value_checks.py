"""The shard's whole-buffer checks in C++ (csrc/value_checks.h) against numpy's answer."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ps import native
from ps.sharding import ShardMap


def numpy_first_out_of_range(values: np.ndarray, limit: float) -> int:
    flat = values.reshape(-1)
    bad = np.flatnonzero(~np.isfinite(flat) | (np.abs(flat) > np.float32(limit)))
    return int(bad[0]) if bad.size else -1


FINITE = float(np.finfo(np.float32).max)  # as a limit: every finite value passes


@given(
    n=st.integers(0, 5000),
    bad=st.lists(st.tuples(st.integers(0, 4999), st.sampled_from([np.nan, np.inf, -np.inf, -np.nan])), max_size=3),
)
def test_first_non_finite_is_numpys(n, bad):
    """With float32's largest value as the limit, exactly the NaNs and infinities are out of range."""
    values = np.random.default_rng(n).standard_normal(n).astype(np.float32)
    values[:: max(1, n // 7)] = np.finfo(np.float32).max  # the largest finite, and denormals, are finite
    values[1::11] = np.float32(1e-45)
    for position, value in bad:
        if position < n:
            values[position] = value
    assert native.first_out_of_range(values, FINITE) == numpy_first_out_of_range(values, FINITE)


@given(
    n=st.integers(0, 3000),
    limit=st.sampled_from([0.0, 1e-30, 1.0, 1e10, 3.0e38]),
    big=st.lists(st.tuples(st.integers(0, 2999), st.floats(width=32, allow_nan=True)), max_size=4),
)
def test_first_out_of_range_is_numpys(n, limit, big):
    values = (np.random.default_rng(n).standard_normal(n) * 10).astype(np.float32)
    for position, value in big:
        if position < n:
            values[position] = value
    assert native.first_out_of_range(values, limit) == numpy_first_out_of_range(values, limit)


def test_first_out_of_range_takes_only_a_finite_limit():
    for limit in (-1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="limit"):
            native.first_out_of_range(np.zeros(4, np.float32), limit)


def test_gradients_beyond_the_bound_are_refused_naming_the_row():
    grads = np.zeros((5, 4), np.float32)
    native.check_gradients(grads, 4)
    grads[3, 1] = -3e38  # finite, but its square overflows float32
    with pytest.raises(ValueError, match=r"value -3e\+38 beyond \+-1e\+10 in row 3"):
        native.check_gradients(grads, 4)
    grads[3, 1] = native.MAX_GRADIENT  # the bound itself is allowed
    native.check_gradients(grads, 4)
    grads[0, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite value in position 0"):
        native.check_gradients(grads, None)


def test_first_non_finite_reads_any_shape_in_c_order():
    values = np.zeros((300, 64), np.float32)
    assert native.first_out_of_range(values, FINITE) == -1
    values[257, 3] = np.inf
    values[299, 0] = np.nan
    assert native.first_out_of_range(values, FINITE) == 257 * 64 + 3
    assert native.first_out_of_range(values.T, FINITE) == 0 * 300 + 299  # a copy in C order first: [0, 299] comes first
    assert native.first_out_of_range(np.empty((0, 64), np.float32), FINITE) == -1


@given(st.integers(1, 8), st.integers(0, 2000), st.integers(0, 2**32))
def test_first_foreign_key_is_the_shard_maps(num_shards, n, seed):
    shard_map = ShardMap.uniform(num_shards)
    keys = np.random.default_rng(seed).integers(-(2**63), 2**63 - 1, n, dtype=np.int64, endpoint=True)
    for shard in range(num_shards):
        foreign = np.flatnonzero(shard_map.shard_of(keys) != shard)
        expected = int(foreign[0]) if foreign.size else -1
        assert native.first_foreign_key(keys, shard_map.buckets, shard) == expected
        own = keys[shard_map.shard_of(keys) == shard]
        assert native.first_foreign_key(own, shard_map.buckets, shard) == -1


def test_first_foreign_key_refuses_a_bucket_table_that_is_no_power_of_two():
    with pytest.raises(ValueError, match="buckets: expected a power-of-two length, got 3"):
        native.first_foreign_key(np.arange(4), np.zeros(3, np.int32), 0)


def test_counts_out_of_range_are_refused():
    native.check_counts(np.array([1, native.MAX_COUNT], np.int64))
    for bad in ([0], [-1], [native.MAX_COUNT + 1], [np.iinfo(np.int64).max]):
        with pytest.raises(ValueError, match=r"counts: every entry must be in \[1, 4294967295\]"):
            native.check_counts(np.array(bad, np.int64))
