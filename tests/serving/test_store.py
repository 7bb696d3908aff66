"""ShardRows and TableReplica against a dict reference; defaults; float16; readers during writes."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ps.sharding import ShardMap
from ps.snapshot.files import SnapshotWriter, open_snapshot
from ps.snapshot.manifest import SnapshotError
from ps.snapshot.ops import ShardSnapshotter, export_for_serving
from ps.table.config import Initializer, TableConfig
from ps.table.embedding_table import EmbeddingTable
from serving.config import DefaultRow, ExportSource, StorageDType
from serving.export_load import load_latest_export
from serving.store import SERVING_STREAM, ShardRows, TableReplica, _embps_gate

ops = st.lists(
    st.tuples(st.booleans(), st.lists(st.integers(-50, 50), unique=True, min_size=1, max_size=12)),
    min_size=1,
    max_size=30,
)


@settings(max_examples=50, deadline=None)
@given(ops, st.sampled_from([1, 3, 8]), st.sampled_from([0, 1]))
def test_upsert_erase_gather_match_a_dict(operations, dim, expected_rows):
    # Made for one row: 64-row blocks (and one hash sub-map in the native store), which the up to
    # 101 rows cross.
    rows = ShardRows(dim, expected_rows=expected_rows)
    reference: dict[int, np.ndarray] = {}
    rng = np.random.default_rng(0)
    for is_upsert, keys in operations:
        keys = np.array(keys, dtype=np.int64)
        if is_upsert:
            values = rng.standard_normal((keys.shape[0], dim)).astype(np.float32)
            rows.upsert(keys, values)
            reference.update({int(k): v for k, v in zip(keys, values, strict=True)})
        else:
            rows.erase(keys)
            for k in keys:
                reference.pop(int(k), None)
    probe = np.arange(-60, 61, dtype=np.int64)
    out = np.full((probe.shape[0], dim), -7.0, dtype=np.float32)
    found = rows.gather(probe, out)
    assert rows.size == len(reference)
    for i, k in enumerate(probe.tolist()):
        assert found[i] == (k in reference)
        np.testing.assert_array_equal(out[i], reference[k] if k in reference else np.full(dim, -7.0, np.float32))


@pytest.mark.skipif(_embps_gate is None, reason="no native serving store here")
def test_a_store_made_for_a_few_rows_is_sized_to_them_and_still_grows():
    """A cut's overlay (serving/cut.py) is made for the rows it gets: its first block holds those,
    not the 16k rows of a main store's, and it still takes rows past them, every one intact."""
    dim = 64
    sized, grown = ShardRows(dim, expected_rows=300), ShardRows(dim)
    keys = np.arange(300, dtype=np.int64) * 7919
    values = np.random.default_rng(1).standard_normal((300, dim)).astype(np.float32)
    for rows in (sized, grown):
        rows.upsert(keys, values)
    sized_bytes, grown_bytes = sized.native.block_bytes, grown.native.block_bytes
    assert sized_bytes * 16 <= grown_bytes, (sized_bytes, grown_bytes)
    more = np.arange(300, 5_000, dtype=np.int64) * 7919
    more_values = np.random.default_rng(2).standard_normal((more.shape[0], dim)).astype(np.float32)
    sized.upsert(more, more_values)
    sized.erase(keys[:10])
    out = np.zeros((5_000, dim), dtype=np.float32)
    found = sized.gather(np.concatenate([keys, more]), out)
    assert sized.size == 4_990 and not found[:10].any() and found[10:].all()
    np.testing.assert_array_equal(out[10:300], values[10:])
    np.testing.assert_array_equal(out[300:], more_values)


