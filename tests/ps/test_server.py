"""A real shard process over real gRPC stubs: status codes, push-id dedupe, health, reflection, drain."""

import signal
import threading
import time
import tracemalloc

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from ps.errors import CapacityError, UnknownTableError, WrongShardError
from ps.process.calls import status_of
from ps.rpc import ps_pb2, ps_pb2_grpc
from ps.shard.server import SERVICE_NAME
from ps.shard.state import PushLedger
from ps.table.config import OptimizerConfig, OptimizerKind, TableConfig
from ps.table.embedding_table import EmbeddingTable
from tests.helpers.in_process import InProcessShards
from tests.helpers.processes import ShardCluster, make_job
from tests.helpers.waiting import wait_until

USER = TableConfig("user", dim=4, optimizer=OptimizerConfig(kind=OptimizerKind.ADAGRAD, lr=0.5), seed=7)
SMALL = TableConfig("small", dim=2, capacity=8)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with ShardCluster.start(make_job([USER, SMALL], num_shards=2), tmp_path_factory.mktemp("server")) as c:
        yield c


@pytest.fixture(scope="module")
def stubs(cluster):
    channels = [grpc.insecure_channel(s.address) for s in cluster.job.shards]
    yield [ps_pb2_grpc.ParameterServerStub(c) for c in channels]
    for c in channels:
        c.close()


def owned_keys(cluster, shard: int, n: int, start: int = 0) -> np.ndarray:
    keys = np.arange(start, start + 50 * n, dtype=np.int64)
    keys = keys[cluster.job.shard_map.shard_of(keys) == shard][:n]
    assert keys.shape[0] == n
    return keys


def lookup(stub, keys, table="user", dim=4) -> np.ndarray:
    reply = stub.Lookup(ps_pb2.LookupRequest(table=table, keys=keys.tobytes(), dim=dim), timeout=10)
    return np.frombuffer(reply.values, dtype="<f4").reshape(keys.shape[0], reply.dim)


def push_request(
    keys, grads, table="user", client_id="", sequence=0, dtype=ps_pb2.FLOAT32, **fields
) -> ps_pb2.PushRequest:
    return ps_pb2.PushRequest(
        table=table,
        keys=keys.tobytes(),
        grads=grads.astype("<f4").tobytes(),
        dim=grads.shape[1],
        dtype=dtype,
        push_id=ps_pb2.PushId(client_id=client_id, sequence=sequence),
        **fields,
    )


def assert_still_serving(cluster, stubs):
    for shard, stub in enumerate(stubs):
        assert cluster.procs[shard].poll() is None, cluster.log(shard)
        keys = owned_keys(cluster, shard, 3, start=10_000)
        expected = EmbeddingTable(USER).init_values(keys)
        np.testing.assert_array_equal(lookup(stub, keys), expected)


