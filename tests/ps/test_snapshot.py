"""Snapshots on local disk: round trips, full + incrementals = live tables (with evictions),
integrity checks, a writer killed mid-write, export for serving, gc and the CLI."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import embps
from ps.snapshot.files import (
    SnapshotCorruptError,
    SnapshotError,
    SnapshotWriter,
    latest,
    list_snapshots,
    load_table_shard,
    open_snapshot,
    read_extra,
    read_manifest,
    restore,
)
from ps.snapshot.ops import ShardSnapshotter, _TableWrite, collect_garbage, export_for_serving
from ps.table.config import (
    AdmissionConfig,
    AdmissionKind,
    EvictionConfig,
    EvictionPolicy,
    OptimizerConfig,
    OptimizerKind,
    TableConfig,
)
from ps.table.embedding_table import EmbeddingTable
from ps.table.state import TableChanges, TableState
from tests.helpers.snapshot_files import shard_file

REPO_ROOT = Path(__file__).resolve().parents[2]
FIELDS = ("keys", "values", "optimizer_state", "freq", "last_step", "pending_keys", "pending_counts",
          "pending_last_step", "version", "step")  # fmt: skip


def assert_same_state(got: TableState, want: TableState) -> None:
    for name in FIELDS:
        a, b = getattr(got, name), getattr(want, name)
        assert np.array_equal(a, b), f"{name} differs"
        if isinstance(b, np.ndarray):
            assert a.dtype == b.dtype and a.shape == b.shape, name


def evicting_table(name: str, seed: int, kind: OptimizerKind = OptimizerKind.ADAM) -> EmbeddingTable:
    """Small capacity (LFU) + TTL + count admission: pushes create, update, evict and keep keys pending."""
    return EmbeddingTable(
        TableConfig(
            name,
            dim=4,
            seed=seed,
            capacity=300,
            optimizer=OptimizerConfig(kind=kind, lr=0.05),
            admission=AdmissionConfig(kind=AdmissionKind.COUNT, min_count=2),
            eviction=EvictionConfig(ttl_steps=25, policy=EvictionPolicy.LFU),
        )
    )


def push(table: EmbeddingTable, rng: np.random.Generator, step: int, n: int = 200, key_range: int = 1500) -> None:
    keys = rng.integers(0, key_range, n)
    table.apply_gradients(keys, rng.standard_normal((n, table.dim)).astype(np.float32), step=step)


def write_state(uri: str, job: str, step: int, state: TableState, **kw) -> None:
    writer = SnapshotWriter(uri, job, step, **kw)
    writer.write_table_shard("t", 0, state)
    writer.commit()


@pytest.mark.parametrize("kind", list(OptimizerKind))
def test_full_round_trip_every_optimizer(tmp_path, kind):
    table = evicting_table("t", seed=1, kind=kind)
    rng = np.random.default_rng(0)
    for step in range(1, 5):
        push(table, rng, step)
    assert table.num_pending > 0 and table.size > 0
    snapper = ShardSnapshotter({"t": table}, shard=0)
    manifest = snapper.snapshot(str(tmp_path), "job", 4, "full", extras={"dense.pt": b"\x00dense"})
    assert manifest.tables["t"].table_config("t") == table.config
    loaded = load_table_shard(str(tmp_path), "job", 4, "t", 0)
    assert_same_state(loaded.state, table.export())
    assert loaded.deleted_keys.shape == (0,)
    fresh = EmbeddingTable(table.config)
    fresh.load(loaded.state)
    assert_same_state(fresh.export(), table.export())
    assert read_extra(str(tmp_path), "job", None, "dense.pt") == b"\x00dense"


def test_parquet_columns_and_metadata(tmp_path):
    import pyarrow.parquet as pq

    table = evicting_table("t", seed=2, kind=OptimizerKind.ROWWISE_ADAGRAD)
    push(table, np.random.default_rng(1), step=7)
    ShardSnapshotter({"t": table}, 0).snapshot(str(tmp_path), "job", 7)
    rows = pq.read_table(shard_file(tmp_path / "job/7", "t", 0))
    assert [str(f.type) for f in rows.schema] == [
        "int64",
        "fixed_size_list<element: float>[4]",
        "fixed_size_list<element: float>[1]",
        "uint32",
        "uint32",
        "uint32",
    ]
    assert rows.schema.names == ["key", "value", "optimizer_state", "freq", "last_step", "row"]
    meta = rows.schema.metadata
    assert meta[b"embps.table_version"] == b"1" and meta[b"embps.table_step"] == b"7"
    pending = pq.read_table(shard_file(tmp_path / "job/7", "t", 0, ".pending.parquet"))
    assert pending.schema.names == ["key", "count", "last_step", "row", "seq"] and pending.num_rows == table.num_pending
    layout = pq.read_table(shard_file(tmp_path / "job/7", "t", 0, ".layout.parquet"))
    assert layout.schema.names == ["row", "pending"]
    assert set(json.loads(layout.schema.metadata[b"embps.layout"])) == {
        "num_rows", "pending_num_rows", "next_seq", "sweep_cursor", "pending_sweep_cursor", "rng"
    }
    assert (tmp_path / "job/LATEST").read_text() == "7\n"


def test_full_plus_incrementals_equal_live_tables_with_evictions(tmp_path):
    """Two shards x two tables; every snapshot restores to the tables as they were at that step."""
    uri = str(tmp_path)
    rng = np.random.default_rng(3)
    shards = [{name: evicting_table(name, seed=10 * s + i) for i, name in enumerate(("user", "item"))} for s in (0, 1)]
    snappers = [ShardSnapshotter(tables, shard=s) for s, tables in enumerate(shards)]
    expected: dict[int, dict[tuple[str, int], TableState]] = {}
    parent = None
    evicted_between = deleted_in_incrementals = 0
    for snap, kind in enumerate(["full", "incremental", "incremental", "full", "incremental"]):
        step = 10 * (snap + 1)
        pushes, n = (4, 200) if kind == "full" else (2, 60)
        for s in range(pushes):
            for tables in shards:
                for table in tables.values():
                    before = table.num_evicted
                    push(table, rng, step - pushes + s, n=n)
                    evicted_between += table.num_evicted - before
        writer = SnapshotWriter(uri, "job", step, kind, parent if kind == "incremental" else None, num_shards=2)
        for snapper in snappers:
            snapper.write(writer)
        manifest = writer.commit()
        for snapper in snappers:
            snapper.mark_committed(step)
        parent = step
        expected[step] = {(n, s): t.export() for s, tables in enumerate(shards) for n, t in tables.items()}
        if kind == "incremental":
            live_rows = sum(t.size for tables in shards for t in tables.values())
            assert 0 < manifest.total_rows < live_rows  # only touched rows travel
            deleted_in_incrementals += sum(e.deleted for t in manifest.tables.values() for e in t.shards.values())
    assert evicted_between > 0 and deleted_in_incrementals > 0
    for step, want in expected.items():
        got = restore(uri, "job", step)
        assert set(got) == {"user", "item"} and all(set(v) == {0, 1} for v in got.values())
        for (name, shard), state in want.items():
            assert_same_state(got[name][shard], state)
    # The same, through EmbeddingTable.load + load_delta of each snapshot of the newest chain.
    for name in ("user", "item"):
        table = EmbeddingTable(shards[1][name].config)
        table.load(load_table_shard(uri, "job", 40, name, 1).state)
        delta = load_table_shard(uri, "job", 50, name, 1)
        table.load_delta(delta.state, delta.deleted_keys)
        assert_same_state(table.export(), shards[1][name].export())


def test_changes_of_a_snapshot_that_never_committed_reach_the_next_one(tmp_path):
    uri = str(tmp_path)
    rng = np.random.default_rng(4)
    table = evicting_table("t", seed=5)
    snapper = ShardSnapshotter({"t": table}, 0)
    push(table, rng, 1)
    snapper.snapshot(uri, "job", 1, "full")
    push(table, rng, 2)
    snapper.write(SnapshotWriter(uri, "job", 2, "incremental", parent=1))  # written, never committed
    push(table, rng, 3)
    snapper.snapshot(uri, "job", 3, "incremental")  # parent: 1, the last committed step
    assert read_manifest(uri, "job", 3).parent == 1
    assert_same_state(restore(uri, "job")["t"][0], table.export())
    with pytest.raises(SnapshotError, match="must be full"):
        ShardSnapshotter({"t": table}, 0).snapshot(uri, "job", 4, "incremental")


NO_CHANGES = TableChanges(np.empty(0, np.int64), np.empty(0, np.int64))


@pytest.mark.parametrize("storage", ["float32", "float16", "int8"])
def test_a_table_s_state_built_from_its_image_is_its_export(storage):
    """A snapshot copies a whole table as its image (where pushes wait) and builds its state after."""
    table = evicting_table("t", seed=9)
    table = EmbeddingTable(dataclasses.replace(table.config, storage=storage))
    rng = np.random.default_rng(10)
    for step in range(1, 40):
        push(table, rng, step)
    assert table.num_pending > 0 and table.num_evicted > 0
    image = table.image()
    want = table.export()
    push(table, rng, 40)  # the image is a copy: what came after is not in it
    got = table.state_of_image(image)
    assert_same_state(got, want)
    assert np.array_equal(got.encoded, want.encoded) if storage != "float32" else got.encoded is None
    for field in dataclasses.fields(want.layout):
        a, b = getattr(got.layout, field.name), getattr(want.layout, field.name)
        assert np.array_equal(a, b) if isinstance(b, np.ndarray) else a == b, field.name
    for name in ("values", "optimizer_state", "freq", "last_step"):
        assert getattr(got, name).flags.c_contiguous, name


def test_a_staged_write_holds_the_tables_as_staged_while_pushes_go_on(tmp_path):
    """stage() copies the tables that fit its budget and writes the others at once; finish() writes
    the copies while pushes (creating, updating, evicting rows) change the tables: the snapshot
    holds every table as it was at stage(), and the next incremental carries what came after."""
    uri = str(tmp_path)
    rng = np.random.default_rng(6)
    small, big = evicting_table("small", seed=7), evicting_table("big", seed=8)
    snapper = ShardSnapshotter({"small": small, "big": big}, 0)
    push(small, rng, 1, n=50)
    push(big, rng, 1, n=400)
    snapper.snapshot(uri, "job", 1, "full")
    for step in (2, 3):
        push(small, rng, step, n=50)
        push(big, rng, step, n=400)
    for step, kind, parent in ((4, "full", None), (5, "incremental", 4)):
        writer = SnapshotWriter(uri, "job", step, kind, parent)
        at_stage = {"small": small.export(), "big": big.export()}
        # A budget the smaller table's whole export fits, not the other's: that one is written now.
        sizes = [_TableWrite(t, 0, NO_CHANGES, True, None).export_bytes() for t in (small, big)]
        assert sizes[0] < sizes[1]
        staged = snapper.stage(writer, sizes[0])
        assert sorted(staged.written) == [0] and sorted(staged.pending) == [1]  # "big", then "small"
        assert list((tmp_path / "job" / str(step) / "big").iterdir())
        assert not (tmp_path / "job" / str(step) / "small").exists()
        push(small, rng, step + 10, n=50)  # training goes on
        push(big, rng, step + 10, n=400)
        staged.finish()
        writer.commit()
        snapper.mark_committed(step)
        got = restore(uri, "job", step)
        for name in ("small", "big"):
            assert_same_state(got[name][0], at_stage[name])
    push(small, rng, 20)
    snapper.snapshot(uri, "job", 6, "incremental")
    got = restore(uri, "job", 6)
    for name, table in (("small", small), ("big", big)):
        assert_same_state(got[name][0], table.export())


def test_an_incremental_on_an_older_parent_than_the_last_commit_carries_every_change(tmp_path):
    """The changes a snapshotter holds are those since its last committed step; an incremental on
    an older parent, named by the caller, carried only those and lost the rows changed between
    the two (restored: keys missing). It now carries every row and the parent's keys that are gone."""
    uri = str(tmp_path)
    rng = np.random.default_rng(9)
    table = evicting_table("t", seed=2)
    snapper = ShardSnapshotter({"t": table}, 0)
    push(table, rng, 1)
    snapper.snapshot(uri, "job", 10, "full")
    push(table, rng, 2)
    snapper.snapshot(uri, "job", 20, "incremental")
    push(table, rng, 3)
    snapper.snapshot(uri, "job", 30, "incremental", parent=10)
    assert read_manifest(uri, "job", 30).parent == 10
    assert_same_state(restore(uri, "job", 30)["t"][0], table.export())
    push(table, rng, 4)
    snapper.snapshot(uri, "job", 40, "incremental")  # on 30, the last committed: changes since it
    assert_same_state(restore(uri, "job", 40)["t"][0], table.export())


