"""Native categorical hashing (csrc/string_hash.h) and the count table, bit-equal to the numpy reference."""

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ps import native
from tests.worker.reference_features import key
from worker.features import hash_categorical, hash_columns, transform_counts, transform_dense

STRINGS = st.lists(
    st.one_of(
        st.none(),
        st.text(alphabet="0123456789abcdefABCDEF", max_size=18),
        st.text(max_size=12),
        st.text(alphabet="xyz", min_size=120, max_size=300),  # blake2b over more than one 128-byte block
    ),
    max_size=40,
)


def reference(strings: pa.Array, feature: int) -> np.ndarray:
    return hash_categorical(strings.cast(pa.string()) if pa.types.is_large_string(strings.type) else strings, feature)


@settings(max_examples=80, deadline=None)
@given(STRINGS, st.integers(0, 40), st.integers(0, 3), st.sampled_from(["string", "large_string", "dictionary"]))
def test_native_keys_equal_the_numpy_reference(strings, feature, cut, kind):
    column = pa.array(strings, type=pa.large_string() if kind == "large_string" else pa.string())
    plain = column.slice(min(cut, len(column)))  # an array offset: buffers are read from it
    expected = reference(plain, feature)
    if kind == "dictionary":
        plain = plain.dictionary_encode()
    keys = hash_columns([plain], [feature])
    assert keys.shape == (len(plain), 1)
    np.testing.assert_array_equal(keys[:, 0], expected)


def test_every_kind_of_column_in_one_call():
    values = ["68fd1e64", "DEADBEEF", "", None, "abc", "ffffffffffffffff", "1" * 17, "naïve", "x" * 128, "y" * 129]
    strings = pa.array(values)
    # A dictionary whose own entries include a null, and null indices, and an offset slice of each.
    dictionary = pa.DictionaryArray.from_arrays(
        pa.array([0, 1, None, 2, 3, 1, 0, None, 4, 2], pa.int8()), pa.array(["0000000a", None, "zz", "", "FFFF"])
    )
    columns = [strings, strings.cast(pa.large_string()), dictionary, pa.chunked_array([strings[:4], strings[4:]])]
    keys = hash_columns(columns, [0, 3, 5, 7])
    assert keys[:, 0].tolist() == [key(0, v or "") for v in values]
    assert keys[:, 1].tolist() == [key(3, v or "") for v in values]
    assert keys[:, 2].tolist() == [key(5, v or "") for v in dictionary.dictionary_decode().to_pylist()]
    np.testing.assert_array_equal(keys[:, 3], hash_categorical(strings, 7))
    sliced = hash_columns([strings.slice(3), dictionary.slice(3)], [1, 2])
    np.testing.assert_array_equal(sliced[:, 0], hash_categorical(strings.slice(3), 1))
    np.testing.assert_array_equal(sliced[:, 1], hash_categorical(dictionary.dictionary_decode().slice(3), 2))
    assert hash_columns([], []).shape == (0, 0)


def test_bad_columns_are_refused_with_a_message():
    with pytest.raises(TypeError, match="C3: categorical columns must be strings"):
        hash_columns([pa.array([1, 2])], [2])
    with pytest.raises(ValueError, match="same length"):
        hash_columns([pa.array(["a"]), pa.array(["a", "b"])], [0, 1])
    data = np.frombuffer(b"abcdef", dtype=np.uint8)
    beyond = (0, np.array([0, 3, 9], np.int32), data, None, 0, None, None, 0)  # the last string ends past the data
    with pytest.raises(ValueError, match="column 0: string offsets outside the data buffer"):
        native.hash_string_columns([beyond], 2)
    backwards = (0, np.array([0, 4, 2], np.int32), data, None, 0, None, None, 0)
    with pytest.raises(ValueError, match="decrease"):
        native.hash_string_columns([backwards], 2)
    dictionary = (0, np.array([0, 3, 6], np.int64), data, None, 0, np.array([1, 2], np.int32), None, 0)
    with pytest.raises(IndexError, match="dictionary index 2 outside a dictionary of 2"):
        native.hash_string_columns([dictionary], 2)
    with pytest.raises(ValueError, match="validity bitmap shorter"):
        short = (0, np.array([0, 3, 6], np.int32), data, np.zeros(0, np.uint8), 0, None, None, 0)
        native.hash_string_columns([short], 2)
    with pytest.raises(ValueError, match="offsets must be int32 or int64"):
        native.hash_string_columns([(0, np.array([0, 3, 6], np.uint16), data, None, 0, None, None, 0)], 2)


def test_count_table_equals_transform_dense():
    ints = np.concatenate([np.arange(-5, 70_000), [2**31, 2**40, -(2**40)]]).astype(np.int64)
    np.testing.assert_array_equal(transform_counts(ints), transform_dense(ints.astype(np.float64)))
    np.testing.assert_array_equal(transform_counts(ints.astype(np.int32)[:-3]), transform_dense(ints[:-3]))
    floats = np.concatenate([ints.astype(np.float64), [0.5, 65535.5, -0.25, 1e300, np.inf, -np.inf, np.nan]])
    np.testing.assert_array_equal(transform_counts(floats), transform_dense(floats))
