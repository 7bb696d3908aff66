"""The C++ hash map against a Python dict, over random mixes of verbs and awkward keys; growth in
pieces (sub-maps that grow alone) and lookups from one thread while another grows the map."""

import threading
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ps.native import HashMap, prefault_threads

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# A small key space so that batches repeat keys and erases hit, plus the extremes.
keys_strategy = st.one_of(
    st.integers(-40, 40), st.sampled_from([0, -1, INT64_MIN, INT64_MAX, INT64_MIN + 1, INT64_MAX - 1])
)
batch_strategy = st.lists(keys_strategy, max_size=60).map(lambda ks: np.array(ks, dtype=np.int64))
op_strategy = st.tuples(st.sampled_from(["find", "find_or_insert", "erase", "clear"]), batch_strategy)


def check_against_dict(ops: list[tuple[str, np.ndarray]], sub_maps: int) -> None:
    # No slots to start with and few sub-maps, so the ops grow each sub-map several times.
    table = HashMap(sub_maps=sub_maps)
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
@given(st.lists(op_strategy, max_size=25), st.sampled_from([1, 4]))
def test_random_verbs_match_dict(ops, sub_maps):
    check_against_dict(ops, sub_maps)


def test_growth_keeps_every_entry_and_rows_are_dense():
    table = HashMap()
    keys = np.random.default_rng(1).integers(INT64_MIN, INT64_MAX, size=200_000, dtype=np.int64)
    keys = np.unique(keys)
    rows, inserted = table.find_or_insert(keys)
    assert inserted.all()
    assert sorted(rows.tolist()) == list(range(keys.shape[0]))
    assert table.size == keys.shape[0]
    np.testing.assert_array_equal(table.find(keys), rows)
    # 12-byte slots; staggered sub-maps (each at a load in [0.47, 0.7]) keep the map near 0.58.
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


