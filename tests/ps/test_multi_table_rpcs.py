"""LookupMulti / PushMulti: every table of a round in one buffer, one native call per shard, with
the same rows as one table at a time (tables of different dims and optimizers in one request)."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ps import native
from ps.client import PSClient, TableNotFoundError
from ps.errors import CapacityError
from ps.rpc import ps_pb2, ps_pb2_grpc
from ps.table.config import (
    AdmissionConfig,
    AdmissionKind,
    EvictionConfig,
    EvictionPolicy,
    Kernels,
    OptimizerConfig,
    OptimizerKind,
    Storage,
    TableConfig,
)
from ps.table.embedding_table import EmbeddingTable
from ps.table.multi import lookup_tables, lookup_tables_reply, push_tables, value_offsets
from tests.helpers.in_process import InProcessShards
from tests.helpers.processes import make_job
from worker.local_tables import LocalTables, MultiRound

# Every optimizer, five dims, and tables served by their own Python verbs: one with admission,
# float16 and int8 rows.
MIXED = [
    TableConfig(name="sgd", dim=4, seed=1, optimizer=OptimizerConfig(kind=OptimizerKind.SGD, lr=0.1)),
    TableConfig(
        name="adagrad",
        dim=8,
        seed=2,
        optimizer=OptimizerConfig(kind=OptimizerKind.ADAGRAD, lr=0.1, initial_accumulator=0.1),
    ),
    TableConfig(
        name="rowwise",
        dim=3,
        seed=3,
        optimizer=OptimizerConfig(kind=OptimizerKind.ROWWISE_ADAGRAD, lr=0.1, initial_accumulator=0.2),
    ),
    TableConfig(name="adam", dim=16, seed=4, optimizer=OptimizerConfig(kind=OptimizerKind.ADAM, lr=0.01)),
    TableConfig(name="ftrl", dim=5, seed=5, optimizer=OptimizerConfig(kind=OptimizerKind.FTRL, lr=0.1)),
    TableConfig(
        name="admit",
        dim=4,
        seed=6,
        optimizer=OptimizerConfig(kind=OptimizerKind.SGD, lr=0.1),
        admission=AdmissionConfig(kind=AdmissionKind.COUNT, min_count=3),
    ),
    TableConfig(
        name="half",
        dim=6,
        seed=7,
        storage=Storage.FLOAT16,
        optimizer=OptimizerConfig(kind=OptimizerKind.ROWWISE_ADAGRAD, lr=0.1, initial_accumulator=0.1),
    ),
    TableConfig(
        name="int8", dim=8, seed=8, storage=Storage.INT8, optimizer=OptimizerConfig(kind=OptimizerKind.SGD, lr=0.1)
    ),
    # Updated by fbgemm: one table-batched call for both in a multi-table push, one each alone.
    *(
        TableConfig(
            name=f"fbgemm{i}",
            dim=8,
            seed=9 + i,
            kernels=Kernels.FBGEMM,
            optimizer=OptimizerConfig(kind=OptimizerKind.ROWWISE_ADAGRAD, lr=0.1, initial_accumulator=0.1),
        )
        for i in range(2)
    ),
]


def _round(rng: np.random.Generator, tables: list[TableConfig], n: int):
    keys = [rng.integers(0, 300, n) for _ in tables]
    grads = [rng.normal(size=(n, t.dim)).astype(np.float32) for t in tables]
    counts = [rng.integers(1, 4, n) for _ in tables]
    offsets = np.zeros(len(tables) + 1, dtype=np.int64)
    np.cumsum([k.shape[0] for k in keys], out=offsets[1:])
    return keys, grads, counts, offsets


def _assert_same_state(a: EmbeddingTable, b: EmbeddingTable) -> None:
    sa, sb = a.export(), b.export()
    oa, ob = np.argsort(sa.keys), np.argsort(sb.keys)
    for field in ("keys", "values", "optimizer_state", "freq", "last_step", "pending_keys"):
        x, y = getattr(sa, field), getattr(sb, field)
        if field == "pending_keys":
            x, y = np.sort(x), np.sort(y)
        else:
            x, y = x[oa], y[ob]
        np.testing.assert_array_equal(x, y, err_msg=f"table {a.name}: {field}")
    assert (a.version, a.step, a.num_admitted) == (b.version, b.step, b.num_admitted)


def test_native_multi_table_call_equals_each_table_alone():
    multi = [EmbeddingTable(t) for t in MIXED]
    alone = [EmbeddingTable(t) for t in MIXED]
    rng = np.random.default_rng(0)
    for step in range(1, 6):
        keys, grads, counts, offsets = _round(rng, MIXED, 120)
        flat = np.concatenate([g.reshape(-1) for g in grads])
        push_tables(multi, np.concatenate(keys), offsets, flat, np.concatenate(counts), step)
        for table, k, g, c in zip(alone, keys, grads, counts, strict=True):
            table.apply_gradients(k, g, step=step, counts=c)
    keys, _, _, offsets = _round(rng, MIXED, 80)
    values = lookup_tables(multi, np.concatenate(keys), offsets)
    starts = value_offsets(multi, offsets)
    for i, (table, k) in enumerate(zip(alone, keys, strict=True)):
        np.testing.assert_array_equal(values[starts[i] : starts[i + 1]].reshape(-1, table.dim), table.lookup(k).numpy())
    for a, b in zip(multi, alone, strict=True):
        _assert_same_state(a, b)


def test_a_native_lookup_reply_is_the_message_protobuf_would_write():
    """lookup_tables_reply gathers straight into the serialised reply: protobuf reads back the
    header's fields and lookup_tables' values, the values start 4-aligned whatever the header's
    length, and tables the native call cannot serve give the same reply bytes' meaning."""
    native_tables = [EmbeddingTable(t) for t in MIXED if t.name in ("sgd", "adagrad", "rowwise", "adam", "ftrl")]
    rng = np.random.default_rng(1)
    keys, _, _, offsets = _round(rng, [t.config for t in native_tables], 50)
    keys = np.concatenate(keys)
    want = lookup_tables(native_tables, keys, offsets)
    assert all(t.multi_native for t in native_tables)
    for versions in range(12):  # headers of 0 to 14 bytes: every length mod 4
        header = ps_pb2.MultiLookupResponse(dtype=ps_pb2.FLOAT32, versions=range(1, versions + 1))
        reply = lookup_tables_reply(native_tables, keys, offsets, header, "values")
        parsed = ps_pb2.MultiLookupResponse.FromString(reply)
        assert list(parsed.versions) == list(range(1, versions + 1)) and parsed.dtype == ps_pb2.FLOAT32
        np.testing.assert_array_equal(np.frombuffer(parsed.values, np.float32), want)
        assert (len(reply) - want.nbytes) % 4 == 0  # the values start 4-aligned
    mixed = [EmbeddingTable(t) for t in MIXED]
    keys, _, _, offsets = _round(rng, MIXED, 20)
    keys = np.concatenate(keys)
    reply = lookup_tables_reply(mixed, keys, offsets, ps_pb2.MultiLookupResponse(versions=[5]), "values")
    parsed = ps_pb2.MultiLookupResponse.FromString(reply)
    np.testing.assert_array_equal(np.frombuffer(parsed.values, np.float32), lookup_tables(mixed, keys, offsets))
    assert list(parsed.versions) == [5]