def test_a_step_committed_before_latest_moved_is_the_latest(tmp_path):
    """A writer killed after its manifest and before LATEST has committed its step: resuming from
    the older step LATEST names would reach it again and find it already committed."""
    uri = str(tmp_path)
    state = evicting_table("t", seed=0).export()
    write_state(uri, "job", 60, state)
    write_state(uri, "job", 80, state)
    (tmp_path / "job/LATEST").write_text("60\n")  # as the killed writer left it
    assert latest(uri, "job") == 80
    assert read_manifest(uri, "job").step == 80
    with pytest.raises(SnapshotError, match="already committed"):
        ShardSnapshotter({"t": evicting_table("t", seed=0)}, 0).snapshot(uri, "job", 80)



def test_a_second_writer_of_a_step_cannot_replace_the_first_ones_manifest(tmp_path):
    """Two jobs of one name and uri both open step 7 before either commits (each saw no manifest).
    The later commit replaced the earlier one's manifest: both reported step 7 committed, and its
    restore failed on a file the manifest did not describe. The first commit stands; the second
    is refused, naming the cause."""
    uri = str(tmp_path)
    state = evicting_table("t", seed=0).export()
    first, second = SnapshotWriter(uri, "job", 7), SnapshotWriter(uri, "job", 7)
    first.write_table_shard("t", 0, state)
    first.commit()
    manifest = (tmp_path / "job/7/manifest.json").read_bytes()
    second.write_table_shard("t", 0, state)  # the same rows: only the manifests race here
    with pytest.raises(SnapshotError, match="another writer committed this step while this one wrote it"):
        second.commit()
    assert (tmp_path / "job/7/manifest.json").read_bytes() == manifest
    assert sorted(p.name for p in (tmp_path / "job/7").iterdir()) == ["manifest.json", "t"]  # no temporary left
    assert_same_state(restore(uri, "job", 7)["t"][0], state)
    assert latest(uri, "job") == 7


