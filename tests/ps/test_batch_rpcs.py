"""Multi-table rounds travel as one LookupBatch / PushBatch RPC per shard and equal per-table calls."""

from __future__ import annotations

import grpc
import numpy as np

from ps import wire
from ps.client import PSClient
from ps.rpc import ps_pb2, ps_pb2_grpc
from ps.table.config import OptimizerConfig, OptimizerKind, TableConfig
from tests.helpers.processes import make_job

TABLES = [
    TableConfig(name=f"t{i}", dim=4, seed=i, optimizer=OptimizerConfig(kind=OptimizerKind.ADAGRAD, lr=0.1))
    for i in range(3)
]


def test_many_tables_in_one_round_equal_one_table_at_a_time(start_shards):
    batched = start_shards(make_job(TABLES, num_shards=2, job="batched"))
    single = start_shards(make_job(TABLES, num_shards=2, job="single"))
    rng = np.random.default_rng(3)
    with PSClient.from_job(batched.job) as a, PSClient.from_job(single.job) as b:
        for step in range(1, 6):
            items = [(t.name, rng.integers(0, 500, 200), None) for t in TABLES]
            items = [(name, keys, rng.normal(size=(200, 4)).astype(np.float32), None) for name, keys, _ in items]
            a.push_many(items, step=step)
            for name, keys, grads, _ in items:
                b.push(name, keys, grads, step=step)
        keys = {t.name: rng.integers(0, 600, 300) for t in TABLES}
        got = a.lookup_many(keys)
        for name, k in keys.items():
            np.testing.assert_array_equal(got[name], b.lookup(name, k))
        stats = a.stats()
    assert all(t.version == 5 for s in stats for t in s.tables)


def test_push_batch_failure_names_the_bad_part_applies_nothing_and_a_retry_applies_each_part_once(start_shards):
    """A batch is all or nothing, as a PushMulti: its parts were applied one by one, so a bad later
    part failed the call after the earlier parts had changed their tables (a review's repro: a NaN
    in table b's part, table a's applied)."""
    cluster = start_shards(make_job(TABLES, num_shards=1))
    good = ps_pb2.PushRequest(
        table="t0",
        keys=np.arange(3, dtype="<i8").tobytes(),
        grads=np.ones((3, 4), "<f4").tobytes(),
        dim=4,
        push_id=ps_pb2.PushId(client_id="c", sequence=1),
    )
    bad = ps_pb2.PushRequest(
        table="nope",
        keys=np.arange(3, dtype="<i8").tobytes(),
        grads=np.ones((3, 4), "<f4").tobytes(),
        dim=4,
        push_id=ps_pb2.PushId(client_id="c", sequence=2),
    )
    with grpc.insecure_channel(cluster.job.shards[0].address) as channel:
        stub = ps_pb2_grpc.ParameterServerStub(channel)
        try:
            stub.PushBatch(ps_pb2.PushBatchRequest(requests=[good, bad]), timeout=10)
            raise AssertionError("a batch with an unknown table must fail")
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.NOT_FOUND and "nope" in err.details()
        not_finite = np.ones((3, 4), "<f4")
        not_finite[1, 2] = np.nan
        nan = ps_pb2.PushRequest(table="t1", keys=np.arange(3, dtype="<i8").tobytes(), grads=not_finite.tobytes(),
                                 dim=4, push_id=ps_pb2.PushId(client_id="c", sequence=3))
        try:
            stub.PushBatch(ps_pb2.PushBatchRequest(requests=[good, nan]), timeout=10)
            raise AssertionError("a batch with a NaN gradient must fail")
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "non-finite" in err.details()
        stats = stub.Stats(ps_pb2.StatsRequest(), timeout=10)
        assert {t.name: t.version for t in stats.tables}["t0"] == 0, "a failed batch applied a part"
        reply = stub.PushBatch(ps_pb2.PushBatchRequest(requests=[good]), timeout=10)
        assert not reply.responses[0].duplicate
        reply = stub.PushBatch(ps_pb2.PushBatchRequest(requests=[good]), timeout=10)
        assert reply.responses[0].duplicate  # applied once, then a repeat
        stats = stub.Stats(ps_pb2.StatsRequest(), timeout=10)
    assert {t.name: t.version for t in stats.tables}["t0"] == 1


def test_a_batch_of_too_many_parts_is_refused_before_any_is_visited(start_shards):
    """Each part of a batch costs the shard Python time whatever its size (250,000 empty parts held
    its event loop for 7 s): more than wire.MAX_BATCH_PARTS are refused whole, at once, and a
    batch of many small parts runs off the event loop (Stats answers meanwhile)."""
    cluster = start_shards(make_job(TABLES[:1], num_shards=1))
    key = np.array([1], "<i8").tobytes()
    with grpc.insecure_channel(cluster.job.shards[0].address) as channel:
        stub = ps_pb2_grpc.ParameterServerStub(channel)
        too_many = ps_pb2.PushBatchRequest(requests=[ps_pb2.PushRequest()] * (wire.MAX_BATCH_PARTS + 1))
        try:
            stub.PushBatch(too_many, timeout=10)
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
            assert f"at most {wire.MAX_BATCH_PARTS} parts" in err.details(), err.details()
        else:
            raise AssertionError("a batch past MAX_BATCH_PARTS was answered")
        most = ps_pb2.LookupBatchRequest(
            requests=[ps_pb2.LookupRequest(table="t0", keys=key, dim=4)] * wire.MAX_BATCH_PARTS
        )
        reply = stub.LookupBatch(most, timeout=30)
        assert len(reply.responses) == wire.MAX_BATCH_PARTS
        assert stub.Stats(ps_pb2.StatsRequest(), timeout=10).tables[0].version == 0  # nothing applied