def test_one_request_with_mixed_dims_and_optimizers_equals_per_table_rpcs(start_shards):
    multi = start_shards(make_job(MIXED, num_shards=2, job="multi"))
    single = start_shards(make_job(MIXED, num_shards=2, job="single"))
    names = [t.name for t in MIXED]
    rng = np.random.default_rng(1)
    # A small message limit on the multi-table client: its rounds split, across and inside tables.
    with (
        PSClient.from_job(multi.job, message_limit_bytes=9000) as a,
        PSClient.from_job(single.job) as b,
    ):
        for step in range(1, 5):
            keys, grads, counts, offsets = _round(rng, MIXED, 150)
            flat = np.concatenate([g.reshape(-1) for g in grads])
            prepared = a.prepare_push_multi(names, np.concatenate(keys), offsets, flat, np.concatenate(counts), step)
            assert len(prepared.calls) > 2  # split at the message limit
            first = a.send_push(prepared)
            again = a.send_push(prepared)  # a retried round applies nothing twice
            assert again.num_duplicates == len(prepared.calls) and again.versions == first.versions
            for name, k, g, c in zip(names, keys, grads, counts, strict=True):
                b.push(name, k, g, step=step, counts=c)
        keys, _, _, offsets = _round(rng, MIXED, 200)
        values = a.lookup_multi(names, np.concatenate(keys), offsets)
        start = 0
        for name, k in zip(names, keys, strict=True):
            want = b.lookup(name, k)
            np.testing.assert_array_equal(values[start : start + want.size].reshape(want.shape), want)
            start += want.size
        assert start == values.shape[0]
        same_dims = a.lookup_multi(["sgd", "admit"], np.concatenate(keys[:1] + keys[-1:]), [0, 200, 400])
        np.testing.assert_array_equal(same_dims.reshape(400, 4)[:200], b.lookup("sgd", keys[0]))
        # The rows as the shards answered them (split at the message limit), with where each belongs.
        rows, positions = a.lookup_multi_grouped(["sgd", "admit"], np.concatenate(keys[:1] + keys[-1:]), [0, 200, 400])
        np.testing.assert_array_equal(np.sort(positions), np.arange(400))
        np.testing.assert_array_equal(rows, same_dims.reshape(400, 4)[positions])
        shard_of = multi.job.shard_map.shard_of(np.concatenate(keys[:1] + keys[-1:])[positions])
        assert (np.diff(shard_of) >= 0).all()  # shard after shard
        with pytest.raises(ValueError, match="one dim"):
            a.lookup_multi_grouped(names, np.concatenate(keys), offsets)
    for s_multi, s_single in zip(multi.servicers, single.servicers, strict=True):
        for name in names:
            _assert_same_rows(s_multi.shard.tables[name], s_single.shard.tables[name])
            # What Subscribe streams to replicas: every row the multi-table pushes created or moved.
            table = s_multi.shard.tables[name]
            changes = s_multi.shard.changes_after(name, 0)
            assert changes.to_version == table.version
            np.testing.assert_array_equal(changes.touched_keys, np.sort(table.keys()))
    registry = multi.servicers[0].metrics.registry
    for method in ("LookupMulti", "PushMulti"):  # every table's keys are counted under its own label
        labels = {"table": "adam", "method": method}
        assert registry.get_sample_value("embps_request_keys_total", labels) > 0
        ok = registry.get_sample_value("embps_requests_total", {"table": "", "method": method, "code": "OK"})
        assert ok >= 1