def test_incomplete_steps_are_ignored_and_latest_falls_back(tmp_path):
    uri = str(tmp_path)
    state = evicting_table("t", seed=0).export()
    write_state(uri, "job", 5, state)
    (tmp_path / "job/9/t").mkdir(parents=True)
    (tmp_path / "job/9/t/shard-0.parquet").write_bytes(b"partial")
    (tmp_path / "job/8").mkdir()
    (tmp_path / "job/8/manifest.json").write_text('{"format": "embps.snapshot", "format_vers')
    assert [m.step for m in list_snapshots(uri, "job")] == [5]
    assert latest(uri, "job") == 5
    (tmp_path / "job/LATEST").write_text("9\n")  # names a step without a manifest
    assert latest(uri, "job") == 5
    with pytest.raises(SnapshotError, match="no manifest"):
        open_snapshot(uri, "job", 9)
    with pytest.raises(SnapshotCorruptError, match="not a valid embps manifest"):
        open_snapshot(uri, "job", 8)
    assert latest(uri, "other") is None
    with pytest.raises(SnapshotError, match="no committed snapshot"):
        restore(uri, "other")


def test_corrupt_files_are_rejected_with_the_reason(tmp_path):
    uri = str(tmp_path)
    table = evicting_table("t", seed=0)
    push(table, np.random.default_rng(0), 1)
    ShardSnapshotter({"t": table}, 0).snapshot(uri, "job", 1, extras={"trainer_state.json": b"{}"})
    rows = shard_file(tmp_path / "job/1", "t", 0)
    good = rows.read_bytes()
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0xFF
    rows.write_bytes(bytes(flipped))
    with pytest.raises(SnapshotCorruptError, match="sha256 .* differs from the manifest"):
        restore(uri, "job")
    rows.write_bytes(good[:-100])
    with pytest.raises(SnapshotCorruptError, match=f"{len(good) - 100} bytes, the manifest says {len(good)}"):
        restore(uri, "job")
    rows.write_bytes(good)
    restore(uri, "job")
    manifest_path = tmp_path / "job/1/manifest.json"
    original = manifest_path.read_text()
    manifest = json.loads(original)
    manifest["files"][manifest["tables"]["t"]["shards"]["0"]["files"][0]]["sha256"] = "0" * 64
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(SnapshotCorruptError, match="differs from the manifest's 0000"):
        load_table_shard(uri, "job", 1, "t", 0)
    manifest_path.write_text(original)
    (tmp_path / "job/1/extra/trainer_state.json").write_bytes(b"[]")
    with pytest.raises(SnapshotCorruptError, match="trainer_state.json: sha256"):
        read_extra(uri, "job", 1, "trainer_state.json")
    os.remove(shard_file(tmp_path / "job/1", "t", 0, ".pending.parquet"))
    with pytest.raises(SnapshotCorruptError, match="missing"):
        load_table_shard(uri, "job", 1, "t", 0)


def _two_steps(tmp_path, second: str) -> str:
    """Steps 1 (full) and 2 (`second`) of job "job" of one evicting table under tmp_path; the uri."""
    uri = str(tmp_path)
    table = evicting_table("t", seed=0)
    snapper = ShardSnapshotter({"t": table}, 0)
    push(table, np.random.default_rng(0), 1)
    snapper.snapshot(uri, "job", 1)
    push(table, np.random.default_rng(1), 2)
    snapper.snapshot(uri, "job", 2, second)
    return uri


@pytest.mark.parametrize(
    "parent, why",
    [(2, r"parent 2: not an earlier step than 2"), (3, r"parent 3: not an earlier step than 2"),
     (None, r"kind incremental with parent None")],
)
def test_a_manifest_whose_parent_is_not_an_earlier_step_is_corrupt(tmp_path, parent, why):
    """A chain is walked parent by parent: a parent at or after its own step (a hand-edited or
    damaged manifest) looped restore and gc forever; such a step is now corrupt, and latest()
    passes over it."""
    uri = _two_steps(tmp_path, "incremental")
    path = tmp_path / "job/2/manifest.json"
    manifest = json.loads(path.read_text())
    manifest["parent"] = parent
    path.write_text(json.dumps(manifest))
    with pytest.raises(SnapshotCorruptError, match=why):
        restore(uri, "job", 2)
    assert latest(uri, "job") == 1
    assert collect_garbage(uri, "job", keep=1).kept == (1,)


