"""Bytes <-> numpy on the wire: little-endian layout, round trips and the checks on bad lengths."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ps import wire
from ps.rpc import ps_pb2


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(-(2**63), 2**63 - 1), max_size=100))
def test_keys_round_trip_as_little_endian_int64(keys):
    array = np.array(keys, dtype=np.int64)
    data = wire.encode_keys(array)
    assert data == b"".join(k.to_bytes(8, "little", signed=True) for k in keys)
    assert wire.decode_keys(data).tolist() == keys


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 20), st.integers(1, 9), st.integers(0, 2**32 - 1))
def test_values_round_trip_row_major(n, dim, seed):
    values = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    data = wire.encode_values(values, dim)
    assert len(data) == n * dim * 4
    assert data[:4] == (values[0, 0].astype("<f4").tobytes() if n else b"")
    assert np.array_equal(wire.decode_values(data, n, dim), values)


def test_encode_values_accepts_non_contiguous_input():
    values = np.arange(24, dtype=np.float32).reshape(4, 6)[:, ::2]
    assert np.array_equal(wire.decode_values(wire.encode_values(values, 3), 4, 3), values)


@pytest.mark.parametrize("length", [1, 7, 9, 15])
def test_key_bytes_not_a_multiple_of_8_are_refused(length):
    with pytest.raises(ValueError, match=f"keys: byte length {length} is not a multiple of 8"):
        wire.decode_keys(b"\0" * length)


def test_value_bytes_must_match_keys_and_dim():
    with pytest.raises(ValueError, match=r"grads: byte length 12 does not match 2 keys x dim 2"):
        wire.decode_values(b"\0" * 12, 2, 2, name="grads")


def test_unknown_dtype_is_refused():
    with pytest.raises(ValueError, match="dtype: unsupported dtype 7"):
        wire.decode_values(b"", 0, 4, dtype=7)
    assert wire.value_dtype(ps_pb2.DTYPE_UNSPECIFIED) == np.float32


def test_counts_empty_means_one_each_and_must_match_keys():
    assert wire.decode_counts(b"", 3) is None
    assert wire.decode_counts(wire.encode_keys(np.array([1, 2], dtype=np.int64)), 2).tolist() == [1, 2]
    with pytest.raises(ValueError, match="counts: 1 counts for 2 keys"):
        wire.decode_counts(wire.encode_keys(np.array([1], dtype=np.int64)), 2)


def test_encoders_check_dtype_and_shape():
    with pytest.raises(TypeError, match="keys: expected dtype int64"):
        wire.encode_keys(np.arange(3, dtype=np.int32))
    with pytest.raises(ValueError, match=r"values: expected shape \(n, 4\)"):
        wire.encode_values(np.zeros((2, 3), dtype=np.float32), 4)
    with pytest.raises(TypeError, match="values: expected dtype float32"):
        wire.encode_values(np.zeros((2, 4), dtype=np.float64), 4)


def test_dim_check_names_table_and_both_dims():
    wire.check_dim(8, 8, "user")
    with pytest.raises(ValueError, match="table 'user' has dim 8, the request says 4"):
        wire.check_dim(4, 8, "user")