@pytest.mark.parametrize("eviction", [EvictionPolicy.NONE, EvictionPolicy.LRU])
def test_a_multi_table_push_one_table_refuses_changes_no_table(eviction):
    """All or nothing across tables: a push whose last table has no room (a full table without
    eviction, or more new keys than it can evict) leaves the tables before it as they were, so
    a retry with the same push id cannot apply them twice and no version moves unlogged."""
    configs = [
        MIXED[0],  # native fast path
        MIXED[5],  # admission: apply_gradients, before the full one
        TableConfig(
            name="small", dim=2, capacity=4, optimizer=OptimizerConfig(kind=OptimizerKind.SGD, lr=0.1),
            eviction=EvictionConfig(policy=eviction),
        ),
    ]
    tables = [EmbeddingTable(t) for t in configs]
    untouched = [EmbeddingTable(t) for t in configs]
    warm = np.array([500], dtype=np.int64)
    for table, twin in zip(tables[1:2], untouched[1:2], strict=True):  # key 500 admitted in "admit"
        for t in (table, twin):
            t.apply_gradients(warm, np.ones((1, t.dim), np.float32), counts=np.array([3]))
    keys = np.array([7, 500, 901, 902, 903, 904, 905, 906], dtype=np.int64)
    offsets = np.array([0, 1, 2, 8], dtype=np.int64)
    grads = np.ones(4 + 4 + 6 * 2, dtype=np.float32)
    for _ in range(2):  # a retry meets the same refusal, and still nothing moves
        with pytest.raises(CapacityError, match="table small"):
            push_tables(tables, keys, offsets, grads, None, None)
    for a, b in zip(tables, untouched, strict=True):
        _assert_same_state(a, b)


def test_a_push_naming_one_table_twice_is_refused_before_it_changes_anything():
    """push_tables reserves each table's room for its own keys once: the same table twice ran past
    its row blocks midway (IndexError) with keys in the map whose rows were never written."""
    table = EmbeddingTable(MIXED[0])
    untouched = EmbeddingTable(MIXED[0])
    keys = np.arange(20, dtype=np.int64)
    grads = np.ones(20 * table.dim, dtype=np.float32)
    with pytest.raises(ValueError, match="a table appears more than once"):
        push_tables([table, table], keys, np.array([0, 10, 20]), grads, None, None)
    _assert_same_state(table, untouched)