def test_growth_moves_a_bounded_share_per_call():
    """Filling in calls of 65,536: a call rehashes a few sub-maps, never the whole map, so the
    entries it moves stay bounded by the batch, not by the map (a whole-map rehash moves them all)."""
    table = HashMap()
    batch = 65_536
    keys = np.random.default_rng(3).integers(INT64_MIN, INT64_MAX, size=2_000_000, dtype=np.int64)
    moved = []
    for i in range(0, keys.shape[0], batch):
        before = table.rehashed
        table.find_or_insert(keys[i : i + batch])
        moved.append((table.rehashed - before, table.size))
    assert table.rehashed > keys.shape[0]  # it did grow, many times
    assert max(m for m, _ in moved) <= 6 * batch
    assert all(m < size / 3 for m, size in moved[len(moved) // 2 :])


def test_reserve_presizes_so_nothing_grows_until_it_is_passed():
    keys = np.random.default_rng(4).integers(INT64_MIN, INT64_MAX, size=300_000, dtype=np.int64)
    table = HashMap()
    table.reserve(keys.shape[0])
    capacity = table.capacity
    table.find_or_insert(keys)
    assert table.rehashed == 0 and table.capacity == capacity
    table.find_or_insert(np.arange(300_000, dtype=np.int64))  # past the hint it grows as usual
    assert table.rehashed > 0


def test_bad_sub_maps_is_a_clear_error():
    with pytest.raises(ValueError, match="sub_maps"):
        HashMap(sub_maps=3)


def test_lookups_run_while_another_thread_grows_and_erases():
    """A reader finds existing keys while a writer inserts 1.5M new keys in one call (many
    sub-maps grow inside it) and then erases them: every lookup is right, and lookups keep
    completing while the writer's call runs (the GIL is released, the reader takes no lock and
    never waits for a rehash)."""
    rng = np.random.default_rng(5)
    table = HashMap()
    existing = rng.integers(INT64_MIN, INT64_MAX, size=200_000, dtype=np.int64)
    rows, _ = table.find_or_insert(existing)
    new = rng.integers(INT64_MIN, INT64_MAX, size=1_500_000, dtype=np.int64)
    new = new[~np.isin(new, existing)]
    writer_calls: list[tuple[float, float]] = []
    reader_calls: list[tuple[float, float]] = []
    failures: list[str] = []
    done = threading.Event()

    def reader() -> None:
        while not done.is_set() and not failures:
            pick = rng.integers(0, existing.shape[0], 4096)
            start = time.perf_counter()
            found = table.find(existing[pick])
            reader_calls.append((start, time.perf_counter()))
            if not np.array_equal(found, rows[pick]):
                failures.append(f"{int((found != rows[pick]).sum())} of 4096 lookups wrong")

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for verb in (table.find_or_insert, table.erase):
            start = time.perf_counter()
            verb(new)
            writer_calls.append((start, time.perf_counter()))
    finally:
        done.set()
        thread.join()
    assert not failures, failures[:3]
    assert table.size == existing.shape[0]
    (insert_start, insert_end), _ = writer_calls
    inside = [1 for start, end in reader_calls if start > insert_start and end < insert_end]
    assert len(inside) >= 3, f"only {len(inside)} lookups completed during the growing call"


def test_table_expected_rows_presizes_its_map():
    from ps.table.config import TableConfig
    from ps.table.embedding_table import EmbeddingTable

    keys = np.random.default_rng(6).integers(INT64_MIN, INT64_MAX, size=100_000, dtype=np.int64)
    table = EmbeddingTable(TableConfig(name="t", dim=2, expected_rows=keys.shape[0]))
    table.apply_gradients(keys, np.zeros((keys.shape[0], 2), np.float32))
    assert table.size == keys.shape[0] and table._map.rehashed == 0
    table.load(table.export())
    assert table._map.rehashed == 0
    with pytest.raises(ValueError, match=r"t\.expected_rows: must be in \[1, "):
        TableConfig(name="t", dim=2, expected_rows=0).validate()


def test_lookups_beside_erase_and_clear_give_the_row_or_absent():
    """Beside a writer that inserts, erases and clears (then re-inserts the same keys, which get
    the same rows back), a reader only ever sees a key's row or -1: never another key's row, and
    never a probe that runs off its array while clear swaps the arrays out."""
    rng = np.random.default_rng(9)
    table = HashMap(sub_maps=16)
    stable = np.sort(rng.integers(INT64_MIN, INT64_MAX, size=50_000, dtype=np.int64))
    rows, _ = table.find_or_insert(stable)
    failures: list[str] = []
    done = threading.Event()

    def reader() -> None:
        pick_rng = np.random.default_rng(10)
        while not done.is_set() and not failures:
            pick = pick_rng.integers(0, stable.shape[0], 2048)
            found = table.find(stable[pick])
            wrong = (found != -1) & (found != rows[pick])
            if wrong.any():
                failures.append(f"{int(wrong.sum())} lookups gave another key's row")

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for cycle in range(12):
            extra = rng.integers(INT64_MIN, INT64_MAX, size=100_000, dtype=np.int64)
            extra = extra[~np.isin(extra, stable)]
            table.find_or_insert(extra)
            table.erase(extra[::2])
            if cycle % 3 == 2:
                table.clear()
                again, _ = table.find_or_insert(stable)
                np.testing.assert_array_equal(again, rows)
    finally:
        done.set()
        thread.join()
    assert not failures, failures[:3]


def test_large_sub_map_arrays_live_in_the_arena_and_clear_gives_its_memory_back():
    """With 4 sub-maps, 400k keys make arrays of ~1 MB: they come from the huge-page arena
    (csrc/slot_arena.h) and grow there; every key keeps its row across that growth, and clear
    unmaps the chunks (memory_bytes counts them, so it drops back to the empty map's)."""
    table = HashMap(sub_maps=4)
    empty_bytes = table.memory_bytes
    keys = np.random.default_rng(11).integers(INT64_MIN, INT64_MAX, size=400_000, dtype=np.int64)
    rows, _ = table.find_or_insert(keys)
    np.testing.assert_array_equal(table.find(keys), rows)
    assert table.memory_bytes > 400_000 * 12
    table.erase(keys[::2])
    np.testing.assert_array_equal(table.find(keys[1::2]), rows[1::2])
    table.clear()
    assert table.memory_bytes < empty_bytes + 4096
    again, _ = table.find_or_insert(keys)
    assert sorted(again.tolist()) == list(range(keys.shape[0]))


def test_verbs_match_dict_while_arrays_grow_through_arena_chunks():
    """4 sub-maps whose arrays pass 64 KiB at ~16k keys: inserts, erases and clears against a dict
    while the arrays grow through many arena chunks, whether the arena's thread filled them ahead
    or the writer mapped them itself (csrc/slot_arena.h): the same rows either way."""
    rng = np.random.default_rng(5)
    table = HashMap(sub_maps=4)
    ref: dict[int, int] = {}
    for cycle in range(6):
        for _ in range(8):
            keys = rng.integers(INT64_MIN, INT64_MAX, size=8_000, dtype=np.int64)
            rows, inserted = table.find_or_insert(keys)
            for k, row, new in zip(keys.tolist(), rows.tolist(), inserted.tolist(), strict=True):
                assert new == (k not in ref)
                assert ref.setdefault(k, row) == row
        live = np.fromiter(ref, dtype=np.int64)
        gone = live[rng.random(live.shape[0]) < 0.3]
        np.testing.assert_array_equal(table.erase(gone), [ref.pop(k) for k in gone.tolist()])
        live = np.fromiter(ref, dtype=np.int64)
        np.testing.assert_array_equal(table.find(live), [ref[k] for k in live.tolist()])
        assert (table.find(gone) == -1).all()
        assert table.size == len(ref)
        if cycle == 3:
            table.clear()
            ref.clear()
            assert table.size == 0


def test_maps_destroyed_or_cleared_while_their_arena_fills_ahead_stop_its_thread():
    """A map whose arrays live in the arena has a thread that fills chunks ahead; destroying the
    map, at once or after a clear, while that thread may be mid-chunk joins it and unmaps what it
    held, and a cleared map counts no memory filled ahead.

    Joined is told by the arena's own count (started minus joined), which the destructor lowers
    only after pthread_join returned, that is after the thread ended. /proc cannot tell it: the
    kernel wakes the joiner before it removes the ended thread's /proc/self/task entry (a CI run
    saw it there), and a new thread names itself only once it runs."""
    keys = np.random.default_rng(12).integers(INT64_MIN, INT64_MAX, size=300_000, dtype=np.int64)
    before = prefault_threads()
    for round_ in range(8):
        table = HashMap(sub_maps=4)
        empty_bytes = table.memory_bytes
        table.find_or_insert(keys)  # arrays of ~0.8 MB: in the arena, whose thread starts
        assert prefault_threads() == before + 1
        if round_ % 2:
            table.clear()
            assert table.memory_bytes < empty_bytes + 4096
            table.find_or_insert(keys[: 100_000 * (round_ % 4)])
        del table
        assert prefault_threads() == before


@pytest.mark.parametrize("reserve", [2**64 - 1, 13 * 10**18, 2**32])
def test_a_reservation_past_the_rows_a_map_holds_is_refused(reserve):
    """Past 2^64 slots the capacity schedule's cast overflowed: reserve(13e18) on a one-sub-map
    map looped for good holding its write lock (2^64 - 1 reserved nothing), and so did a map built
    with such an initial capacity."""
    with pytest.raises(ValueError, match=r"reserve: a hash map holds at most 2\^32 - 1 keys"):
        HashMap(sub_maps=1).reserve(reserve)
    with pytest.raises(ValueError, match=r"at most 2\^32 - 1 keys"):
        HashMap(2**64 - 1, sub_maps=1)
    m = HashMap(sub_maps=1)
    m.reserve(1000)
    assert m.capacity >= 1000
