"""A table loaded from another's image (EmbeddingTable.image / load_image, a standby's copy: whole,
or live, its rows copied between pushes and then the rows written since) or restored from a
snapshot chain of it (TableState with its TableLayout) goes on exactly as the other
does, push after push, on large tables whose eviction depends on where rows lie (windowed TTL
sweeps, sampled capacity eviction, pending keys dropped first seen first); an image or layout that
does not fit the table is refused with a ValueError naming the part, and leaves the table as it was."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from ps import native
from ps.shard.state_copy import CopiedRows
from ps.snapshot.files import SnapshotWriter, restore
from ps.snapshot.ops import ShardSnapshotter
from ps.table import multi
from ps.table.config import (
    AdmissionConfig,
    AdmissionKind,
    EvictionConfig,
    EvictionPolicy,
    OptimizerConfig,
    OptimizerKind,
    TableConfig,
)
from ps.table.embedding_table import EXACT_SCAN_ROWS, EmbeddingTable
from ps.table.state import TableImage

ROWS = EXACT_SCAN_ROWS + 20_000
CONFIGS = {
    "ttl": TableConfig("ttl", dim=4, optimizer=OptimizerConfig(kind=OptimizerKind.ADAGRAD, lr=0.1),
                       eviction=EvictionConfig(ttl_steps=2)),
    "lfu": TableConfig("lfu", dim=4, optimizer=OptimizerConfig(kind=OptimizerKind.FTRL, lr=0.1), capacity=ROWS,
                       eviction=EvictionConfig(policy=EvictionPolicy.LFU)),
    "admit": TableConfig("admit", dim=4, storage="int8", optimizer=OptimizerConfig(kind=OptimizerKind.ADAM, lr=0.1),
                         admission=AdmissionConfig(kind=AdmissionKind.COUNT, min_count=2, max_pending=ROWS // 2),
                         eviction=EvictionConfig(ttl_steps=3)),
}


def _push(table: EmbeddingTable, rng: np.random.Generator, step: int, n: int) -> np.ndarray:
    keys = np.unique(rng.integers(0, 3 * ROWS, n)).astype(np.int64)
    grads = rng.standard_normal((keys.shape[0], table.dim)).astype(np.float32)
    return table.apply_gradients(keys, grads, step=step).evicted_keys


STATS = ("num_admitted", "num_evicted", "num_pending_dropped")  # counts since the process started


def _assert_same(a: EmbeddingTable, b: EmbeddingTable, stats: bool = True) -> None:
    """Same rows at the same places, same free lists, cursors and sampler. stats=False: b was
    restored from a snapshot, which keeps neither the counts since the process started nor what
    free rows held before they were freed (a live row's words and a live pending row's key only)
    nor how the first-seen order of pending keys is cut into chunks."""
    ia, ib = a.image(), b.image()
    live_rows = np.sort(ia.arrays["rows"])
    live_pending = ia.arrays["pending_seq"] != 0
    for name in TableImage.ARRAYS:
        x, y = ia.arrays[name], ib.arrays[name]
        if name in ("keys", "rows", "pending_keys", "pending_rows"):
            continue  # below: the map's slot order may differ
        if not stats and name == "words":
            x, y = x[live_rows], y[live_rows]
        if not stats and name == "pending_row_keys":
            x, y = x[live_pending], y[live_pending]
        if not stats and name.startswith("pending_order"):
            continue  # chunks and stale entries: the live keys' first-seen order below
        assert x.tobytes() == y.tobytes(), name
    if not stats:
        def first_seen(image: TableImage) -> np.ndarray:
            keys, rows = image.arrays["pending_keys"], image.arrays["pending_rows"]
            return keys[np.argsort(image.arrays["pending_seq"][rows])]

        np.testing.assert_array_equal(first_seen(ia), first_seen(ib))
    for keys, rows in (("keys", "rows"), ("pending_keys", "pending_rows")):
        order_a, order_b = np.argsort(ia.arrays[keys]), np.argsort(ib.arrays[keys])
        np.testing.assert_array_equal(ia.arrays[keys][order_a], ib.arrays[keys][order_b], err_msg=keys)
        np.testing.assert_array_equal(ia.arrays[rows][order_a], ib.arrays[rows][order_b], err_msg=rows)
    if not stats:
        for name in STATS:
            ia.counters.pop(name), ib.counters.pop(name)
    assert (ia.counters, ia.rng) == (ib.counters, ib.rng)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_a_table_loaded_from_an_image_evicts_as_the_original_push_after_push(name):
    config = CONFIGS[name]
    original = EmbeddingTable(config)
    rng = np.random.default_rng(3)
    for step in range(1, 4):
        _push(original, rng, step, ROWS // 2)
    assert original.num_evicted + original.num_pending_dropped > 0 or original.size > EXACT_SCAN_ROWS
    copy = EmbeddingTable(config)
    copy.load_image(original.image())
    _assert_same(original, copy)
    for step in range(4, 10):
        seed = int(rng.integers(1 << 31))
        evicted = _push(original, np.random.default_rng(seed), step, ROWS // 4)
        np.testing.assert_array_equal(_push(copy, np.random.default_rng(seed), step, ROWS // 4), evicted)
        _assert_same(original, copy)
    assert original.num_evicted + original.num_pending_dropped > 0


PIECE_ROWS = 10_000


def _live_copy(original: EmbeddingTable, copy: EmbeddingTable, between) -> None:
    """Copies `original` into `copy` as a new standby's live copy does (ps/shard/replication.py
    _copy), calling between() after every piece: the rows in pieces, the rows written since (a
    round), then the image with the rows written since that."""
    span = original.track_written_rows()
    copied = CopiedRows(copy.new_row_store())

    def send(rows: np.ndarray) -> None:
        for first in range(0, rows.shape[0], PIECE_ROWS):
            part = rows[first : first + PIECE_ROWS]
            copied.add(part.astype("<i8").tobytes(), original.copy_rows(part).tobytes())
            between()

    send(np.arange(span, dtype=np.int64))
    send(original.take_written_rows(below=span))
    image = original.image(original.take_written_rows())
    original.stop_tracking_written_rows()
    assert 0 < image.arrays["word_rows"].shape[0] < original.num_rows  # the rows written since, not all
    copy.load_image(image, copied.store, copied.held)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_a_live_copy_taken_between_pushes_loads_a_table_equal_to_the_original(name):
    """Pushes land between every two pieces of the copy, creating, updating and evicting rows
    already copied and rows not yet copied; the copy equals the original at the image's point
    and goes on evicting as it does."""
    config = CONFIGS[name]
    original = EmbeddingTable(config)
    rng = np.random.default_rng(11)
    for step in range(1, 4):
        _push(original, rng, step, ROWS // 2)
    step = 3

    def push() -> None:
        nonlocal step
        step += 1
        _push(original, rng, step, ROWS // 40)

    copy = EmbeddingTable(config)
    _live_copy(original, copy, push)
    _assert_same(original, copy)
    for later in range(step + 1, step + 5):
        seed = int(rng.integers(1 << 31))
        evicted = _push(original, np.random.default_rng(seed), later, ROWS // 4)
        np.testing.assert_array_equal(_push(copy, np.random.default_rng(seed), later, ROWS // 4), evicted)
        _assert_same(original, copy)


def test_a_live_copy_sees_the_rows_a_multi_table_push_writes():
    """Tables pushed together in one native call (ps/table/multi.py), and a table whose update runs
    in fbgemm's kernels, mark what they wrote too."""
    configs = [
        TableConfig("a", dim=8),
        TableConfig("b", dim=4, optimizer=OptimizerConfig(kind=OptimizerKind.ADAGRAD)),
        TableConfig("c", dim=4, optimizer=OptimizerConfig(kind=OptimizerKind.ROWWISE_ADAGRAD), kernels="fbgemm"),
    ]
    originals = [EmbeddingTable(c) for c in configs]
    assert originals[0].multi_push_ready(1000) and originals[1].multi_push_ready(1000)
    assert originals[2].fbgemm_push_ready(1000)
    rng = np.random.default_rng(12)

    def push() -> None:
        keys = [np.unique(rng.integers(0, 3 * ROWS, ROWS // 20)).astype(np.int64) for _ in originals]
        grads = np.concatenate([rng.standard_normal(k.shape[0] * t.dim) for k, t in zip(keys, originals, strict=True)])
        offsets = np.cumsum([0, *(k.shape[0] for k in keys)]).astype(np.int64)
        multi.push_tables(originals, np.concatenate(keys), offsets, grads.astype(np.float32), None, None)

    for _ in range(20):
        push()
    copies = [EmbeddingTable(c) for c in configs]
    for original, copy in zip(originals, copies, strict=True):
        _live_copy(original, copy, push)
        _assert_same(original, copy)


def test_a_live_copy_missing_rows_is_refused_and_the_table_is_unchanged():
    original = EmbeddingTable(CONFIGS["ttl"])
    rng = np.random.default_rng(13)
    for step in range(1, 4):
        _push(original, rng, step, ROWS // 2)
    target = EmbeddingTable(CONFIGS["ttl"])
    _push(target, np.random.default_rng(14), 1, 100)
    before = target.image()
    copied = CopiedRows(target.new_row_store())
    rows = np.arange(original.num_rows - 10, dtype=np.int64)  # the last 10 rows never come
    copied.add(rows.tobytes(), original.copy_rows(rows).tobytes())
    image = original.image(np.zeros(0, dtype=np.int64))
    with pytest.raises(ValueError, match=f"row {rows.shape[0]} are neither in the image nor in the rows copied"):
        target.load_image(image, copied.store, copied.held)
    after = target.image()
    assert all(after.arrays[n].tobytes() == before.arrays[n].tobytes() for n in TableImage.ARRAYS)


def test_copied_rows_refuse_what_a_primary_does_not_send():
    copied = CopiedRows(EmbeddingTable(TableConfig("t", dim=4)).new_row_store())
    width = copied.store.width
    rows = np.arange(3, dtype="<i8")
    with pytest.raises(ValueError, match="not int64 numbers"):
        copied.add(b"1234", b"")
    with pytest.raises(ValueError, match="bytes of words for 3 rows"):
        copied.add(rows.tobytes(), bytes(4 * width * 2))
    with pytest.raises(ValueError, match="after 0 rows"):
        copied.add(np.array([3], "<i8").tobytes(), bytes(4 * width))  # rows come in order: 0, 1, 2, ...
    assert copied.store.num_allocated_rows == 0
    copied.add(rows.tobytes(), np.ones((3, width), "<f4").tobytes())
    copied.add(np.array([1], "<i8").tobytes(), np.full(width, 2, "<f4").tobytes())  # written since
    np.testing.assert_array_equal(copied.store.gather_host(rows, 0, width)[:, 0], [1, 2, 1])
    np.testing.assert_array_equal(copied.held[:3], True)


def _bad_images(image: TableImage):
    def changed(**arrays) -> TableImage:
        return TableImage({**image.arrays, **arrays}, dict(image.counters), image.rng)

    a = image.arrays
    yield changed(words=a["words"][:, :-1]), "image.words: expected shape"
    yield changed(keys=a["keys"].astype(np.int32)), "image.keys: expected shape"
    yield changed(pending_order_chunks=a["pending_order_chunks"] + 1), "image.pending_order_chunks"
    yield TableImage(dict(a), dict(image.counters), {"bit_generator": "MT19937"}), "image.rng"
    rows = a["rows"].copy()
    rows[1] = rows[0]
    yield changed(rows=rows), "taken twice"
    keys = a["keys"].copy()
    keys[1] = keys[0]
    yield changed(keys=keys), "a key twice"


def test_an_image_that_does_not_fit_is_refused_and_the_table_is_unchanged():
    source = EmbeddingTable(CONFIGS["admit"])
    rng = np.random.default_rng(5)
    for step in range(1, 4):
        _push(source, rng, step, 5000)
    target = EmbeddingTable(CONFIGS["admit"])
    _push(target, np.random.default_rng(6), 1, 100)
    before = target.image()
    for bad, why in _bad_images(source.image()):
        with pytest.raises(ValueError, match="image|restore") as raised:
            target.load_image(bad)
        assert why in str(raised.value), (why, raised.value)
        after = target.image()
        assert all(after.arrays[n].tobytes() == before.arrays[n].tobytes() for n in TableImage.ARRAYS)
    other_dim = EmbeddingTable(TableConfig("admit", dim=8))
    with pytest.raises(ValueError, match="image.words"):
        other_dim.load_image(source.image())


def test_a_map_restored_from_another_hands_out_the_same_rows():
    first = native.HashMap(sub_maps=4)
    keys = np.arange(1000, dtype=np.int64) * 7919
    first.find_or_insert(keys)
    first.erase(keys[[3, 900, 17, 500]])
    live_keys, rows = first.export()
    num_rows, free_rows = first.num_rows, first.free_rows()
    second = native.HashMap(sub_maps=64)  # another sub-map count: only the rows must agree
    second.restore(live_keys, rows, num_rows, free_rows)
    fresh = np.array([-1, -2, -3, -4, -5], dtype=np.int64)
    np.testing.assert_array_equal(second.find_or_insert(fresh)[0], first.find_or_insert(fresh)[0])
    np.testing.assert_array_equal(second.find(keys), first.find(keys))
    with pytest.raises(ValueError, match="the map must be empty"):
        second.restore(live_keys, rows, num_rows, free_rows)
    third = native.HashMap()
    with pytest.raises(ValueError, match="do not make num_rows"):
        third.restore(live_keys, rows, num_rows + 1, free_rows)
    assert (third.size, third.num_rows) == (0, 0)
    past = free_rows.copy()
    past[0] = num_rows  # a row never handed out
    with pytest.raises(ValueError, match="free row .* is outside"):
        third.restore(live_keys, rows, num_rows, past)
    twice = rows.copy()
    twice[1] = twice[0]
    with pytest.raises(ValueError, match="taken twice"):
        third.restore(live_keys, twice, num_rows, free_rows)
    assert (third.size, third.num_rows) == (0, 0)
    third.restore(live_keys, rows, num_rows, free_rows)  # still empty, so it takes a layout
    assert third.size == live_keys.shape[0]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_a_table_restored_from_full_and_incremental_snapshots_evicts_as_the_original(name, tmp_path):
    config = CONFIGS[name]
    original = EmbeddingTable(config)
    snapper = ShardSnapshotter({name: original}, shard=0)
    rng = np.random.default_rng(4)
    for step, kind in ((1, "full"), (2, "incremental"), (3, "incremental")):
        _push(original, rng, step, ROWS // 2)
        snapper.snapshot(str(tmp_path), "job", step, kind)
    restored = EmbeddingTable(config)
    restored.load(restore(str(tmp_path), "job", 3)[name][0])
    _assert_same(original, restored, stats=False)
    for step in range(4, 10):
        seed = int(rng.integers(1 << 31))
        evicted = _push(original, np.random.default_rng(seed), step, ROWS // 4)
        np.testing.assert_array_equal(_push(restored, np.random.default_rng(seed), step, ROWS // 4), evicted)
    _assert_same(original, restored, stats=False)


def test_a_layout_that_does_not_fit_is_refused_and_the_table_is_unchanged():
    source = EmbeddingTable(CONFIGS["admit"])
    rng = np.random.default_rng(8)
    for step in range(1, 4):
        _push(source, rng, step, 5000)
    state = source.export()
    target = EmbeddingTable(CONFIGS["admit"])
    _push(target, np.random.default_rng(9), 1, 100)
    before = target.image()
    layout = state.layout
    for bad, why in [
        (dataclasses.replace(layout, rows=layout.rows[:-1]), "state.layout.rows"),
        (dataclasses.replace(layout, pending_seq=np.zeros_like(layout.pending_seq)), "first-seen numbers"),
        (dataclasses.replace(layout, sweep_cursor=-1), "counters must be integers"),
        (dataclasses.replace(layout, rng={"bit_generator": "MT19937"}), "state.layout.rng"),
        (dataclasses.replace(layout, num_rows=layout.num_rows + 1), "do not make num_rows"),
    ]:
        with pytest.raises(ValueError, match=why):
            target.load(dataclasses.replace(state, layout=bad))
        after = target.image()
        assert all(after.arrays[n].tobytes() == before.arrays[n].tobytes() for n in TableImage.ARRAYS)


def test_a_snapshot_without_a_layout_restores_with_rows_laid_out_by_key(tmp_path):
    """As one written before snapshots recorded where rows lie: no row columns, no layout file."""
    table = EmbeddingTable(CONFIGS["admit"])
    _push(table, np.random.default_rng(2), 1, 3000)
    _push(table, np.random.default_rng(3), 2, 3000)
    state = dataclasses.replace(table.export(), layout=None)
    writer = SnapshotWriter(str(tmp_path), "job", 2, "full", num_shards=1, tables=[table.config])
    record = writer.write_table_shard("admit", 0, state)
    writer.commit()
    assert not any(path.endswith(".layout.parquet") for path in record.entry.files)
    loaded = restore(str(tmp_path), "job", 2)["admit"][0]
    assert loaded.layout is None
    restored = EmbeddingTable(CONFIGS["admit"])
    restored.load(loaded)
    want, got = table.export(), restored.export()
    for name in ("keys", "values", "optimizer_state", "freq", "last_step", "pending_keys", "pending_counts"):
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)
    np.testing.assert_array_equal(got.layout.rows, np.arange(want.keys.shape[0]))  # by key


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("live", [False, True])
def test_a_cuda_table_loaded_from_an_image_evicts_as_the_original(live):
    config = dataclasses.replace(CONFIGS["ttl"], device="cuda")
    original = EmbeddingTable(config)
    rng = np.random.default_rng(3)
    for step in range(1, 4):
        _push(original, rng, step, ROWS // 2)
    copy = EmbeddingTable(config)
    first = 4
    if live:
        steps = iter(range(first, 1000))
        _live_copy(original, copy, lambda: _push(original, rng, next(steps), ROWS // 40))
        first = next(steps)
    else:
        copy.load_image(original.image())
    for step in range(first, first + 4):
        seed = int(rng.integers(1 << 31))
        evicted = _push(original, np.random.default_rng(seed), step, ROWS // 4)
        np.testing.assert_array_equal(_push(copy, np.random.default_rng(seed), step, ROWS // 4), evicted)
    _assert_same(original, copy)