def test_the_in_process_multi_table_push_refuses_bad_gradients_and_counts_as_a_shard_does():
    """LocalTables (the in-process trainer) checks what a shard checks before push_tables: a NaN
    gradient or a count below 1 refuses the push, no row changes (before: the NaN was applied)."""
    tables = LocalTables(MIXED[:2])
    keys = np.array([1, 2, 3], dtype=np.int64)
    offsets = np.array([0, 2, 3], dtype=np.int64)
    dims = [MIXED[0].dim, MIXED[1].dim]
    grads = np.ones(2 * dims[0] + dims[1], dtype=np.float32)
    before = {name: t.export() for name, t in tables.tables.items()}
    bad = grads.copy()
    bad[3] = np.nan
    with pytest.raises(ValueError, match="grads"):
        tables.send_push(([MultiRound(["sgd", "adagrad"], keys, offsets, bad, None)], 1))
    with pytest.raises(ValueError, match="counts"):
        tables.send_push(([MultiRound(["sgd", "adagrad"], keys, offsets, grads, np.array([1, 0, 1]))], 1))
    for name, table in tables.tables.items():
        np.testing.assert_array_equal(table.export().values, before[name].values)
    tables.send_push(([MultiRound(["sgd", "adagrad"], keys, offsets, grads, None)], 1))
    assert all(np.isfinite(t.export().values).all() for t in tables.tables.values())


def _assert_same_rows(a: EmbeddingTable, b: EmbeddingTable) -> None:
    sa, sb = a.export(), b.export()
    oa, ob = np.argsort(sa.keys), np.argsort(sb.keys)
    np.testing.assert_array_equal(sa.keys[oa], sb.keys[ob])
    np.testing.assert_array_equal(sa.values[oa], sb.values[ob])
    np.testing.assert_array_equal(sa.optimizer_state[oa], sb.optimizer_state[ob])


