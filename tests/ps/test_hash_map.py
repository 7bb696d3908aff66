"""The C++ hash map against a Python dict, over random mixes of verbs and awkward keys."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ps.native import HashMap

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# A small key space so that batches repeat keys and erases hit, plus the extremes.
keys_strategy = st.one_of(
    st.integers(-40, 40), st.sampled_from([0, -1, INT64_MIN, INT64_MAX, INT64_MIN + 1, INT64_MAX - 1])
)
batch_strategy = st.lists(keys_strategy, max_size=60).map(lambda ks: np.array(ks, dtype=np.int64))
op_strategy = st.tuples(st.sampled_from(["find", "find_or_insert", "erase", "clear"]), batch_strategy)


def check_against_dict(ops: list[tuple[str, np.ndarray]]) -> None:
    table = HashMap(initial_capacity=8)  # small, so the ops force several growths
    ref: dict[int, int] = {}
    for verb, keys in ops:
        if verb == "find":
            rows = table.find(keys)
            assert rows.tolist() == [ref.get(int(k), -1) for k in keys]
        elif verb == "find_or_insert":
            rows, inserted = table.find_or_insert(keys)
            expected_inserted = []
            for k, row in zip(keys.tolist(), rows.tolist(), strict=True):
                if k in ref:
                    assert row == ref[k]
                    expected_inserted.append(False)
                else:
                    assert row not in ref.values(), "a live row was handed out twice"
                    ref[k] = row
                    expected_inserted.append(True)
            assert inserted.tolist() == expected_inserted
        elif verb == "clear":
            table.clear()
            ref.clear()
            assert table.num_rows == 0
        else:
            freed = table.erase(keys)
            expected = []
            for k in keys.tolist():
                expected.append(ref.pop(k, -1))
            assert freed.tolist() == expected
        assert table.size == len(ref)
        exported_keys, exported_rows = table.export()
        assert dict(zip(exported_keys.tolist(), exported_rows.tolist(), strict=True)) == ref
        assert all(0 <= r < table.num_rows for r in ref.values())


@settings(max_examples=300, deadline=None)
@given(st.lists(op_strategy, max_size=25))
def test_random_verbs_match_dict(ops):
    check_against_dict(ops)


def test_growth_keeps_every_entry_and_rows_are_dense():
    table = HashMap()
    keys = np.random.default_rng(1).integers(INT64_MIN, INT64_MAX, size=200_000, dtype=np.int64)
    keys = np.unique(keys)
    rows, inserted = table.find_or_insert(keys)
    assert inserted.all()
    assert sorted(rows.tolist()) == list(range(keys.shape[0]))
    assert table.size == keys.shape[0]
    np.testing.assert_array_equal(table.find(keys), rows)
    # 12-byte slots at a load factor of at least 0.53 after growth.
    assert table.memory_bytes / table.size < 12 / 0.53 + 1


def test_erased_rows_are_reused_and_probe_chains_survive_deletion():
    table = HashMap(initial_capacity=8)
    keys = np.arange(1000, dtype=np.int64)
    rows, _ = table.find_or_insert(keys)
    freed = table.erase(keys[::2])
    np.testing.assert_array_equal(freed, rows[::2])
    np.testing.assert_array_equal(table.find(keys[1::2]), rows[1::2])
    assert (table.find(keys[::2]) == -1).all()
    new_rows, inserted = table.find_or_insert(np.arange(5000, 5500, dtype=np.int64))
    assert inserted.all()
    assert set(new_rows.tolist()) == set(rows[::2].tolist())  # all reused, no new rows
    assert table.num_rows == 1000


def test_duplicates_in_one_batch_insert_once():
    table = HashMap()
    rows, inserted = table.find_or_insert(np.array([7, 7, INT64_MIN, 7, INT64_MIN], dtype=np.int64))
    assert rows.tolist() == [0, 0, 1, 0, 1]
    assert inserted.tolist() == [True, False, True, False, False]


@pytest.mark.parametrize(
    "bad, error",
    [
        (np.array([1, 2], dtype=np.int32), TypeError),
        (np.array([[1, 2]], dtype=np.int64), ValueError),
        ([1, 2], TypeError),
    ],
)
def test_bad_keys_raise_clear_errors(bad, error):
    with pytest.raises(error, match="keys"):
        HashMap().find(bad)


def test_non_contiguous_keys_are_accepted():
    table = HashMap()
    keys = np.arange(20, dtype=np.int64)[::2]
    rows, _ = table.find_or_insert(keys)
    np.testing.assert_array_equal(table.find(np.arange(20, dtype=np.int64)[::2]), rows)