def bad_requests(cluster):
    k0 = owned_keys(cluster, 0, 4)
    nan = np.ones((4, 4), dtype=np.float32)
    nan[2, 1] = np.nan
    return {
        "keys_not_multiple_of_8": (
            "Lookup", ps_pb2.LookupRequest(table="user", keys=k0.tobytes()[:-3], dim=4),
            grpc.StatusCode.INVALID_ARGUMENT, "not a multiple of 8",
        ),
        "lookup_dim_mismatch": (
            "Lookup", ps_pb2.LookupRequest(table="user", keys=k0.tobytes(), dim=5),
            grpc.StatusCode.INVALID_ARGUMENT, "has dim 4, the request says 5",
        ),
        "push_dim_mismatch": (
            "Push", push_request(k0, np.ones((4, 2), dtype=np.float32)),
            grpc.StatusCode.INVALID_ARGUMENT, "has dim 4, the request says 2",
        ),
        "grads_length_mismatch": (
            "Push", push_request(k0[:3], np.ones((4, 4), dtype=np.float32)),
            grpc.StatusCode.INVALID_ARGUMENT, "grads: byte length 64 does not match 3 keys",
        ),
        "nan_gradient": (
            "Push", push_request(k0, nan), grpc.StatusCode.INVALID_ARGUMENT, "non-finite value in row 2",
        ),
        "gradient_whose_square_overflows": (  # finite, but a NaN row once an optimizer squared it
            "Push", push_request(k0, np.full((4, 4), 3e38, dtype=np.float32)),
            grpc.StatusCode.INVALID_ARGUMENT, "value 3e+38 beyond +-1e+10 in row 0",
        ),
        "unknown_dtype": (
            "Push", push_request(k0, np.ones((4, 4), dtype=np.float32), dtype=9),
            grpc.StatusCode.INVALID_ARGUMENT, "unsupported dtype 9",
        ),
        "step_out_of_range": (
            "Push", push_request(k0, np.ones((4, 4), dtype=np.float32), step=2**40),
            grpc.StatusCode.INVALID_ARGUMENT, "step: must be an integer in",
        ),
        "unknown_table": (
            "Lookup", ps_pb2.LookupRequest(table="nope", keys=k0.tobytes(), dim=4),
            grpc.StatusCode.NOT_FOUND, "table 'nope' is not declared",
        ),
        "wrong_shard": (
            "Lookup", ps_pb2.LookupRequest(table="user", keys=owned_keys(cluster, 1, 4).tobytes(), dim=4),
            grpc.StatusCode.FAILED_PRECONDITION, "4 of 4 keys belong to other shards",
        ),
        "client_id_too_long": (
            "Push", push_request(k0, np.ones((4, 4), dtype=np.float32), client_id="c" * 257),
            grpc.StatusCode.INVALID_ARGUMENT, "push_id.client_id: at most 256 bytes",
        ),
        "table_full": (
            "Push", push_request(owned_keys(cluster, 0, 9), np.ones((9, 2), dtype=np.float32), table="small"),
            grpc.StatusCode.RESOURCE_EXHAUSTED, "table small is full",
        ),
    }