def _damage(manifest: dict, change: str) -> str:
    table = manifest["tables"]["t"]
    shard = table["shards"]["0"]
    if change == "size-inf":
        size = next(iter(manifest["files"].values()))["size"]
        return json.dumps(manifest).replace(f'"size": {size}', '"size": 1e999', 1)
    if change == "nested":
        return json.dumps({**manifest, "created": None}).replace("null", "[" * 100_000 + "]" * 100_000)
    if change == "no-files":
        shard["files"] = []
    elif change == "dim":
        table["dim"] = table["dim"] * 2
    elif change == "dim-negative":
        table["dim"] = -table["dim"]
    elif change == "rows-string":
        shard["rows"] = str(shard["rows"])
    elif change == "shard-outside":
        table["shards"] = {"-1": shard}
    elif change == "step-float":
        manifest["step"] = 1.5
    elif change == "shard-missing":
        manifest["num_shards"] = 2
    elif change == "escaping-path":
        shard["files"][0] = "../" + shard["files"][0]
    elif change == "config-string":
        table["config"] = "sgd"
    elif change == "one-file":
        shard["files"] = shard["files"][:1]
    return json.dumps(manifest)


@pytest.mark.parametrize(
    "change, why",
    [
        ("size-inf", r"\.size: must be an integer in \[0, \d+\], got inf"),
        ("nested", r"RecursionError"),
        ("no-files", r"tables\.t\.shards\.0\.files: must be a non-empty list"),
        ("dim", r"a list column of 4 values a row where the manifest gives 8"),
        ("dim-negative", r"tables\.t\.dim: must be an integer in \[1, 65536\], got -4"),
        ("rows-string", r"tables\.t\.shards\.0\.rows: must be an integer"),
        ("shard-outside", r"tables\.t\.shards: '-1' is not a shard of \[0, 1\)"),
        ("step-float", r"step: must be an integer in \[0, "),
        ("shard-missing", r"table t: shards \[0\], expected 0\.\.1"),
        ("escaping-path", r"file path '\.\./t/.*must be relative to the step folder"),
        # `embps snapshot inspect` indexed it and died on a TypeError traceback
        ("config-string", r"tables\.t\.config: must be an object or null, got str 'sgd'"),
        # the pending keys' file is read by position: an IndexError traceback, a restoring shard's exit 1
        ("one-file", r"tables\.t\.shards\.0\.files: 1 files, a full snapshot's shard has at least 2"),
    ],
)
def test_a_damaged_manifest_is_corrupt_and_passed_over(tmp_path, change, why):
    """A manifest's values were taken as they came: a size of 1e999 or JSON nested deep raised past
    the parser (one bad step broke latest, gc and every listing of the job), no files an IndexError
    that killed a restoring shard, a dim that is not the files' a bare numpy reshape error (a dim of
    -4 was even read as "any"), and paths with '..' read outside the step's folder. A table
    without one of the step's shards was read as valid, and the shard restoring it died on a
    KeyError (exit 1, not "snapshot unusable": the launcher never fell back to an older step)."""
    uri = _two_steps(tmp_path, "full")
    path = tmp_path / "job/2/manifest.json"
    path.write_text(_damage(json.loads(path.read_text()), change))
    with pytest.raises(SnapshotCorruptError, match=why):
        load_table_shard(uri, "job", 2, "t", 0)
    if change != "dim":  # a dim that parses is found by the rows it reads
        assert latest(uri, "job") == 1
        assert [m.step for m in list_snapshots(uri, "job")] == [1]
        assert collect_garbage(uri, "job", keep=1).kept == (1,)


def test_a_table_named_as_a_step_folder_s_own_entry_is_refused(tmp_path):
    """A table's files go to <step>/<table>/: a table called manifest.json took the manifest's place
    (every commit refused as "another writer committed this step", then every listing of the job
    failed on a folder where a manifest is read); "extra" mixed its files with the extras'."""
    for name in ("manifest.json", "manifest.json.unusable", "extra"):
        with pytest.raises(ValueError, match=f"{name}.name: '{name}' is a snapshot step folder's own entry"):
            TableConfig(name, dim=4).validate()
        writer = SnapshotWriter(str(tmp_path), "job", 1)
        with pytest.raises(ValueError, match=f"table: '{name}' is a snapshot step folder's own entry"):
            writer.write_table_shard(name, 0, evicting_table("t", seed=0).export())
    assert latest(str(tmp_path), "job") is None


def test_a_step_folder_of_other_digits_is_not_a_step(tmp_path):
    """'²' passed str.isdigit() and int() raised, breaking every listing; '01' was read as step 1."""
    uri = str(tmp_path)
    table = evicting_table("t", seed=0)
    push(table, np.random.default_rng(0), 1)
    ShardSnapshotter({"t": table}, 0).snapshot(uri, "job", 1)
    (tmp_path / "job" / "\u00b2").mkdir()
    (tmp_path / "job" / "01").mkdir()
    assert latest(uri, "job") == 1
    assert [m.step for m in list_snapshots(uri, "job")] == [1]


