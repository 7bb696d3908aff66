"""The cut's publication in the replica's stores (serving/cut.py, csrc/serving_store.h's ModelClock):
readers on other threads never see half a cut, across shards and tables, while cuts of thousands
of rows (inserts, updates, deletions, a shard replaced by a full copy) are published back to back;
the waiting deltas are bounded and the one stream holding the cut back always gets through."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import serving.cut
from ps.sharding import ShardMap
from ps.table.config import TableConfig
from serving.cut import Delta, ModelCut
from serving.metrics import ServingMetrics
from serving.store import ShardRows, TableReplica, _embps_gate

NUM_KEYS = 4096
DIM = 8


def make_tables() -> dict[str, TableReplica]:
    shard_map = ShardMap.uniform(2)
    return {name: TableReplica(TableConfig(name, dim=DIM), shard_map) for name in ("user", "item")}


def deltas_of_step(table: TableReplica, step: int, keys: np.ndarray, replace: bool) -> list[tuple[int, Delta]]:
    """Each shard's delta of `step`: every key's row = step, except keys = step mod 7 deleted."""
    out = []
    for s, positions in enumerate(table.shard_map.split(keys)):
        part = keys[positions]
        gone = part[part % 7 == step % 7]
        live = part[part % 7 != step % 7]
        values = np.full((live.shape[0], DIM), float(step), dtype=np.float32)
        if replace and s == 1:
            rows = ShardRows(DIM)
            rows.upsert(live, values)
            empty = np.empty(0, np.int64)
            out.append((s, Delta(step, step, 1, empty, np.empty((0, DIM), np.float32), empty, replace=rows)))
        else:
            out.append((s, Delta(step, step, 1, live, values, gone)))
    return out


@pytest.mark.parametrize("native", [True, False], ids=["native", "python"])
def test_readers_never_see_half_a_cut(native, monkeypatch):
    if native and _embps_gate is None:
        pytest.skip("built without the serving gate's native stores")
    if not native:
        monkeypatch.setattr("serving.store._embps_gate", None)
        monkeypatch.setattr("serving.cut._embps_gate", None)
    tables = make_tables()
    keys = np.arange(NUM_KEYS, dtype=np.int64)
    steps = 60
    stop = threading.Event()
    checked: list[int] = []
    failures: list[str] = []

    def read() -> None:
        while not stop.is_set():
            def answer(version: int) -> list[tuple[np.ndarray, np.ndarray, list]]:
                return [t.lookup_served(keys, version=version) for t in tables.values()]

            results, version = cut.read(answer)
            for values, found, served in results:
                expected_gone = (keys % 7 == version % 7) if version else np.ones(NUM_KEYS, bool)
                if not np.array_equal(found, ~expected_gone) or not (values[found] == version).all():
                    failures.append(f"version {version}: rows of steps {sorted(set(values[found, 0].tolist()))}")
                    return
                if served != [(version, int(version > 0))] * 2:  # each step's delta: PS version = step
                    failures.append(f"version {version}: rows of the cut, shard versions {served}")
                    return
            checked.append(version)

    async def publish() -> None:
        for step in range(1, steps + 1):
            for name, table in tables.items():
                for s, delta in deltas_of_step(table, step, keys, replace=step % 10 == 0):
                    await cut.offer(name, s, delta)
            assert cut.version == step

    cut = asyncio.run(_make_cut(tables, 1 << 30))
    readers = [threading.Thread(target=read) for _ in range(2)]
    for r in readers:
        r.start()
    try:
        asyncio.run(publish())
    finally:
        stop.set()
        for r in readers:
            r.join()
    assert not failures, failures[:3]
    assert len(set(checked)) > 5, f"the readers saw only versions {sorted(set(checked))}"


def test_a_lookup_while_a_cut_merges_reports_the_cut_s_shard_versions(monkeypatch):
    """A cut is made visible, then merged into the main stores, whose versions move at the end of
    the merge: a lookup in between read the cut's rows (from the pending store) and reported the
    shard versions of the cut before. Here it runs as the merge starts, as a gate thread may."""
    if _embps_gate is None:
        pytest.skip("built without the serving gate's native stores")
    tables = make_tables()
    table = tables["user"]
    keys = np.arange(64, dtype=np.int64)
    seen = []
    merge = serving.cut._merge

    def merge_after_a_lookup(t: TableReplica, s: int, deltas: list[Delta]) -> None:
        if t is table and s == 0:
            (values, found, served), version = cut.read(lambda v: table.lookup_served(keys, version=v))
            seen.append((version, float(values[found][0, 0]), served))
        merge(t, s, deltas)

    monkeypatch.setattr(serving.cut, "_merge", merge_after_a_lookup)

    async def offer() -> None:
        for step in (1, 2):
            for name, t in tables.items():
                for s, positions in enumerate(t.shard_map.split(keys)):
                    part = keys[positions]
                    values = np.full((part.shape[0], DIM), float(step), np.float32)
                    if step == 2 and s == 1:  # shard 1's rows left alone at step 2: only its versions move
                        part, values = part[:0], values[:0]
                    await cut.offer(name, s, Delta(step, 100 * step + s, 7 + step, part, values, part[:0]))

    cut = asyncio.run(_make_cut(tables, 1 << 30))
    asyncio.run(offer())
    assert seen == [(1, 1.0, [(100, 8), (101, 8)]), (2, 2.0, [(200, 9), (201, 9)])], seen


async def _make_cut(tables, max_waiting_bytes: int) -> ModelCut:
    return ModelCut(tables, ServingMetrics(), max_waiting_bytes)


def test_waiting_deltas_are_bounded_and_the_slowest_stream_moves_the_cut():
    tables = {"user": TableReplica(TableConfig("user", dim=DIM), ShardMap.uniform(2))}
    keys = np.arange(1000, dtype=np.int64)
    values = np.ones((1000, DIM), np.float32)
    empty = np.empty(0, np.int64)

    async def run() -> None:
        cut = ModelCut(tables, ServingMetrics(), max_waiting_bytes=3 * (keys.nbytes + values.nbytes))
        for step in (1, 2, 3):  # shard 0 runs ahead; shard 1 is silent
            await cut.offer("user", 0, Delta(step, step, 1, keys, values, empty))
        ahead = asyncio.ensure_future(cut.offer("user", 0, Delta(4, 4, 1, keys, values, empty)))
        await asyncio.sleep(0.05)
        assert not ahead.done() and cut.version == 0  # past the bound: the stream ahead waits
        assert cut.metrics.waiting_deltas._value.get() == 3
        await cut.offer("user", 1, Delta(2, 2, 1, empty, np.empty((0, DIM), np.float32), empty))
        assert cut.version == 2  # the holder got through at once, and the cut moved
        await asyncio.wait_for(ahead, 5)
        assert cut.newest == {("user", 0): 4, ("user", 1): 2} and cut.waiting_bytes > 0

    asyncio.run(run())


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2), st.integers(0, 1), st.integers(0, 6)), max_size=40))
def test_the_cut_is_the_slowest_stream_whatever_order_the_streams_offer_in(offers):
    """The cut keeps the min and max of the streams' newest steps as they move (steps going back
    included: a shard restarted from an older snapshot), without a scan per offer."""
    tables = {f"t{i}": TableReplica(TableConfig(f"t{i}", dim=DIM), ShardMap.uniform(2)) for i in range(3)}
    empty = np.empty(0, np.int64)

    async def run() -> None:
        cut = ModelCut(tables, ServingMetrics(), 1 << 30)
        for table, s, step in offers:
            await cut.offer(f"t{table}", s, Delta(step, step, 1, empty, np.empty((0, DIM), np.float32), empty))
            assert cut.cut_candidate() == min(cut.newest.values())
            lag = cut.metrics.cut_lag_steps._value.get()
            assert lag == max(0, max(cut.newest.values()) - cut.version)
            assert cut.metrics.waiting_deltas._value.get() == sum(len(d) for d in cut.waiting.values())

    asyncio.run(run())


@pytest.mark.skipif(_embps_gate is None, reason="built without the serving gate's native stores")
def test_a_shard_the_step_left_alone_keeps_its_rows_and_moves_its_version():
    """A (table, shard) whose committed range is empty gets no staged store, only its version."""
    tables = make_tables()
    keys = np.arange(64, dtype=np.int64)
    empty = np.empty(0, np.int64)

    async def run() -> ModelCut:
        cut = ModelCut(tables, ServingMetrics(), 1 << 30)
        for step in (1, 2, 3):
            for name, table in tables.items():
                for s, positions in enumerate(table.shard_map.split(keys)):
                    part = keys[positions] if (step == 1 or name == "user") else empty
                    values = np.full((part.shape[0], DIM), float(step), np.float32)
                    await cut.offer(name, s, Delta(step, 10 * step + s, 1, part, values, empty))
        return cut

    cut = asyncio.run(run())
    assert cut.version == 3
    for name, step in (("user", 3.0), ("item", 1.0)):
        (values, found), version = cut.read(lambda v, name=name: tables[name].lookup(keys, version=v))
        assert version == 3 and found.all() and (values == step).all()
        assert [rows.version for rows in tables[name].shards] == [30, 31]


async def _loop_pass() -> None:
    """Returns once the loop has run every callback scheduled before this call (a task created
    just before has run up to its first wait)."""
    loop = asyncio.get_running_loop()
    passed = loop.create_future()
    loop.call_soon(passed.set_result, None)
    await passed


def test_a_stream_held_past_the_bound_goes_on_once_a_stream_that_went_back_catches_up():
    """A stream ahead of the cut waits past max_waiting_bytes; the one that went back (a shard
    restored from an older step) catches up to the served step without publishing a cut (it is not
    past the served version), and the waiting stream must then be let through: else neither moves
    again (the one that went back is ahead by then too) and the replica serves that step forever."""
    tables = {"user": TableReplica(TableConfig("user", dim=DIM), ShardMap.uniform(2))}
    small, big = np.arange(4, dtype=np.int64), np.arange(1000, dtype=np.int64)
    empty = np.empty(0, np.int64)

    def delta(step: int, keys: np.ndarray) -> Delta:
        return Delta(step, step, 1, keys, np.full((keys.shape[0], DIM), float(step), np.float32), empty)

    async def run() -> None:
        cut = ModelCut(tables, ServingMetrics(), max_waiting_bytes=big.nbytes)
        for step in range(1, 9):
            for s in (0, 1):
                await cut.offer("user", s, delta(step, small))
        assert cut.version == 8
        await cut.offer("user", 0, delta(3, big))  # shard 0 went back to step 3: past the bound
        held = asyncio.ensure_future(cut.offer("user", 1, delta(9, small)))
        await _loop_pass()
        assert not held.done()  # ahead of the cut (3) past the bound: it waits
        for step in range(4, 10):  # shard 0 holds the cut back, so it gets through up to step 9
            await cut.offer("user", 0, delta(step, small))
        assert cut.newest == {("user", 0): 9, ("user", 1): 8} and cut.version == 8
        ahead = asyncio.ensure_future(cut.offer("user", 0, delta(10, small)))
        await asyncio.wait_for(held, 5)  # shard 1 (at 8) holds the cut now: it must go on
        await asyncio.wait_for(ahead, 5)
        assert cut.version == 9 and cut.newest == {("user", 0): 10, ("user", 1): 9}

    asyncio.run(run())


@pytest.mark.parametrize("native", [True, False], ids=["native", "python"])
def test_waiting_bytes_return_to_zero_once_a_full_copy_and_the_rows_staged_into_it_are_published(
    native, monkeypatch
):
    """A full copy counts its blocks when offered; the deltas after it are written into it when the
    cut is published, which grows its blocks: what is subtracted on publishing is what was added."""
    if native and _embps_gate is None:
        pytest.skip("built without the serving gate's native stores")
    if not native:
        monkeypatch.setattr("serving.store._embps_gate", None)
        monkeypatch.setattr("serving.cut._embps_gate", None)
    tables = {"user": TableReplica(TableConfig("user", dim=DIM), ShardMap.uniform(2))}
    empty = np.empty(0, np.int64)
    few, many = np.arange(8, dtype=np.int64), np.arange(8, 60_008, dtype=np.int64)

    def delta(step: int, keys: np.ndarray, replace: ShardRows | None = None) -> Delta:
        values = np.full((keys.shape[0], DIM), float(step), np.float32)
        return Delta(step, step, 1, keys, values, empty, replace=replace)

    async def run() -> ModelCut:
        cut = ModelCut(tables, ServingMetrics(), 1 << 40)
        copy = ShardRows(DIM)
        copy.upsert(few, np.ones((few.shape[0], DIM), np.float32))
        await cut.offer("user", 1, Delta(1, 1, 2, empty, np.empty((0, DIM), np.float32), empty, replace=copy))
        await cut.offer("user", 1, delta(2, many))  # staged into the copy: its blocks grow
        before = copy.block_bytes
        await cut.offer("user", 0, delta(2, few))  # one cut publishes the copy and the step after it
        assert cut.version == 2 and copy.block_bytes > before
        return cut

    cut = asyncio.run(run())
    assert cut.waiting_bytes == 0 and not any(cut.waiting.values())


def test_a_stream_whose_range_skipped_a_step_holds_the_cut_until_every_stream_shows_one_step():
    """A shard merges the commits a slow stream missed into one range ending at the newest step
    (ps/shard/commit_stream.py): (user, shard 0) goes from step 15 to 17 in one range while the
    other streams send 16, then 17. The cut was the streams' lowest newest step, 16, and a reply
    at model version 16 held (user, 0)'s rows of 15 beside the others' of 16 (seen once in a busy
    suite run: "one reply at model version 16 holds steps {16.0, 15.0}"). A stream cannot show a
    step its range jumped over: the cut waits for 17, which every stream shows."""
    tables = make_tables()
    keys = np.arange(64, dtype=np.int64)
    empty = np.empty(0, np.int64)

    def delta(table: TableReplica, s: int, step: int) -> Delta:
        part = keys[table.shard_map.split(keys)[s]]
        return Delta(step, step, 1, part, np.full((part.shape[0], DIM), float(step), np.float32), empty)

    def steps_served(cut: ModelCut) -> tuple[set[float], int]:
        def answer(version: int) -> set[float]:
            return {float(x) for t in tables.values() for x in t.lookup(keys, version=version)[0].ravel()}

        return cut.read(answer)

    async def run() -> None:
        cut = ModelCut(tables, ServingMetrics(), 1 << 30)
        for name, table in tables.items():
            for s in range(2):
                await cut.offer(name, s, delta(table, s, 15))
        assert steps_served(cut) == ({15.0}, 15)
        await cut.offer("user", 0, delta(tables["user"], 0, 17))  # commits 16 and 17 in one range
        for name, table in tables.items():
            for s in range(2):
                if (name, s) != ("user", 0):
                    await cut.offer(name, s, delta(table, s, 16))
        assert steps_served(cut) == ({15.0}, 15)  # every other stream at 16; (user, 0) cannot show 16
        for name, table in tables.items():
            for s in range(2):
                if (name, s) != ("user", 0):
                    await cut.offer(name, s, delta(table, s, 17))
        assert steps_served(cut) == ({17.0}, 17)

    asyncio.run(run())