CASES = [
    "keys_not_multiple_of_8", "lookup_dim_mismatch", "push_dim_mismatch", "grads_length_mismatch",
    "nan_gradient", "unknown_dtype", "step_out_of_range", "unknown_table", "wrong_shard", "table_full",
    "client_id_too_long",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_request_gets_its_status_and_the_shard_keeps_serving(cluster, stubs, case):
    method, request, code, message = bad_requests(cluster)[case]
    with pytest.raises(grpc.RpcError) as info:
        getattr(stubs[0], method)(request, timeout=10)
    assert info.value.code() == code, info.value.details()
    assert message in info.value.details()
    assert_still_serving(cluster, stubs)


def test_refused_push_changes_nothing(cluster, stubs):
    keys = owned_keys(cluster, 0, 4, start=20_000)
    before = stubs[0].Stats(ps_pb2.StatsRequest(), timeout=5)
    nan = np.ones((4, 4), dtype=np.float32)
    nan[0, 0] = np.inf
    with pytest.raises(grpc.RpcError):
        stubs[0].Push(push_request(keys, nan), timeout=10)
    after = stubs[0].Stats(ps_pb2.StatsRequest(), timeout=5)
    assert [t.version for t in after.tables] == [t.version for t in before.tables]
    np.testing.assert_array_equal(lookup(stubs[0], keys), EmbeddingTable(USER).init_values(keys))


def test_a_repeated_push_id_is_applied_once(cluster, stubs):
    keys = owned_keys(cluster, 1, 5, start=30_000)
    grads = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    request = push_request(keys, grads, client_id="test-dedupe", sequence=1, step=3)
    first = stubs[1].Push(request, timeout=10)
    again = stubs[1].Push(request, timeout=10)
    assert not first.duplicate and again.duplicate
    assert again.version == first.version and again.num_updated == first.num_updated == 5
    reference = EmbeddingTable(USER)
    reference.apply_gradients(keys, grads, step=3)
    np.testing.assert_allclose(lookup(stubs[1], keys), reference.lookup(keys).numpy(), rtol=0, atol=1e-7)
    stubs[1].Push(push_request(keys, grads, client_id="test-dedupe", sequence=2, step=4), timeout=10)
    reference.apply_gradients(keys, grads, step=4)
    np.testing.assert_allclose(lookup(stubs[1], keys), reference.lookup(keys).numpy(), rtol=0, atol=1e-7)


def test_stats_reports_every_table(cluster, stubs):
    reply = stubs[1].Stats(ps_pb2.StatsRequest(), timeout=5)
    assert (reply.job, reply.shard, reply.num_shards) == (cluster.job.job, 1, 2)
    assert sorted((t.name, t.dim) for t in reply.tables) == [("small", 2), ("user", 4)]
    assert all(t.memory_bytes > 0 for t in reply.tables)


def test_health_and_reflection(cluster):
    with grpc.insecure_channel(cluster.job.shards[0].address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE_NAME):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        db = ProtoReflectionDescriptorDatabase(channel)
        services = db.get_services()
        assert SERVICE_NAME in services and "grpc.health.v1.Health" in services
        methods = {m.name for m in db.FindFileContainingSymbol(SERVICE_NAME).service[0].method}
        assert methods == {
            "Lookup", "Push", "Stats", "Subscribe", "SubscribeTables", "LookupBatch", "PushBatch", "LookupMulti",
            "PushMulti", "Commit",
        }


def test_status_mapping_hides_unexpected_errors():
    assert status_of(UnknownTableError("t"))[0] == grpc.StatusCode.NOT_FOUND
    assert status_of(WrongShardError("w"))[0] == grpc.StatusCode.FAILED_PRECONDITION
    assert status_of(CapacityError("c"))[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert status_of(TypeError("x"))[0] == grpc.StatusCode.INVALID_ARGUMENT
    code, message = status_of(RuntimeError("secret /path/in/traceback"))
    assert code == grpc.StatusCode.INTERNAL and "secret" not in message


def test_sigterm_drains_in_flight_calls_and_exits_0(tmp_path):
    table = TableConfig("wide", dim=32)
    cluster = ShardCluster.start(make_job([table], num_shards=1), tmp_path)
    keys = np.arange(200_000, dtype=np.int64)
    expected_head = EmbeddingTable(table).init_values(keys[:10])
    outcomes: list[object] = []
    with grpc.insecure_channel(
        cluster.job.shards[0].address, options=[("grpc.max_receive_message_length", 64 << 20)]
    ) as channel:
        stub = ps_pb2_grpc.ParameterServerStub(channel)
        request = ps_pb2.LookupRequest(table="wide", keys=keys.tobytes(), dim=32)
        futures = [stub.Lookup.future(request, timeout=30) for _ in range(8)]
        # The calls are served one after the other: once the first is answered, the shard has the
        # others (sent at once, before it) in flight, and the SIGTERM must let them finish.
        wait_until(futures[0].done, "the first of 8 large lookups to be answered")
        started = time.monotonic()
        cluster.procs[0].send_signal(signal.SIGTERM)
        in_flight = [i for i, future in enumerate(futures) if not future.done()]
        for future in futures:
            try:
                reply = future.result()
                head = np.frombuffer(reply.values, dtype="<f4")[: 10 * 32].reshape(10, 32)
                outcomes.append("ok" if np.array_equal(head, expected_head) else "wrong values")
            except grpc.RpcError as err:
                outcomes.append(err.code())
        exit_code = cluster.procs[0].wait(20)
        assert time.monotonic() - started < 15
        with pytest.raises(grpc.RpcError) as info:
            stub.Lookup(request, timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    cluster.stop()
    log = cluster.log(0)
    assert exit_code == 0, log
    assert "draining" in log and "stopped" in log
    assert "ok" in outcomes, outcomes
    assert set(outcomes) <= {"ok", grpc.StatusCode.UNAVAILABLE}, outcomes
    assert not in_flight or any(outcomes[i] == "ok" for i in in_flight), (in_flight, outcomes)


def test_requests_during_shutdown_get_unavailable(tmp_path):
    cluster = ShardCluster.start(make_job([SMALL], num_shards=1), tmp_path)
    address = cluster.job.shards[0].address
    stop = threading.Event()
    codes: set = set()

    def hammer():
        with grpc.insecure_channel(address) as channel:
            stub = ps_pb2_grpc.ParameterServerStub(channel)
            while not stop.is_set():
                try:
                    stub.Lookup(ps_pb2.LookupRequest(table="small", keys=b"\0" * 8, dim=2), timeout=5)
                    codes.add(grpc.StatusCode.OK)
                except grpc.RpcError as err:
                    codes.add(err.code())

    thread = threading.Thread(target=hammer)
    thread.start()
    wait_until(lambda: grpc.StatusCode.OK in codes, "a lookup answered before the shutdown")
    assert cluster.stop() == [0]
    wait_until(lambda: grpc.StatusCode.UNAVAILABLE in codes, "a lookup refused once the shard is gone")
    stop.set()
    thread.join(10)
    assert grpc.StatusCode.OK in codes and grpc.StatusCode.UNAVAILABLE in codes
    # A call that reaches the transport while server.stop() runs can be CANCELLED before any
    # handler saw it (nothing was applied); PSClient retries it like UNAVAILABLE.
    assert codes <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}, codes


def test_a_reply_over_the_message_limit_is_refused_before_it_is_built():
    wide = TableConfig("wide", dim=256)
    with InProcessShards.start(make_job([wide], message_limit_bytes=1 << 20)) as shards:
        with grpc.insecure_channel(shards.job.shards[0].address) as channel:
            stub = ps_pb2_grpc.ParameterServerStub(channel)
            keys = np.arange(1100, dtype=np.int64)  # 8.8 KB of keys, 1.1 MB of values
            for call, request in (
                (stub.Lookup, ps_pb2.LookupRequest(table="wide", keys=keys.tobytes(), dim=256)),
                (stub.LookupBatch, ps_pb2.LookupBatchRequest(requests=[
                    ps_pb2.LookupRequest(table="wide", keys=keys[:600].tobytes(), dim=256),
                    ps_pb2.LookupRequest(table="wide", keys=keys[600:].tobytes(), dim=256),
                ])),
            ):
                with pytest.raises(grpc.RpcError) as info:
                    call(request, timeout=10)
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert "over message_limit_bytes 1,048,576" in info.value.details(), info.value.details()
                assert "at most 1,024 keys" in info.value.details()
            reply = stub.Lookup(ps_pb2.LookupRequest(table="wide", keys=keys[:1000].tobytes(), dim=256), timeout=10)
            assert len(reply.values) == 1000 * 256 * 4


def test_push_id_memory_is_bounded_in_bytes():
    ledger = PushLedger(window=1000, max_bytes=100_000)
    answer = ps_pb2.PushResponse(version=3, num_updated=2)
    for client in range(50):
        for sequence in range(100):
            ledger.put(f"client-{client}", sequence, answer)
        assert ledger.num_bytes <= 100_000
    assert ledger.get("client-49", 99).version == 3  # the newest are kept
    assert ledger.get("client-0", 0) is None  # the oldest answers went first
    # The estimate holds: what the entries really take is no more than what the ledger counts.
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    big = PushLedger(window=10_000, max_bytes=1 << 40)
    for sequence in range(10_000):
        # A new id object per push, as each parsed request brings one: one object for all of them
        # hid that every entry kept its own copy of the id (a review's shard: 64 MiB for a 32 MiB bound).
        client = "".join(["c"] * 200)
        big.put(client, sequence, ps_pb2.PushResponse(version=sequence + 2**40, num_updated=sequence + 2**40))
        del client
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert used <= big.num_bytes, f"{used} bytes used, {big.num_bytes} counted"


def test_over_its_bytes_the_push_id_memory_forgets_the_oldest_answers_not_a_client_whole():
    """Clients pushing in turn, more of them than the bytes hold a window of: the least recently
    pushing client is the one about to push next, and it was forgotten whole, its newest push
    (the one it may be retrying) included, so that retry was applied twice. Now every client keeps
    its newest answers, and a standby's copy (export, load) keeps the same ones in the same order."""
    ledger = PushLedger(window=4096, max_bytes=200_000)
    answer = ps_pb2.PushResponse(version=7, num_updated=1)
    clients = [f"trainer-{i}" for i in range(40)]
    for sequence in range(60):
        for client in clients:
            ledger.put(client, sequence, answer)
            assert ledger.num_bytes <= 200_000
    for client in clients:
        assert ledger.get(client, 59).version == 7, client
        assert ledger.get(client, 0) is None, client
    copy = PushLedger(window=4096, max_bytes=200_000)
    copy.load(ledger.export())
    assert copy.export() == ledger.export() and copy.num_bytes == ledger.num_bytes
    ledger.put(clients[0], 60, answer)
    copy.put(clients[0], 60, answer)
    assert copy.export() == ledger.export()