def test_writer_refuses_what_it_cannot_commit(tmp_path):
    uri = str(tmp_path)
    state = evicting_table("t", seed=0).export()
    with pytest.raises(ValueError, match="parent"):
        SnapshotWriter(uri, "job", 2, "incremental")
    with pytest.raises(ValueError, match="parent: must be an earlier step"):
        SnapshotWriter(uri, "job", 2, "incremental", parent=2)
    with pytest.raises(ValueError, match="job: must be a name of letters"):
        SnapshotWriter(uri, "../x", 2)
    with pytest.raises(ValueError, match="kind"):
        SnapshotWriter(uri, "job", 2, "partial")
    writer = SnapshotWriter(uri, "job", 2, "incremental", parent=1)
    writer.write_table_shard("t", 0, state)
    with pytest.raises(SnapshotError, match="parent step 1 is unusable"):
        writer.commit()
    write_state(uri, "job", 1, state)
    with pytest.raises(SnapshotError, match="already committed"):
        SnapshotWriter(uri, "job", 1)
    writer = SnapshotWriter(uri, "job", 3, num_shards=2)
    writer.write_table_shard("t", 1, state)
    with pytest.raises(ValueError, match="written twice"):
        writer.write_table_shard("t", 1, state)
    with pytest.raises(ValueError, match="deleted_keys: only an incremental"):
        writer.write_table_shard("t", 0, state, np.array([1]))
    with pytest.raises(SnapshotError, match=r"shards \[1\] written, expected 0..1"):
        writer.commit()
    assert latest(uri, "job") == 1
    writer = SnapshotWriter(uri, "job", 4, "incremental", parent=1)
    writer.write_table_shard("t", 0, state)
    writer.commit()
    with pytest.raises(SnapshotError, match="already committed; start a new SnapshotWriter"):
        writer.write_extra("late", b"")
    manifest_path = tmp_path / "job/4/manifest.json"
    manifest_path.write_text(manifest_path.read_text().replace('"parent": 1', '"parent": 3'))
    with pytest.raises(SnapshotError, match="step 4 is incremental on step 3, which is unusable"):
        restore(uri, "job", 4)


_KILLED_WRITER = """
import sys
import numpy as np
from ps.snapshot.files import SnapshotWriter
from ps.table.state import TableState
n, dim = 400_000, 64
rng = np.random.default_rng(0)
state = TableState(np.arange(n, dtype=np.int64), rng.standard_normal((n, dim), dtype=np.float32),
    np.zeros((n, dim), np.float32), np.ones(n, np.uint32), np.ones(n, np.uint32),
    np.empty(0, np.int64), np.empty(0, np.uint32), np.empty(0, np.uint32), 9, 2)
writer = SnapshotWriter(sys.argv[1], "job", 2)
for table in ("a", "b", "c", "d"):
    writer.write_table_shard(table, 0, state)
writer.commit()
"""


def test_a_second_writer_of_a_committed_step_leaves_the_files_its_manifest_names(tmp_path):
    """Two processes may write one step: a primary deposed mid-write (cut off from the arbiter, not
    from storage) beside the standby that took over and wrote the coordinator's retry, or a try the
    coordinator gave up on beside the next. Both wrote <table>/shard-<s>.parquet: the late writer
    replaced the files of a committed step, whose manifest's checksums then failed every restore
    (SnapshotCorruptError: the snapshot was lost). Each writer's files now carry its own id."""
    uri = str(tmp_path)
    table = evicting_table("t", seed=0)
    push(table, np.random.default_rng(0), 1)
    committed_state = table.export()
    retry = SnapshotWriter(uri, "job", 1, num_shards=1)
    deposed = SnapshotWriter(uri, "job", 1, num_shards=1)  # started first, finishes last
    retry.write_table_shard("t", 0, committed_state)
    retry.commit()
    push(table, np.random.default_rng(1), 2)  # the deposed primary's rows moved on meanwhile
    deposed.write_table_shard("t", 0, table.export())
    assert_same_state(restore(uri, "job")["t"][0], committed_state)


def test_writer_killed_mid_write_leaves_previous_snapshot_and_latest(tmp_path):
    uri = str(tmp_path)
    table = evicting_table("a", seed=0)
    push(table, np.random.default_rng(0), 1)
    ShardSnapshotter({"a": table}, 0).snapshot(uri, "job", 1)
    latest_before = (tmp_path / "job/LATEST").read_bytes()
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, uri], cwd=REPO_ROOT)
    folder = tmp_path / "job/2/a"

    def first_file_written() -> bool:
        return any(folder.glob("shard-0-*.parquet"))

    deadline = time.monotonic() + 60
    while not first_file_written() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(30) == -signal.SIGKILL, "the writer finished before it could be killed"
    assert first_file_written() and not (tmp_path / "job/2/manifest.json").exists()
    assert (tmp_path / "job/LATEST").read_bytes() == latest_before
    assert [m.step for m in list_snapshots(uri, "job")] == [1] and latest(uri, "job") == 1
    assert_same_state(restore(uri, "job")["a"][0], table.export())
    # A new writer can take the step over the debris.
    push(table, np.random.default_rng(1), 2)
    ShardSnapshotter({"a": table}, 0).snapshot(uri, "job", 2)
    assert latest(uri, "job") == 2
    assert_same_state(restore(uri, "job")["a"][0], table.export())


def _history(uri: str) -> dict[str, EmbeddingTable]:
    """full 10, incremental 20 and 30, with extras; returns the live tables."""
    rng = np.random.default_rng(6)
    tables = {"user": evicting_table("user", 1), "item": evicting_table("item", 2, OptimizerKind.SGD)}
    snapper = ShardSnapshotter(tables, 0)
    for step, kind in ((10, "full"), (20, "incremental"), (30, "incremental")):
        for table in tables.values():
            push(table, rng, step)
        snapper.snapshot(uri, "job", step, kind, extras={"dense.pt": f"dense@{step}".encode()})
    return tables


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_export_for_serving(tmp_path, dtype):
    src, dst = str(tmp_path / "snaps"), f"file://{tmp_path}/serving"
    tables = _history(src)
    manifest = export_for_serving(src, "job", None, dst, dtype=dtype)
    assert (manifest.kind, manifest.step, manifest.parent) == ("export", 30, None)
    assert latest(dst, "job") == 30 and (tmp_path / "serving/job/LATEST").read_text() == "30\n"
    exported = open_snapshot(dst, "job")
    assert exported.read_extra("dense.pt") == b"dense@30"
    for name, table in tables.items():
        assert exported.manifest.tables[name].dtype == dtype
        keys, values = exported.load_values(name, 0)
        want = table.export()
        assert np.array_equal(keys, want.keys) and values.dtype == np.dtype(dtype)
        np.testing.assert_allclose(
            values, want.values, rtol=1e-3 if dtype == "float16" else 0, atol=1e-4 * (dtype == "float16")
        )
    with pytest.raises(SnapshotError, match="export"):
        exported.load_table_shard("user", 0)
    with pytest.raises(ValueError, match="dtype"):
        export_for_serving(src, "job", None, str(tmp_path / "x"), dtype="int8")