def test_bad_multi_requests_are_refused_whole(start_shards):
    cluster = start_shards(make_job(MIXED[:2], num_shards=1))
    keys = np.arange(4, dtype="<i8")

    def push(**fields) -> ps_pb2.MultiPushRequest:
        request = ps_pb2.MultiPushRequest(
            tables=["sgd", "adagrad"],
            dims=[4, 8],
            offsets=[0, 2, 4],
            keys=keys.tobytes(),
            grads=np.ones(2 * 4 + 2 * 8, "<f4").tobytes(),
        )
        for name, value in fields.items():
            if isinstance(value, list):
                getattr(request, name)[:] = value
            elif isinstance(value, ps_pb2.PushId):
                request.push_id.CopyFrom(value)
            else:
                setattr(request, name, value)
        return request

    bad_grads = np.ones(24, "<f4")
    bad_grads[20] = np.nan
    cases = [
        (push(offsets=[0, 3]), grpc.StatusCode.INVALID_ARGUMENT, "offsets"),
        (push(offsets=[0, 5, 4]), grpc.StatusCode.INVALID_ARGUMENT, "offsets"),
        (push(dims=[4, 7]), grpc.StatusCode.INVALID_ARGUMENT, "dim"),
        (push(tables=["sgd", "sgd"]), grpc.StatusCode.INVALID_ARGUMENT, "more than once"),
        (push(tables=["sgd", "nope"]), grpc.StatusCode.NOT_FOUND, "nope"),
        (push(grads=b"\0" * 12), grpc.StatusCode.INVALID_ARGUMENT, "grads"),
        (push(grads=bad_grads.tobytes()), grpc.StatusCode.INVALID_ARGUMENT, "non-finite"),
        (push(grads=np.full(24, 3e38, "<f4").tobytes()), grpc.StatusCode.INVALID_ARGUMENT, "beyond +-1e+10"),
        (push(counts=np.array([1, 0, 1, 1], "<i8").tobytes()), grpc.StatusCode.INVALID_ARGUMENT, "counts"),
    ]
    with grpc.insecure_channel(cluster.job.shards[0].address) as channel:
        stub = ps_pb2_grpc.ParameterServerStub(channel)
        for request, code, word in cases:
            with pytest.raises(grpc.RpcError) as err:
                stub.PushMulti(request, timeout=10)
            assert err.value.code() == code and word in err.value.details(), err.value.details()
        lookup = ps_pb2.MultiLookupRequest(tables=["sgd"], dims=[4], offsets=[0, 5], keys=keys.tobytes())
        with pytest.raises(grpc.RpcError) as err:
            stub.LookupMulti(lookup, timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        stats = stub.Stats(ps_pb2.StatsRequest(), timeout=10)
        assert all(t.version == 0 and t.rows == 0 for t in stats.tables)  # nothing applied
        # A push id names one push: a Push may not reuse a PushMulti's, nor the other way round.
        multi_id, single_id = ps_pb2.PushId(client_id="c", sequence=1), ps_pb2.PushId(client_id="c", sequence=2)
        stub.PushMulti(push(push_id=multi_id), timeout=10)
        single = ps_pb2.PushRequest(table="sgd", keys=keys.tobytes(), grads=np.ones(16, "<f4").tobytes(), dim=4)
        single.push_id.CopyFrom(single_id)
        stub.Push(single, timeout=10)
        single.push_id.CopyFrom(multi_id)
        for call, request in ((stub.Push, single), (stub.PushMulti, push(push_id=single_id))):
            with pytest.raises(grpc.RpcError) as err:
                call(request, timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "may not reuse" in err.value.details()
        # A repeat is checked as the first was: a repeat naming a million tables was answered
        # unchecked, its duplicate counted per name on the shard's loop (1.8 s at 1.3M names).
        assert stub.PushMulti(push(push_id=multi_id), timeout=10).duplicate
        for names, dims in ((["sgd"] * 1_000_000, []), (["sgd", "sgd"], [4, 4])):
            with pytest.raises(grpc.RpcError) as err:
                stub.PushMulti(ps_pb2.MultiPushRequest(tables=names, dims=dims, push_id=multi_id), timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    with PSClient.from_job(cluster.job) as client:
        with pytest.raises(TableNotFoundError):
            client.lookup_multi(["nope"], keys, [0, 4])
        with pytest.raises(ValueError, match="grads"):
            client.prepare_push_multi(["sgd"], keys, [0, 4], np.ones(15, np.float32))
        with pytest.raises(ValueError, match="grads: non-finite value for key"):  # before it is sent
            client.send_push(client.prepare_push_multi(["sgd"], keys, [0, 4], np.full(16, np.inf, np.float32)))


def test_the_workers_one_dedupe_over_every_table_matches_numpy():
    rng = np.random.default_rng(2)
    keys = rng.integers(0, 20, (64, 5))
    group = np.array([0, 2, 0, 1, 2])  # table of each column: a table may own several columns
    unique, offsets, inverse, counts = native.unique_by_table(keys, group, 3)
    for g in range(3):
        mine = unique[offsets[g] : offsets[g + 1]]
        cells = keys[:, group == g]
        np.testing.assert_array_equal(np.sort(mine), np.unique(cells))
        np.testing.assert_array_equal(unique[inverse[:, group == g]], cells)
        np.testing.assert_array_equal(counts[offsets[g] : offsets[g + 1]], [(cells == k).sum() for k in mine])
    empty = native.unique_by_table(np.zeros((0, 5), np.int64), group, 3)
    assert empty[0].shape == (0,) and empty[1].tolist() == [0, 0, 0, 0]
    with pytest.raises(ValueError, match="group"):
        native.unique_by_table(keys, np.array([0, 3, 0, 1, 2]), 3)

    tags = np.array([1, 0, 1, 0, 1])
    rows = np.arange(10, dtype=np.float32).reshape(5, 2)
    summed_keys, sums, sum_offsets, no_counts = native.sum_by_table_key(np.array([1, 2, 1, 1, 3]), tags, rows, 2)
    assert summed_keys.tolist() == [2, 1, 1, 3] and sum_offsets.tolist() == [0, 2, 4] and no_counts is None
    np.testing.assert_array_equal(sums, [[2, 3], [6, 7], [0 + 4, 1 + 5], [8, 9]])
    # Rows and counts read in place as columns of a wider buffer (what an all_to_all received).
    wide = np.zeros((5, 5), dtype=np.float32)
    wide[:, 1:3], wide[:, 4] = rows, [1, 2, 3, 4, 5]
    strided_keys, strided_sums, _, counts = native.sum_by_table_key(
        np.array([1, 2, 1, 1, 3]), tags, wide[:, 1:3], 2, counts=wide[:, 4]
    )
    assert strided_keys.tolist() == summed_keys.tolist() and strided_sums.flags.c_contiguous
    np.testing.assert_array_equal(strided_sums, sums)
    np.testing.assert_array_equal(counts, [2, 4, 1 + 3, 5])
    none_received = native.sum_by_table_key(
        np.zeros(0, np.int64), np.zeros(0, np.int64), wide[:0, 1:3], 2, counts=wide[:0, 4]
    )
    assert none_received[0].shape == (0,) and none_received[1].shape == (0, 2) and none_received[3].shape == (0,)


FUZZ_TABLES = [
    TableConfig("user", dim=4, seed=7),
    TableConfig("small", dim=2, capacity=8),  # fills up: RESOURCE_EXHAUSTED
    TableConfig("admit", dim=3, admission=AdmissionConfig(kind=AdmissionKind.COUNT, min_count=2)),
]
CONTRACT = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED}


@st.composite
def multi_requests(draw):
    table_names = st.sampled_from(["user", "small", "admit", "nope", "é" * 300])
    names = draw(st.lists(table_names, max_size=4, unique=draw(st.booleans())))
    dim_of = {t.name: t.dim for t in FUZZ_TABLES}
    dims = [draw(st.sampled_from([dim_of.get(n, 4), 0, 2**32 - 1])) if draw(st.booleans()) else dim_of.get(n, 4)
            for n in names]  # fmt: skip
    n = draw(st.integers(0, 40))
    keys = np.array(draw(st.lists(st.integers(-(2**63), 2**63 - 1), min_size=n, max_size=n)), dtype="<i8")
    cuts = sorted(draw(st.lists(st.integers(0, n), min_size=max(0, len(names) - 1), max_size=max(0, len(names) - 1))))
    offsets = [0, *cuts, n] if names else [0]
    if draw(st.booleans()):
        offsets = draw(st.lists(st.integers(0, 2**64 - 1), max_size=6))
    values = max(0, sum((b - a) * d for a, b, d in zip(offsets, offsets[1:], dims, strict=False)))
    floats = st.floats(allow_nan=True, allow_infinity=True, width=32)
    values = values if values < 4096 else 0
    grads = np.array(draw(st.lists(floats, min_size=values, max_size=values)), "<f4")
    fields = {
        "tables": names,
        "dims": dims,
        "offsets": offsets,
        "keys": draw(st.sampled_from([keys.tobytes(), keys.tobytes()[:-1], b""])),
        "grads": draw(st.sampled_from([grads.tobytes(), b"\0" * 7])),
        "counts": draw(st.sampled_from([b"", np.ones(n, "<i8").tobytes(), np.zeros(n, "<i8").tobytes()])),
    }
    step = draw(st.one_of(st.none(), st.integers(0, 2**64 - 1)))
    return fields, step


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(st.data())
def test_malformed_multi_requests_get_a_contract_status(fuzz_shard, data):
    stub = fuzz_shard
    fields, step = data.draw(multi_requests())
    lookup = ps_pb2.MultiLookupRequest(**{k: fields[k] for k in ("tables", "dims", "offsets", "keys")})
    push_id = ps_pb2.PushId(client_id="fuzz", sequence=data.draw(st.integers(1, 50)))
    push = ps_pb2.MultiPushRequest(**fields, push_id=push_id)
    if step is not None:
        push.step = step
    for call, request in ((stub.LookupMulti, lookup), (stub.PushMulti, push)):
        try:
            call(request, timeout=10)
        except grpc.RpcError as err:
            assert err.code() in CONTRACT, f"{err.code()}: {err.details()}"


@pytest.fixture(scope="module")
def fuzz_shard():
    with InProcessShards.start(make_job(FUZZ_TABLES, num_shards=1, job="fuzz")) as cluster:
        with grpc.insecure_channel(cluster.job.shards[0].address) as channel:
            yield ps_pb2_grpc.ParameterServerStub(channel)
            # Still answering, and right: a valid round afterwards reads what it wrote.
            reference = EmbeddingTable(FUZZ_TABLES[0])
            keys = np.arange(10**9, 10**9 + 5, dtype=np.int64)
            grads = np.ones((5, 4), np.float32)
            with PSClient.from_job(cluster.job) as client:
                before = client.lookup_multi(["user"], keys, [0, 5]).reshape(5, 4)
                np.testing.assert_array_equal(before, reference.lookup(keys).numpy())
                client.send_push(client.prepare_push_multi(["user"], keys, [0, 5], grads, step=1))
                reference.apply_gradients(keys, grads, step=1)
                after = client.lookup_multi(["user"], keys, [0, 5]).reshape(5, 4)
                np.testing.assert_array_equal(after, reference.lookup(keys).numpy())