def test_float16_storage_halves_memory_and_rounds_like_numpy():
    keys = np.arange(1 << 14, dtype=np.int64)
    values = np.random.default_rng(1).standard_normal((keys.shape[0], 5)).astype(np.float32)
    full, half = ShardRows(5), ShardRows(5, StorageDType.FLOAT16)
    full.upsert(keys, values)
    half.upsert(keys, values)
    out = np.zeros((keys.shape[0], half.width), dtype=np.float32)
    assert half.gather(keys, out).all()
    np.testing.assert_array_equal(half.decode(out), values.astype(np.float16).astype(np.float32))
    # ceil(5 / 2) words a row instead of 5 (the native store adds a 16-byte header to each row and
    # pads its words to 8 bytes)
    def row_bytes(words: int) -> int:
        return 16 + -(-4 * words // 8) * 8 if full.native is not None else 4 * words

    assert half.block_bytes * row_bytes(5) == full.block_bytes * row_bytes(3)


def test_int8_storage_keeps_the_ps_row_format_in_about_a_quarter_of_the_memory():
    from tests.ps import reference_codec

    dim = 64
    keys = np.arange(1 << 14, dtype=np.int64) * 7919
    values = np.random.default_rng(2).normal(scale=0.05, size=(keys.shape[0], dim)).astype(np.float32)
    full, int8 = ShardRows(dim), ShardRows(dim, StorageDType.INT8)
    full.upsert(keys, values)
    int8.upsert(keys, values)
    out = np.zeros((keys.shape[0], int8.width), dtype=np.float32)
    assert int8.gather(keys, out).all()
    want = reference_codec.encode("int8", 0, keys, SERVING_STREAM, values)
    np.testing.assert_array_equal(out.view(np.uint8), want)  # the PS table's format, bit for bit
    decoded = int8.decode(out)
    span = values.max(axis=1, keepdims=True) - values.min(axis=1, keepdims=True)
    assert (np.abs(decoded - values) <= span / 255 * 1.001).all()
    # 18 words a row instead of 64 (the native store adds a 16-byte header to each row)
    header = 16 if full.native is not None else 0
    assert int8.block_bytes * (header + dim * 4) == full.block_bytes * (header + (2 + dim // 4) * 4)
    replica = TableReplica(TableConfig("user", dim=dim), ShardMap.uniform(1), dtype=StorageDType.INT8)
    replica.shards[0].upsert(keys[:10], values[:10])
    got, found = replica.lookup(np.concatenate([keys[:10], [-1]]))
    assert found.tolist() == [True] * 10 + [False]
    np.testing.assert_array_equal(got[:10], decoded[:10])
    assert not got[10].any()  # default zeros


@pytest.mark.parametrize("initializer", [Initializer.UNIFORM, Initializer.NORMAL])
def test_unknown_keys_read_as_the_default(initializer):
    config = TableConfig("user", dim=6, initializer=initializer, init_scale=0.3, seed=11)
    keys = np.array([5, -3, 1 << 40, 17], dtype=np.int64)
    init = TableReplica(config, ShardMap.uniform(2), DefaultRow.INIT)
    init.shards[init.shard_map.shard_of(keys[:1])[0]].upsert(keys[:1], np.ones((1, 6), np.float32))
    values, found = init.lookup(keys)
    assert found.tolist() == [True, False, False, False]
    np.testing.assert_array_equal(values[0], np.ones(6, np.float32))
    np.testing.assert_array_equal(values[1:], EmbeddingTable(config).init_values(keys[1:]))
    zeros = TableReplica(config, ShardMap.uniform(2), DefaultRow.ZEROS)
    values, found = zeros.lookup(keys)
    assert not found.any() and not values.any()


def test_an_init_beyond_float16_s_range_saturates_in_a_float16_reply():
    """A missing key's init in a float16 reply (default = init) was cast by numpy: beyond 65504 it
    came back inf on this path, +-65504 from the gate (found by a review of the two)."""
    config = TableConfig("big", dim=3, initializer=Initializer.NORMAL, init_scale=1e6, seed=7)
    replica = TableReplica(config, ShardMap.uniform(1), DefaultRow.INIT)
    keys = np.arange(2, dtype=np.int64)
    values, found = replica.lookup(keys, np.float16)
    assert not found.any() and values.dtype == np.float16
    init = EmbeddingTable(config).init_values(keys)
    assert np.abs(init).max() > 65504  # the case this is about
    np.testing.assert_array_equal(values, np.clip(init, -65504, 65504).astype(np.float16))


def test_lookup_routes_keys_to_their_shard():
    config = TableConfig("user", dim=2)
    shard_map = ShardMap.uniform(3)
    replica = TableReplica(config, shard_map)
    keys = np.arange(300, dtype=np.int64)
    owners = shard_map.shard_of(keys)
    for s in range(3):
        mine = keys[owners == s]
        replica.shards[s].upsert(mine, np.stack([mine, np.full_like(mine, s)], axis=1).astype(np.float32))
    values, found = replica.lookup(keys[::-1])
    assert found.all()
    np.testing.assert_array_equal(values[:, 0], keys[::-1])
    np.testing.assert_array_equal(values[:, 1], owners[::-1])


@pytest.mark.parametrize("dtype", [StorageDType.FLOAT32, StorageDType.FLOAT16])
def test_readers_see_the_old_or_the_new_row_never_a_mix(dtype):
    """A writer rewrites, erases and re-inserts rows (reusing slots) while readers gather them.
    Row of key k at generation g is all k * 64 + g (exact in float16 for k < 32, g < 64): a torn
    row would mix generations, a row read through a reused slot would name another key."""
    dim, num_keys, rounds = 4096, 32, 600
    rows = ShardRows(dim, dtype, expected_rows=num_keys)
    keys = np.arange(num_keys, dtype=np.int64)

    def generation(order: np.ndarray, g: int) -> np.ndarray:
        return np.repeat((order * 64.0 + g)[:, None], dim, axis=1).astype(np.float32)

    rows.upsert(keys, generation(keys, 0))
    stop = threading.Event()
    failures: list[str] = []
    reads = [0]

    def reader() -> None:
        out = np.zeros((num_keys, rows.width), dtype=np.float32)
        while not stop.is_set() and not failures:
            found = rows.gather(keys, out)
            values = rows.decode(out)[found]
            torn = ~(values == values[:, :1]).all(axis=1)
            foreign = (values[:, 0] // 64).astype(np.int64) != keys[found]
            if torn.any() or foreign.any():
                failures.append(f"{int(torn.sum())} torn and {int(foreign.sum())} foreign rows")
            reads[0] += 1

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for r in range(1, rounds):
            g = r % 64
            rows.upsert(keys, generation(keys, g))
            if r % 3 == 0:
                rows.erase(keys[r % 2 :: 2])
                rows.upsert(keys[::-1], generation(keys[::-1], g))
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not failures, failures[:3]
    assert reads[0] > 0


def test_an_export_in_stored_form_gives_replicas_the_ps_rows_bit_for_bit(tmp_path):
    """`export --dtype stored`: an int8 table's rows as value_encoded, a float16 table's halves;
    replicas of the same storage_dtype load them bit for bit (re-encoding decoded int8 rows
    changes about one row in 2,000: hence the 20,000 rows), a float32 replica decodes them to the
    PS's lookups, and load_values still reads float32 from the int8 table."""
    rng = np.random.default_rng(0)
    tables = {"q8": EmbeddingTable(TableConfig("q8", dim=4, storage="int8")),
              "h16": EmbeddingTable(TableConfig("h16", dim=5, storage="float16"))}
    for table in tables.values():
        keys = np.arange(20_000 if table.name == "q8" else 300, dtype=np.int64)
        table.apply_gradients(keys, rng.normal(size=(keys.shape[0], table.dim)).astype(np.float32))
    ShardSnapshotter(tables, 0).snapshot(str(tmp_path / "snap"), "job", 1, "full")
    export_for_serving(str(tmp_path / "snap"), "job", None, str(tmp_path / "export"), dtype="stored")
    exported = open_snapshot(str(tmp_path / "export"), "job")
    assert {n: t.dtype for n, t in exported.manifest.tables.items()} == {"q8": "int8", "h16": "float16"}
    keys, values = exported.load_values("q8", 0)
    np.testing.assert_array_equal(values, tables["q8"].lookup(keys).numpy())
    replicas = {name: TableReplica(t.config, ShardMap.uniform(1), dtype=StorageDType(str(t.storage)))
                for name, t in tables.items()}
    replicas["f32"] = TableReplica(tables["q8"].config, ShardMap.uniform(1))
    assert load_latest_export(ExportSource(str(tmp_path / "export"), "job"), {"q8": replicas["q8"],
                                                                             "h16": replicas["h16"]}) == 1
    assert load_latest_export(ExportSource(str(tmp_path / "export"), "job"), {"q8": replicas["f32"]}) == 1
    for name, table in tables.items():
        state, rows = table.export(), replicas[name].shards[0]
        words = np.zeros((state.keys.shape[0], rows.width), dtype=np.float32)
        assert rows.size == state.keys.shape[0] and rows.gather(state.keys, words).all()
        np.testing.assert_array_equal(words.view(np.uint8), state.encoded)
    keys = tables["q8"].export().keys
    np.testing.assert_array_equal(replicas["f32"].lookup(keys)[0], tables["q8"].lookup(keys).numpy())


def test_a_training_snapshot_is_not_loaded_as_an_export(tmp_path):
    """export.uri pointed at the training snapshots (same <uri>/<job>/<step> layout): the newest
    step is an incremental, whose rows are only those its step touched, and the replica served
    them alone as the model. It is refused, naming the field; so is reading its rows as an export's."""
    table = EmbeddingTable(TableConfig("emb", dim=4))
    snapper = ShardSnapshotter({"emb": table}, 0)
    table.apply_gradients(np.arange(1000, dtype=np.int64), np.ones((1000, 4), np.float32))
    snapper.snapshot(str(tmp_path / "snap"), "job", 1, "full")
    table.apply_gradients(np.arange(1, dtype=np.int64), np.ones((1, 4), np.float32))
    snapper.snapshot(str(tmp_path / "snap"), "job", 2, "incremental")
    replica = TableReplica(table.config, ShardMap.uniform(1))
    refused = r"export.uri: step 2 under .* is a training snapshot \(incremental\), not an export"
    with pytest.raises(ValueError, match=refused):
        load_latest_export(ExportSource(str(tmp_path / "snap"), "job"), {"emb": replica})
    assert replica.size == 0
    with pytest.raises(SnapshotError, match=r"step 2 is a training snapshot \(incremental\), not an export"):
        open_snapshot(str(tmp_path / "snap"), "job").load_stored_values("emb", 0)


def test_an_export_sharded_under_other_bucket_ranges_is_refused(tmp_path):
    """The shard count was checked, not which shard each row is on: under other bucket_ranges a
    shard served rows its stream never touches (another shard's now) until a full copy."""
    uniform = ShardMap.uniform(2)
    keys = np.arange(2000, dtype=np.int64)
    config = TableConfig("emb", dim=4)
    writer = SnapshotWriter(str(tmp_path / "snap"), "job", 1, "full", None, num_shards=2)
    for s, positions in enumerate(uniform.split(keys)):
        table = EmbeddingTable(config)
        table.apply_gradients(keys[positions], np.ones((positions.shape[0], 4), np.float32))
        ShardSnapshotter({"emb": table}, s).write(writer)
    writer.commit()
    export_for_serving(str(tmp_path / "snap"), "job", None, str(tmp_path / "export"))
    source = ExportSource(str(tmp_path / "export"), "job")
    assert load_latest_export(source, {"emb": TableReplica(config, uniform)}) == 1
    swapped = ShardMap.from_ranges(2, [[0, 1 << 15, 1], [1 << 15, 1 << 16, 0]])
    with pytest.raises(ValueError, match=r"export.uri: step 1, table 'emb', shard 0 holds [\d,]+ keys the job's"):
        load_latest_export(source, {"emb": TableReplica(config, swapped)})
