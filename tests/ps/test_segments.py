"""One dedupe over ragged segments of keys (csrc/multi_table.h), against numpy."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ps import native

segment_sizes = st.lists(st.integers(0, 300), max_size=8)


def first_occurrence_unique(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")  # unique keys by first occurrence
    rank = np.empty_like(order)
    rank[order] = np.arange(order.shape[0])
    return keys[np.sort(first)], rank[inverse.reshape(-1)]


@given(segment_sizes, st.integers(1, 1 << 62), st.integers(0, 2**32 - 1))
def test_unique_by_segment_dedupes_each_segment_on_its_own(sizes, key_range, seed):
    rng = np.random.default_rng(seed)
    segments = [rng.integers(-key_range, key_range, n, dtype=np.int64) for n in sizes]
    offsets = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).astype(np.int64)
    keys = np.concatenate(segments) if segments else np.empty(0, np.int64)
    unique, unique_offsets, inverse = native.unique_by_segment(keys, offsets)
    assert unique_offsets[0] == 0 and unique_offsets[-1] == unique.shape[0]
    for t, segment in enumerate(segments):
        want_unique, want_inverse = first_occurrence_unique(segment)
        got = unique[unique_offsets[t] : unique_offsets[t + 1]]
        np.testing.assert_array_equal(got, want_unique)
        np.testing.assert_array_equal(inverse[offsets[t] : offsets[t + 1]], want_inverse)
        np.testing.assert_array_equal(got[inverse[offsets[t] : offsets[t + 1]]], segment)


def test_bad_segments_are_refused_by_name():
    keys = np.arange(4, dtype=np.int64)
    with pytest.raises(ValueError, match="offsets: must run from 0 to the number of keys"):
        native.unique_by_segment(keys, np.array([0, 3], dtype=np.int64))
    with pytest.raises(ValueError, match="offsets: must not decrease"):
        native.unique_by_segment(keys, np.array([0, 3, 1, 4], dtype=np.int64))
    # A middle offset past the keys: refused before a key is read (before, the first segment read
    # past the keys and wrote past the outputs, and a large one crashed the process).
    for beyond in (7, 50_000_000):
        with pytest.raises(ValueError, match="offsets: must not decrease"):
            native.unique_by_segment(keys, np.array([0, beyond, 4], dtype=np.int64))