def test_a_client_splits_a_round_of_more_tables_than_a_batch_takes(start_shards):
    tables = [TableConfig(name=f"m{i}", dim=2) for i in range(wire.MAX_BATCH_PARTS + 3)]
    cluster = start_shards(make_job(tables, num_shards=1))
    keys = {t.name: np.array([i], np.int64) for i, t in enumerate(tables)}
    with PSClient.from_job(cluster.job) as client:
        got = client.lookup_many(keys)
    assert sorted(got) == sorted(keys) and all(v.shape == (1, 2) for v in got.values())


def test_a_batch_whose_parts_of_one_table_do_not_fit_together_applies_none(start_shards):
    """Each part was checked for room on its own, so two parts of one table that fit apart but not
    together applied the first and failed on the second (the diff review's repro)."""
    table = TableConfig(name="small", dim=4, seed=1, capacity=10)
    cluster = start_shards(make_job([table], num_shards=1))

    def part(first: int, sequence: int) -> ps_pb2.PushRequest:
        return ps_pb2.PushRequest(table="small", keys=np.arange(first, first + 8, dtype="<i8").tobytes(),
                                  grads=np.ones((8, 4), "<f4").tobytes(), dim=4,
                                  push_id=ps_pb2.PushId(client_id="c", sequence=sequence))

    with grpc.insecure_channel(cluster.job.shards[0].address) as channel:
        stub = ps_pb2_grpc.ParameterServerStub(channel)
        try:
            stub.PushBatch(ps_pb2.PushBatchRequest(requests=[part(0, 1), part(100, 2)]), timeout=10)
            raise AssertionError("16 new rows in a table of 10 must fail")
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "full" in err.details(), err.details()
        stats = stub.Stats(ps_pb2.StatsRequest(), timeout=10)
        assert stats.tables[0].version == 0, "a failed batch applied a part"
        reply = stub.PushBatch(ps_pb2.PushBatchRequest(requests=[part(0, 3), part(2, 4)]), timeout=10)
        assert [r.num_inserted for r in reply.responses] == [8, 2]  # 10 keys in all, 6 in both: they fit
        stats = stub.Stats(ps_pb2.StatsRequest(), timeout=10)
    assert stats.tables[0].version == 2


def test_a_batch_whose_parts_of_an_evicting_table_evict_each_other_s_rows_applies(start_shards):
    """With an eviction policy a later part may evict an earlier part's rows, as when the parts
    are applied one by one: checked together, such a batch was refused (the diff review's repro)."""
    from ps.table.config import EvictionConfig, EvictionPolicy

    table = TableConfig(name="lru", dim=4, seed=1, capacity=10, eviction=EvictionConfig(policy=EvictionPolicy.LRU))
    cluster = start_shards(make_job([table], num_shards=1))
    parts = [
        ps_pb2.PushRequest(table="lru", keys=np.arange(first, first + 8, dtype="<i8").tobytes(),
                           grads=np.ones((8, 4), "<f4").tobytes(), dim=4, step=step,
                           push_id=ps_pb2.PushId(client_id="c", sequence=step))
        for step, first in ((1, 0), (2, 100))
    ]
    with grpc.insecure_channel(cluster.job.shards[0].address) as channel:
        reply = ps_pb2_grpc.ParameterServerStub(channel).PushBatch(ps_pb2.PushBatchRequest(requests=parts), timeout=10)
    assert [r.num_inserted for r in reply.responses] == [8, 8]
    assert reply.responses[1].num_evicted == 6


def test_a_batch_of_a_probability_admitting_table_passes_its_check_only_if_every_part_fits():
    """A table with a probability admission and a capacity: the batch's one room check drew every
    key's coin at the batch's latest step, each part at its own, so a batch the check passed failed
    in its second part after its first was applied (a review's repro: a key admitted at step 10
    and refused at 11). Such a table's parts are checked for every new key's row: the batch is
    refused whole, or applies whole."""
    from ps.errors import CapacityError
    from ps.shard.state import Shard
    from ps.table.config import AdmissionConfig, AdmissionKind
    from ps.table.embedding_table import EmbeddingTable

    config = TableConfig(
        name="t", dim=2, capacity=2, optimizer=OptimizerConfig(kind=OptimizerKind.SGD),
        admission=AdmissionConfig(kind=AdmissionKind.PROBABILITY, probability=0.5),
    )

    def admitted(key: int, step: int) -> bool:
        table = EmbeddingTable(config)
        return bool(table._admission(np.array([key]), np.array([True]), np.array([1]), step)[0][0])

    first = next(k for k in range(1000) if admitted(k, 1))
    early = next(k for k in range(1000, 2000) if admitted(k, 10) and not admitted(k, 11))
    late = next(k for k in range(2000, 3000) if admitted(k, 11))

    def push(keys: list[int], step: int) -> ps_pb2.PushRequest:
        grads = wire.encode_values(np.ones((len(keys), 2), np.float32), 2)
        return ps_pb2.PushRequest(table="t", keys=wire.encode_keys(np.array(keys, np.int64)), dim=2, grads=grads,
                                  step=step)

    shard = Shard(make_job([config]), 0)
    shard.push(push([first], 1))
    before = sorted(shard.tables["t"].keys().tolist()), shard.tables["t"].version
    batch = [push([early], 10), push([late], 11)]
    try:
        shard.check_pushes(batch)
    except CapacityError:
        pass  # refused whole: nothing applied
    else:
        for part in batch:
            shard.push(part)  # passed: every part applies
    after = sorted(shard.tables["t"].keys().tolist()), shard.tables["t"].version
    assert after == before or after[1] == before[1] + 2, (before, after)