@pytest.mark.parametrize("inside", ["job/7", "job/10", "job/exports"])
def test_export_inside_the_jobs_snapshots_is_refused(tmp_path, inside):
    """An export under the source job's folder: one in a folder named like a step (job/7, job/10)
    was deleted by the job's next gc (a stale unfinished step, or a step past `keep`) while
    replicas loaded it. One under any other name is refused too: the job's folder is its gc's."""
    src = str(tmp_path / "snaps")
    _history(src)  # 10 full, 20 and 30 incremental
    dst = tmp_path / "snaps" / inside
    where = re.escape(f"the export would go to {dst}/job, inside {tmp_path}/snaps/job, the snapshots of job 'job'")
    with pytest.raises(ValueError, match=f"dst_uri: {where}"):
        export_for_serving(src, "job", None, f"file://{dst}")
    assert not (dst / "job").exists()
    # The other way round: the exports' folder holding the job's snapshots (their gc deleted them).
    with pytest.raises(ValueError, match=re.escape(f"dst_uri: the export would go to {tmp_path}/snaps, which holds ")):
        export_for_serving(str(tmp_path / "snaps/7"), "snaps", None, str(tmp_path))
    assert sorted(os.listdir(tmp_path / "snaps/job")) == ["10", "20", "30", "LATEST"]


def test_an_export_to_a_file_or_under_one_is_refused_naming_the_destination(tmp_path, capsys):
    """A destination that is a file, lies under one, or holds a file named as the job: the export read
    the whole snapshot, then failed writing its first file on "Not a directory" (the CLI: exit 1, a
    line that named neither --dst nor what was wrong with it; the API: StorageUnavailableError)."""
    src = str(tmp_path / "snaps")
    _history(src)
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    (tmp_path / "exports").mkdir()
    (tmp_path / "exports/job").write_text("not a folder")
    for dst, file in (
        (str(afile), afile),
        (f"file://{afile}", afile),
        (f"{afile}/sub", afile),
        (str(tmp_path / "exports"), tmp_path / "exports/job"),
    ):
        message = f"the export would go to {dst.removeprefix('file://')}/job, and {str(file)!r} is a file"
        with pytest.raises(ValueError, match=re.escape(f"dst_uri: {message}")):
            export_for_serving(src, "job", None, dst)
        assert embps.main(["snapshot", "export", src, "--job", "job", "--dst", dst]) == 2
        assert capsys.readouterr().err == f"embps snapshot export: --dst: {message}; give a folder\n"
    assert afile.read_text() == (tmp_path / "exports/job").read_text() == "not a folder"


def test_gc_keeps_newest_and_what_they_build_on(tmp_path):
    uri = str(tmp_path)
    _history(uri)  # 10 full, 20 and 30 incremental
    (tmp_path / "job/5").mkdir()  # an old incomplete step: removed
    (tmp_path / "job/99").mkdir()  # newer than every committed step: may be in progress, kept
    result = collect_garbage(uri, "job", keep=1)
    assert result.kept == (10, 20, 30) and result.deleted == () and result.deleted_incomplete == (5,)
    state = restore(uri, "job")
    writer = SnapshotWriter(uri, "job", 40)
    for name, shards in state.items():
        writer.write_table_shard(name, 0, shards[0])
    writer.commit()
    assert collect_garbage(uri, "job", keep=2, dry_run=True).kept == (10, 20, 30, 40)  # 30 needs 10 and 20
    assert collect_garbage(uri, "job", keep=1, dry_run=True).deleted == (10, 20, 30)
    assert [m.step for m in list_snapshots(uri, "job")] == [10, 20, 30, 40]
    result = collect_garbage(uri, "job", keep=1)
    assert result.kept == (40,) and result.deleted == (10, 20, 30)
    assert sorted(os.listdir(tmp_path / "job")) == ["40", "99", "LATEST"]
    with pytest.raises(ValueError, match="keep"):
        collect_garbage(uri, "job", keep=0)
    # A job name is one path component: ".." collected the snapshots of the folder above the URI.
    with pytest.raises(ValueError, match=r"job: must be .* got '\.\.'"):
        collect_garbage(str(tmp_path / "job" / "40"), "..", keep=1)
    assert sorted(os.listdir(tmp_path / "job")) == ["40", "99", "LATEST"]


def test_gc_beside_another_gc_of_the_job(tmp_path, monkeypatch):
    """Two gcs of one job at once (a training job's own after a round, a scheduled `embps snapshot
    gc`): the one that finds a step already deleted by the other goes on. It raised the other's
    FileNotFoundError and left the steps after it (a review's race, both on disk and on S3). Here
    the other gc runs between this one's reading of the manifests and its deletions."""
    import shutil

    import ps.snapshot.ops as ops

    uri = str(tmp_path)
    _history(uri)  # 10 full, 20 and 30 incremental
    state = restore(uri, "job")
    writer = SnapshotWriter(uri, "job", 40)
    for name, shards in state.items():
        writer.write_table_shard(name, 0, shards[0])
    writer.commit()
    read_manifest_at = ops.read_manifest_at

    def read_then_another_gc_deletes(fs, job_dir, step):
        manifest = read_manifest_at(fs, job_dir, step)
        if step in (10, 20):  # the other gc got to these first: the manifest gone, the folder too
            shutil.rmtree(tmp_path / "job" / str(step))
        return manifest

    monkeypatch.setattr(ops, "read_manifest_at", read_then_another_gc_deletes)
    result = collect_garbage(uri, "job", keep=1)
    assert result.kept == (40,) and result.deleted == (10, 20, 30)
    assert sorted(os.listdir(tmp_path / "job")) == ["40", "LATEST"]


def test_cli_list_inspect_export_gc(tmp_path, capsys):
    uri = str(tmp_path / "snaps")
    _history(uri)
    assert embps.main(["snapshot", "list", uri, "--job", "job"]) == 0
    out = capsys.readouterr().out
    assert "incremental" in out and "LATEST" in out and all(str(s) in out for s in (10, 20, 30))
    assert embps.main(["snapshot", "inspect", uri, "--job", "job", "--step", "20"]) == 0
    out = capsys.readouterr().out
    assert "step 20" in out and "user" in out and "item" in out and "dense.pt" in out
    dst = str(tmp_path / "serving")
    assert embps.main(["snapshot", "export", uri, "--job", "job", "--dst", dst, "--dtype", "float16"]) == 0
    assert latest(dst, "job") == 30
    assert embps.main(["snapshot", "gc", uri, "--job", "job", "--keep", "1"]) == 0
    assert "kept 10, 20, 30" in capsys.readouterr().out
    # ".." as the job reached the folder above the URI (and exited 1 for list, 0 for gc).
    assert embps.main(["snapshot", "gc", str(tmp_path / "snaps" / "job"), "--job", "..", "--keep", "1"]) == 2
    assert "embps snapshot gc: --job: must be" in capsys.readouterr().err
    out = subprocess.run(
        [sys.executable, "-m", "embps", "snapshot", "inspect", uri, "--job", "nope"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode != 0 and "no committed snapshot" in out.stderr
    # A table config without an optimizer (written by hand, or by another tool): inspect printed
    # "embps snapshot inspect: 'optimizer'" and exited 1.
    manifest_path = tmp_path / "snaps/job/30/manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["tables"]["user"]["config"] = {"dim": 8}
    manifest_path.write_text(json.dumps(manifest))
    assert embps.main(["snapshot", "inspect", uri, "--job", "job", "--step", "30"]) == 0
    assert "float32, unknown optimizer (state width" in capsys.readouterr().out
    # An int8 table's rows read as float32 and are kept as int8: inspect said "float32" alone.
    manifest["tables"]["user"]["config"] = {"dim": 8, "storage": "int8"}
    manifest_path.write_text(json.dumps(manifest))
    assert embps.main(["snapshot", "inspect", uri, "--job", "job", "--step", "30"]) == 0
    assert "table user: dim 4 float32, stored int8, unknown optimizer" in capsys.readouterr().out


def test_tracking_starts_with_snapshots_and_past_its_bound_an_incremental_carries_every_row(tmp_path):
    uri = str(tmp_path)
    rng = np.random.default_rng(6)
    table = evicting_table("t", seed=7)
    snapper = ShardSnapshotter({"t": table}, 0)
    push(table, rng, 1)
    assert not table.tracks_changes  # no snapshot yet: no history kept
    with pytest.raises(SnapshotError, match="wrote no full snapshot"):
        snapper.write(SnapshotWriter(uri, "job", 1, "incremental", parent=0))
    table.enable_change_tracking(max_keys=50)
    snapper.snapshot(uri, "job", 1, "full")
    evicted = table.num_evicted
    for step in range(2, 12):
        push(table, rng, step, n=400)
    assert table.num_evicted > evicted
    snapper.snapshot(uri, "job", 2, "incremental")  # more than 50 keys changed: every row travels
    manifest = read_manifest(uri, "job", 2)
    assert manifest.kind == "incremental" and manifest.total_rows == table.size
    assert_same_state(restore(uri, "job")["t"][0], table.export())
    push(table, rng, 6, n=10)  # back under the bound: a small incremental again
    snapper.snapshot(uri, "job", 3, "incremental")
    assert 0 < read_manifest(uri, "job", 3).total_rows < table.size
    assert_same_state(restore(uri, "job")["t"][0], table.export())


def test_a_job_of_full_snapshots_keeps_no_changes_past_the_step_it_committed(tmp_path):
    """full_every = 1: no request names a parent, so a shard never learnt that its writes were
    committed and kept every change of the run for an incremental that never came, merged again
    each round (memory and write time grew with the run). The coordinator names the step it
    committed last (last_committed): the shard then holds one write's changes."""
    from ps.job_config import SnapshotConfig
    from ps.rpc import snapshot_pb2
    from ps.shard.snapshot_service import SnapshotControlServicer
    from ps.snapshot.manifest import ShardRecord
    from tests.helpers.processes import make_job

    uri = str(tmp_path)
    config = TableConfig("t", dim=4, optimizer=OptimizerConfig(kind=OptimizerKind.SGD, lr=0.1))
    job = dataclasses.replace(make_job([config], num_shards=1, job="job"), snapshot=SnapshotConfig(uri))
    table = EmbeddingTable(config)
    servicer = SnapshotControlServicer(job, 0, {"t": table}, run_serialized=None, call_site=None)
    held = []
    for step in range(1, 9):
        keys = np.arange(1000 * step, 1000 * step + 1000, dtype=np.int64)  # new keys each round
        table.apply_gradients(keys, np.ones((1000, 4), np.float32), step=step)
        request = snapshot_pb2.WriteSnapshotRequest(uri=uri, job="job", step=step, kind="full", num_shards=1)
        if step > 1:
            request.last_committed = step - 1
        reply = servicer.write(request, servicer.open_writer(request))
        writer = SnapshotWriter(uri, "job", step, "full", num_shards=1)
        for record in json.loads(reply.records_json):
            writer.add_shard_record(ShardRecord.from_dict(record))
        writer.commit()
        held.append(servicer.snapshotter.unconfirmed_keys)
    # Tracked from the first full write on: then the last write's keys only (before: 0, 1000, 2000, ...).
    assert held == [0] + [1000] * 7, held
    # And an incremental on the last step carries only what changed since it.
    table.apply_gradients(np.arange(5, dtype=np.int64), np.ones((5, 4), np.float32), step=9)
    request = snapshot_pb2.WriteSnapshotRequest(uri=uri, job="job", step=9, kind="incremental", parent=8,
                                                num_shards=1)
    records = json.loads(servicer.write(request, servicer.open_writer(request)).records_json)
    assert [r["entry"]["rows"] for r in records] == [5], records


def test_a_local_snapshot_is_synced_to_disk_before_its_manifest_names_it(tmp_path, monkeypatch):
    """Nothing was fsynced (a review's strace of a round: no sync call), so after a power loss a
    committed manifest could name files never written out. Every file of the step, every folder
    from the step's files up to the job's, the manifest and LATEST are synced now."""
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    table = evicting_table("t", seed=0)
    push(table, np.random.default_rng(0), 1)
    ShardSnapshotter({"t": table}, 0).snapshot(str(tmp_path), "job", 1)
    step = tmp_path / "job" / "1"
    manifest = json.loads((step / "manifest.json").read_text())
    files = [step / path for path in manifest["files"]]
    assert files and all(str(f) in synced for f in files), (files, synced)
    folders = {f.parent for f in files} | {step, step.parent}
    folders |= {p for f in files for p in f.parents if step in p.parents}
    assert all(str(folder) in synced for folder in folders), (folders, synced)
    assert str(step / "manifest.json") not in synced  # synced as its temporary file, then moved
    assert any(s.startswith(str(step / "manifest.json.tmp-")) for s in synced)
    assert any(s.startswith(str(tmp_path / "job" / "LATEST.tmp-")) for s in synced)
    assert synced.index(str(step.parent)) < next(i for i, s in enumerate(synced) if "manifest.json.tmp-" in s)


def test_a_step_of_no_files_commits(tmp_path):
    """The commit synced the step's folder before anything had made it (the diff review's repro:
    FileNotFoundError for a step with no files)."""
    SnapshotWriter(str(tmp_path), "job", step=1, kind="full", num_shards=1).commit()
    assert latest(str(tmp_path), "job") == 1


def test_many_tables_written_by_threads_restore_as_live(tmp_path, monkeypatch):
    """A shard's tables are written on several threads (ops.run_bounded): full, an incremental
    of the changes, and an incremental whose changes overflowed (every row, the gone keys as
    deletions) restore every table as it lives, with a byte bound small enough that some of the
    tables are written alone."""
    from ps.snapshot import bounded

    monkeypatch.setattr(bounded, "BYTES_IN_FLIGHT", 2 * 300 * (4 * evicting_table("x", 0).width + 16) * 3)
    tables = {f"t{i:02d}": evicting_table(f"t{i:02d}", seed=i) for i in range(24)}
    rng = np.random.default_rng(5)
    snapper = ShardSnapshotter(tables, 0)
    for step in range(1, 4):
        for table in tables.values():
            push(table, rng, step)
    snapper.snapshot(str(tmp_path), "job", 3, "full")
    for step in range(4, 7):
        for name in list(tables)[::2]:  # half the tables change
            push(tables[name], rng, step)
    snapper.snapshot(str(tmp_path), "job", 6, "incremental")
    tables["t05"].forget_changes()
    push(tables["t05"], rng, 7, key_range=4000)
    manifest = snapper.snapshot(str(tmp_path), "job", 7, "incremental")
    assert sorted(manifest.tables) == sorted(tables)
    restored = restore(str(tmp_path), "job", 7)
    for name, table in tables.items():
        assert_same_state(restored[name][0], table.export())


def test_run_bounded_order_bound_and_first_failure():
    import threading

    from ps.snapshot.bounded import run_bounded

    lock = threading.Lock()
    running, peak_bytes, peak = [0, 0], [0], [0]
    first_three = threading.Barrier(3, timeout=30)  # they fit both bounds: all three run at once

    def task(i: int, size: int):
        def run() -> int:
            with lock:
                running[0] += 1
                running[1] += size
                peak[0], peak_bytes[0] = max(peak[0], running[0]), max(peak_bytes[0], running[1])
            if i < 3:
                first_three.wait()
            with lock:
                running[0] -= 1
                running[1] -= size
            return i

        return size, lambda: run  # started on this thread, run on the pool

    sizes = [10, 10, 10, 10, 50, 10, 10, 10, 10, 10]
    assert run_bounded([task(i, s) for i, s in enumerate(sizes)], threads=3, max_bytes=30) == list(range(10))
    assert peak[0] == 3
    assert peak_bytes[0] <= 50  # the 50-byte task ran alone: over the bound, it still ran

    started = []

    def failing(i: int):
        def run() -> int:
            started.append(i)
            if i in (2, 3):
                raise OSError(f"task {i} failed")
            return i

        return 1, lambda: run

    with pytest.raises(OSError, match="task 2 failed"):
        run_bounded([failing(i) for i in range(200)], threads=2, max_bytes=100)
    assert len(started) < 200  # none started once a failure was seen


RETAINED_RSS_SCRIPT = """
import sys, tempfile
import numpy as np
from ps.snapshot.ops import ShardSnapshotter
from ps.table.config import AdmissionConfig, AdmissionKind, TableConfig
from ps.table.embedding_table import EmbeddingTable

def rss():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) << 10 for line in f if line.startswith("VmRSS:"))

tables = {}
for i in range(8):
    admission = AdmissionConfig(kind=AdmissionKind.COUNT, min_count=2)
    table = EmbeddingTable(TableConfig(f"t{i}", dim=8, admission=admission))
    keys = np.arange(i * 10**8, i * 10**8 + 500_000, dtype=np.int64)
    table.apply_gradients(keys, np.zeros((keys.shape[0], 8), dtype=np.float32), step=1)
    tables[table.name] = table
snapper = ShardSnapshotter(tables, 0)
base = rss()
for step in (10, 11):
    snapper.snapshot(sys.argv[1], "job", step)
print((rss() - base) >> 20)
"""


def test_snapshot_rounds_hand_their_memory_back(tmp_path):
    """A shard's RSS after snapshot rounds is about what it was before them: the tables' exports
    are made on the calling thread (bounded.run_bounded), not on the pool's, whose glibc arenas
    kept 150-450 MiB after every round (8 tables of 500,000 pending keys: +150 MiB before)."""
    from ps.process.malloc import MALLOC_TUNING

    env = {**os.environ, **MALLOC_TUNING, "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", RETAINED_RSS_SCRIPT, str(tmp_path)], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert int(done.stdout.split()[-1]) < 48, f"RSS grew {done.stdout.split()[-1]} MiB over two rounds"


def test_run_bounded_raises_an_earlier_tasks_failure_before_a_later_start():
    """A task that failed on the pool comes before a later task's start() that failed too: the
    first failure in task order is the one raised."""
    import threading

    from ps.snapshot.bounded import run_bounded

    failed = threading.Event()

    def fails() -> None:
        failed.set()
        raise OSError("task 0 failed")

    def start_after_failure():
        failed.wait(30)
        raise ValueError("start 1 failed")

    with pytest.raises(OSError, match="task 0 failed"):
        run_bounded([(1, lambda: fails), (1, start_after_failure)], threads=4, max_bytes=100)
