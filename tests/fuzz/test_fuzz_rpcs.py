"""Malformed and extreme requests against a real shard and a real serving replica (issue 8, point 4).

Each RPC gets N_PER_METHOD requests from a seeded generator: random bytes where int64/float32
arrays belong (lengths not a multiple of 8 or 4, empty, truncated), dims 0/1/huge/uint32 max,
unknown, unicode and very long table names, NaN/Inf gradients, duplicate keys, counts of the
wrong length, steps at uint64 max, a few messages just over the server's limit, and raw garbage
bytes sent through a generic call so that the server's protobuf parsing sees junk too.

Every reply must be OK or a status of the contract (never INTERNAL/UNKNOWN: those mean an
unmapped exception); the processes stay alive, their memory bounded, and a valid request gets
the right answer afterwards.
"""

from __future__ import annotations

import collections
from collections.abc import Callable

import grpc
import numpy as np
import pytest

from ps.rpc import ps_pb2, ps_pb2_grpc, serving_pb2, serving_pb2_grpc, snapshot_pb2, snapshot_pb2_grpc
from ps.table_config import OptimizerConfig, OptimizerKind, TableConfig
from tests.helpers.processes import ShardCluster, make_job
from tests.serving.replicas import ServingReplica

pytestmark = pytest.mark.slow

N_PER_METHOD = 10_000
SEED = 20260408
MESSAGE_LIMIT = 256 << 10  # small, so that an oversized message is cheap to build and send
OVERSIZED = MESSAGE_LIMIT + (1 << 16) + 4096  # just over limit + the server's framing slack
RSS_GROWTH_BOUND = 300 << 20
TIMEOUT = 5.0
SUBSCRIBE_TIMEOUT = 0.2

USER = TableConfig("user", dim=4, seed=7)
SMALL = TableConfig("small", dim=2, capacity=8)  # fills up: RESOURCE_EXHAUSTED
CHECK = TableConfig("check", dim=3, seed=3, optimizer=OptimizerConfig(kind=OptimizerKind.SGD, lr=0.5))
FUZZED_TABLES = (USER, SMALL)  # CHECK is left alone for the answer checked at the end

CONTRACT = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.OUT_OF_RANGE,
    }
)
# The Subscribe streams are cut by the test's own deadline or cancel.
STREAM_CONTRACT = CONTRACT | {grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}

INT64_EXTREMES = np.array([0, -1, 1, np.iinfo(np.int64).min, np.iinfo(np.int64).max], dtype=np.int64)
UINT32_MAX = (1 << 32) - 1
UINT64_MAX = (1 << 64) - 1
ODD_NAMES = ("", "nope", "USER", "user ", "tablé", "表格", "🙂🙃", "a\x00b", "../user", "x" * 4096, "y" * 200_000)


class Fuzz:
    """Malformed and extreme request fields drawn from one seeded generator."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def chance(self, p: float) -> bool:
        return bool(self.rng.random() < p)

    def pick(self, options):
        return options[int(self.rng.integers(len(options)))]

    def junk(self, max_len: int = 96) -> bytes:
        return self.rng.bytes(int(self.rng.integers(0, max_len + 1)))

    def table(self) -> TableConfig | None:
        """A fuzzed table, or None for a name no table has."""
        return None if self.chance(0.25) else self.pick(FUZZED_TABLES)

    def name(self, table: TableConfig | None) -> str:
        return table.name if table is not None else self.pick(ODD_NAMES)

    def keys(self) -> np.ndarray:
        """keys (n,) int64: small ranges with duplicates, extremes, random 64-bit values."""
        n = int(self.pick((0, 1, 2, 3, 8, 33)))
        kind = int(self.rng.integers(4))
        if kind == 0:
            return self.rng.integers(0, 64, n, dtype=np.int64)
        if kind == 1:
            return np.full(n, int(self.rng.integers(0, 64)), dtype=np.int64)
        if kind == 2:
            return self.rng.choice(INT64_EXTREMES, n)
        return self.rng.integers(np.iinfo(np.int64).min, np.iinfo(np.int64).max, n, dtype=np.int64)

    def key_bytes(self, keys: np.ndarray) -> bytes:
        """The keys' bytes, or a malformed version of them (truncated, extended, random)."""
        data = keys.astype("<i8").tobytes()
        kind = int(self.rng.integers(6))
        if kind == 0 and data:
            return data[: int(self.rng.integers(len(data)))]
        if kind == 1:
            return data + self.rng.bytes(int(self.rng.integers(1, 8)))
        if kind == 2:
            return self.junk()
        return data

    def dim(self, table: TableConfig | None) -> int:
        if table is not None and self.chance(0.6):
            return table.dim
        return int(self.pick((0, 1, 2, 3, 4, 5, 65536, 1 << 31, UINT32_MAX)))

    def values(self, n: int, dim: int) -> bytes:
        """grads (n, dim) float32 bytes: finite, with NaN/Inf, truncated, or random."""
        if dim > 64:
            return self.junk()
        grads = self.rng.normal(size=(n, dim)).astype("<f4")
        if grads.size and self.chance(0.3):
            grads.flat[int(self.rng.integers(grads.size))] = self.pick((np.nan, np.inf, -np.inf))
        if self.chance(0.05):
            grads[:] = np.float32(3.0e38)
        data = grads.tobytes()
        kind = int(self.rng.integers(8))
        if kind == 0 and data:
            return data[: int(self.rng.integers(len(data)))]
        if kind == 1:
            return data + self.rng.bytes(int(self.rng.integers(1, 4)))
        if kind == 2:
            return self.junk()
        return data

    def counts(self, n: int) -> bytes:
        kind = int(self.rng.integers(6))
        if kind == 0:
            return self.rng.integers(-3, 5, n, dtype=np.int64).astype("<i8").tobytes()
        if kind == 1:
            wrong_n = max(0, n + int(self.pick((-1, 1, 2))))
            return self.rng.integers(0, 5, wrong_n, dtype=np.int64).astype("<i8").tobytes()
        if kind == 2:
            return self.rng.choice(INT64_EXTREMES, n).astype("<i8").tobytes()
        if kind == 3:
            return self.junk(24)
        return b""

    def dtype(self) -> int:
        if self.chance(0.8):
            return int(self.pick((ps_pb2.DTYPE_UNSPECIFIED, ps_pb2.FLOAT32)))
        return int(self.pick((ps_pb2.FLOAT16, 3, 77, -1, (1 << 31) - 1)))

    def lookup(self) -> ps_pb2.LookupRequest:
        table = self.table()
        return ps_pb2.LookupRequest(table=self.name(table), keys=self.key_bytes(self.keys()), dim=self.dim(table))

    def push(self) -> ps_pb2.PushRequest:
        table = self.table()
        keys = self.keys()
        dim = self.dim(table)
        request = ps_pb2.PushRequest(
            table=self.name(table),
            keys=self.key_bytes(keys),
            grads=self.values(keys.shape[0], dim),
            dim=dim,
            dtype=self.dtype(),
            counts=self.counts(keys.shape[0]),
        )
        if self.chance(0.5):
            request.step = int(self.pick((0, 1, int(self.rng.integers(1 << 40)), UINT64_MAX - 1, UINT64_MAX)))
        if self.chance(0.3):
            request.push_id.client_id = self.pick(("w0", "w1", "ü", "z" * 300, f"c{int(self.rng.integers(1 << 20))}"))
            request.push_id.sequence = int(self.pick((0, 1, int(self.rng.integers(100)), UINT64_MAX)))
        return request

    def oversized_keys(self) -> bytes:
        return np.arange(OVERSIZED // 8, dtype="<i8").tobytes()

    def subscribe(self) -> ps_pb2.SubscribeRequest:
        table = self.table()
        return ps_pb2.SubscribeRequest(
            table=self.name(table),
            from_version=int(self.pick((0, 1, 2, int(self.rng.integers(1 << 20)), UINT64_MAX))),
            incarnation=int(self.pick((0, 0, 1, int(self.rng.integers(1 << 62)), UINT64_MAX))),
            full_sync=self.chance(0.3),
        )

    def write_snapshot(self, base: str, job: str) -> snapshot_pb2.WriteSnapshotRequest:
        # Relative paths would land in the shard's working directory: every uri here is absolute,
        # malformed, or names a scheme the shard refuses before it touches anything.
        uri = self.pick(
            (
                base,
                f"file://{base}/ü-表",
                "",
                "nope://bucket/x",
                "file://host/tmp/x",
                f"file://{base}?a=1",
                "://x",
            )
        )
        request = snapshot_pb2.WriteSnapshotRequest(
            uri=uri,
            job=job if self.chance(0.4) else self.pick(("", "other", "tést", "../test", "j" * 5000)),
            step=int(self.pick((0, 1, int(self.rng.integers(1 << 20)), UINT64_MAX))),
            kind=self.pick(("full", "incremental", "", "FULL", "delta", "ful\x00l")),
            num_shards=int(self.pick((0, 1, 2, UINT32_MAX))),
        )
        if self.chance(0.4):
            request.parent = int(self.pick((0, 1, int(self.rng.integers(1 << 20)), UINT64_MAX)))
        writes = request.job == job and request.kind == "full" and request.uri.startswith(("/", "file:///"))
        if writes and self.chance(0.9):
            request.job = "other"  # a real write costs milliseconds: keep them to a few hundred
        return request

    def serving_lookup(self) -> serving_pb2.ServingLookupRequest:
        table = self.table()
        return serving_pb2.ServingLookupRequest(
            table=self.name(table),
            keys=self.key_bytes(self.keys()),
            dim=0 if self.chance(0.3) else self.dim(table),
            dtype=int(self.pick((0, 1, 2, 2, 3, 9, -5))),
        )

    def raw(self, valid: bytes) -> bytes:
        """Garbage for the server's parser: random bytes, or a valid message cut or corrupted."""
        kind = int(self.rng.integers(4))
        if kind == 0 and valid:
            return valid[: int(self.rng.integers(len(valid)))]
        if kind == 1 and valid:
            data = bytearray(valid)
            for _ in range(int(self.rng.integers(1, 4))):
                data[int(self.rng.integers(len(data)))] = int(self.rng.integers(256))
            return bytes(data)
        if kind == 2:
            return bytes([0x0A]) + self.rng.bytes(int(self.rng.integers(0, 4)))  # a field 1 with no length
        return self.junk(200)


class Tally:
    """Outcome of every call of one method; failures keep their request for the report."""

    def __init__(self, allowed: frozenset[grpc.StatusCode]) -> None:
        self.allowed = allowed
        self.codes: collections.Counter[str] = collections.Counter()
        self.failures: list[str] = []

    def call(self, fn: Callable[[], object], what: object) -> None:
        try:
            fn()
        except grpc.RpcError as exc:
            code = exc.code()
            self.codes[code.name] += 1
            if code not in self.allowed:
                self.failures.append(f"{code.name}: {exc.details()!r} for {str(what)[:300]!r}")
            return
        self.codes["OK"] += 1

    def check(self, n: int) -> None:
        assert sum(self.codes.values()) == n
        assert not self.failures, f"{len(self.failures)} calls out of contract ({dict(self.codes)}):\n" + "\n".join(
            self.failures[:10]
        )


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    job = make_job([USER, SMALL, CHECK], num_shards=1, message_limit_bytes=MESSAGE_LIMIT)
    with ShardCluster.start(job, tmp_path_factory.mktemp("fuzz-ps")) as c:
        yield c


@pytest.fixture(scope="module")
def replica(cluster, tmp_path_factory):
    with ServingReplica.start(cluster, tmp_path_factory.mktemp("fuzz-serve")) as r:
        yield r


@pytest.fixture(scope="module")
def servers(cluster, replica):
    """(pid, starting RSS) of the shard and the replica."""
    procs = [cluster.procs[0], replica.proc]
    return [(p, rss_bytes(p.pid)) for p in procs]


@pytest.fixture(scope="module")
def ps_channel(cluster):
    options = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
    with grpc.insecure_channel(cluster.job.shards[0].address, options=options) as channel:
        yield channel


@pytest.fixture(scope="module")
def serving_channel(replica):
    options = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
    with grpc.insecure_channel(replica.config.listen, options=options) as channel:
        yield channel


def raw_call(channel: grpc.Channel, path: str):
    return channel.unary_unary(path, request_serializer=lambda b: b, response_deserializer=lambda b: b)


def fuzz_unary(
    channel: grpc.Channel,
    path: str,
    stub_method: Callable,
    make: Callable[[Fuzz], object],
    seed: int,
    oversized: Callable[[Fuzz], object] | None = None,
) -> Tally:
    """N_PER_METHOD calls of one unary method: one in ten raw garbage, three oversized if given."""
    fuzz = Fuzz(seed)
    raw = raw_call(channel, path)
    tally = Tally(CONTRACT)
    for i in range(N_PER_METHOD):
        if oversized is not None and i < 3:
            request = oversized(fuzz)
            tally.call(lambda r=request: stub_method(r, timeout=TIMEOUT), f"oversized {request.ByteSize()} bytes")
        elif i % 10 == 0:
            data = fuzz.raw(make(fuzz).SerializeToString())
            tally.call(lambda d=data: raw(d, timeout=TIMEOUT), data)
        else:
            request = make(fuzz)
            tally.call(lambda r=request: stub_method(r, timeout=TIMEOUT), request)
    return tally


def assert_servers_healthy(servers) -> None:
    for proc, start_rss in servers:
        assert proc.poll() is None, f"pid {proc.pid} exited with {proc.returncode}"
        rss = rss_bytes(proc.pid)
        assert rss < start_rss + RSS_GROWTH_BOUND, f"pid {proc.pid}: RSS {rss >> 20} MiB, started at {start_rss >> 20}"


PS = "/embps.v1.ParameterServer/"


def test_fuzz_lookup(ps_channel, servers):
    stub = ps_pb2_grpc.ParameterServerStub(ps_channel)
    tally = fuzz_unary(
        ps_channel, PS + "Lookup", stub.Lookup, Fuzz.lookup, SEED + 1,
        oversized=lambda f: ps_pb2.LookupRequest(table="user", keys=f.oversized_keys(), dim=4),
    )
    tally.check(N_PER_METHOD)
    assert tally.codes["OK"] > 0 and tally.codes["INVALID_ARGUMENT"] > 0 and tally.codes["NOT_FOUND"] > 0
    assert tally.codes["RESOURCE_EXHAUSTED"] >= 3
    assert_servers_healthy(servers)


def test_fuzz_push(ps_channel, servers):
    stub = ps_pb2_grpc.ParameterServerStub(ps_channel)
    tally = fuzz_unary(
        ps_channel, PS + "Push", stub.Push, Fuzz.push, SEED + 2,
        oversized=lambda f: ps_pb2.PushRequest(table="user", keys=f.oversized_keys(), dim=4),
    )
    tally.check(N_PER_METHOD)
    assert tally.codes["OK"] > 0 and tally.codes["INVALID_ARGUMENT"] > 0 and tally.codes["NOT_FOUND"] > 0
    assert tally.codes["RESOURCE_EXHAUSTED"] > 3  # the oversized ones and the full `small` table
    assert_servers_healthy(servers)


def test_fuzz_stats(ps_channel, servers):
    stub = ps_pb2_grpc.ParameterServerStub(ps_channel)
    tally = fuzz_unary(ps_channel, PS + "Stats", stub.Stats, lambda f: ps_pb2.StatsRequest(), SEED + 3)
    tally.check(N_PER_METHOD)
    assert tally.codes["OK"] >= N_PER_METHOD * 0.9 and tally.codes["INVALID_ARGUMENT"] > 0
    assert_servers_healthy(servers)


def batch(make: Callable[[Fuzz], object], fuzz: Fuzz) -> list:
    return [make(fuzz) for _ in range(int(fuzz.pick((0, 1, 2, 3, 6))))]


def test_fuzz_lookup_batch(ps_channel, servers):
    stub = ps_pb2_grpc.ParameterServerStub(ps_channel)
    tally = fuzz_unary(
        ps_channel, PS + "LookupBatch", stub.LookupBatch,
        lambda f: ps_pb2.LookupBatchRequest(requests=batch(Fuzz.lookup, f)), SEED + 4,
        oversized=lambda f: ps_pb2.LookupBatchRequest(
            requests=[ps_pb2.LookupRequest(table="user", keys=f.oversized_keys()[: OVERSIZED // 2], dim=4)] * 2
        ),
    )
    tally.check(N_PER_METHOD)
    assert tally.codes["OK"] > 0 and tally.codes["INVALID_ARGUMENT"] > 0
    assert_servers_healthy(servers)


def test_fuzz_push_batch(ps_channel, servers):
    stub = ps_pb2_grpc.ParameterServerStub(ps_channel)
    tally = fuzz_unary(
        ps_channel, PS + "PushBatch", stub.PushBatch,
        lambda f: ps_pb2.PushBatchRequest(requests=batch(Fuzz.push, f)), SEED + 5,
        oversized=lambda f: ps_pb2.PushBatchRequest(requests=[ps_pb2.PushRequest(table="x", keys=f.oversized_keys())]),
    )
    tally.check(N_PER_METHOD)
    assert tally.codes["OK"] > 0 and tally.codes["INVALID_ARGUMENT"] > 0
    assert_servers_healthy(servers)


def test_fuzz_subscribe(ps_channel, servers):
    """Each stream is read for its first message at most, then cancelled."""
    stub = ps_pb2_grpc.ParameterServerStub(ps_channel)
    raw = ps_channel.unary_stream(PS + "Subscribe", request_serializer=lambda b: b, response_deserializer=lambda b: b)
    fuzz = Fuzz(SEED + 6)
    tally = Tally(STREAM_CONTRACT)
    first_messages = 0

    def first(stream) -> None:
        nonlocal first_messages
        try:
            next(stream, None)
            first_messages += 1
        finally:
            stream.cancel()

    for i in range(N_PER_METHOD):
        if i % 10 == 0:
            data = fuzz.raw(fuzz.subscribe().SerializeToString())
            tally.call(lambda d=data: first(raw(d, timeout=SUBSCRIBE_TIMEOUT)), data)
        else:
            request = fuzz.subscribe()
            tally.call(lambda r=request: first(stub.Subscribe(r, timeout=SUBSCRIBE_TIMEOUT)), request)
    tally.check(N_PER_METHOD)
    assert first_messages > 0 and tally.codes["NOT_FOUND"] > 0 and tally.codes["FAILED_PRECONDITION"] > 0
    assert_servers_healthy(servers)


def test_fuzz_write_snapshot(cluster, ps_channel, servers, tmp_path):
    stub = snapshot_pb2_grpc.SnapshotControlStub(ps_channel)
    base = str(tmp_path / "snapshots")
    tally = fuzz_unary(
        ps_channel, "/embps.v1.SnapshotControl/WriteSnapshot", stub.WriteSnapshot,
        lambda f: f.write_snapshot(base, cluster.job.job), SEED + 7,
    )
    tally.check(N_PER_METHOD)
    assert tally.codes["OK"] > 0 and tally.codes["INVALID_ARGUMENT"] > 0
    assert_servers_healthy(servers)


def test_fuzz_serving_lookup(serving_channel, servers):
    stub = serving_pb2_grpc.ServingStub(serving_channel)
    tally = fuzz_unary(
        serving_channel, "/embps.v1.Serving/Lookup", stub.Lookup, Fuzz.serving_lookup, SEED + 8,
        oversized=lambda f: serving_pb2.ServingLookupRequest(table="user", keys=f.oversized_keys()),
    )
    tally.check(N_PER_METHOD)
    assert tally.codes["OK"] > 0 and tally.codes["INVALID_ARGUMENT"] > 0 and tally.codes["NOT_FOUND"] > 0
    assert tally.codes["RESOURCE_EXHAUSTED"] >= 3
    assert_servers_healthy(servers)


def test_fuzz_serving_status(serving_channel, servers):
    stub = serving_pb2_grpc.ServingStub(serving_channel)
    tally = fuzz_unary(
        serving_channel, "/embps.v1.Serving/Status", stub.Status, lambda f: serving_pb2.ServingStatusRequest(),
        SEED + 9,
    )
    tally.check(N_PER_METHOD)
    assert tally.codes["OK"] >= N_PER_METHOD * 0.9 and tally.codes["INVALID_ARGUMENT"] > 0
    assert_servers_healthy(servers)


def test_unknown_methods_are_unimplemented(ps_channel, serving_channel):
    for channel, path in (
        (ps_channel, PS + "Delete"),
        (ps_channel, "/embps.v1.Nope/Lookup"),
        (serving_channel, "/embps.v1.Serving/Push"),
        (serving_channel, PS + "Lookup"),
    ):
        with pytest.raises(grpc.RpcError) as raised:
            raw_call(channel, path)(b"\x0a\x04user", timeout=TIMEOUT)
        assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED, path


def test_valid_requests_get_the_right_answer_afterwards(ps_channel, replica, servers):
    """After the fuzzing: one SGD push moves a row by -lr * grad on the shard and in the replica."""
    stub = ps_pb2_grpc.ParameterServerStub(ps_channel)
    keys = np.array([424242, 7, 424242], dtype=np.int64)  # a duplicate: its gradients add up
    before = np.frombuffer(
        stub.Lookup(ps_pb2.LookupRequest(table="check", keys=keys.tobytes(), dim=3), timeout=TIMEOUT).values, "<f4"
    ).reshape(3, 3)
    grads = np.array([[1, 2, 3], [4, 5, 6], [0.5, 0.5, 0.5]], dtype=np.float32)
    reply = stub.Push(
        ps_pb2.PushRequest(table="check", keys=keys.tobytes(), grads=grads.tobytes(), dim=3, dtype=ps_pb2.FLOAT32),
        timeout=TIMEOUT,
    )
    assert reply.num_updated == 2 and reply.num_inserted == 2
    after = np.frombuffer(
        stub.Lookup(ps_pb2.LookupRequest(table="check", keys=keys.tobytes(), dim=3), timeout=TIMEOUT).values, "<f4"
    ).reshape(3, 3)
    expected = before.copy()
    expected[[0, 2]] -= 0.5 * (grads[0] + grads[2])
    expected[1] -= 0.5 * grads[1]
    np.testing.assert_allclose(after, expected, rtol=1e-6, atol=1e-7)

    replica.wait_version("check", 0, reply.version)
    served, found, _ = replica.lookup("check", keys)
    assert found.all()
    np.testing.assert_array_equal(served, after)
    assert_servers_healthy(servers)


def test_undecodable_request_bytes_are_invalid_argument(ps_channel, serving_channel):
    """grpc.aio alone would answer UNKNOWN: the parse error happens before any handler runs."""
    for channel, path in (
        (ps_channel, PS + "Push"),
        (ps_channel, "/embps.v1.SnapshotControl/WriteSnapshot"),
        (serving_channel, "/embps.v1.Serving/Lookup"),
    ):
        with pytest.raises(grpc.RpcError) as raised:
            raw_call(channel, path)(b"\x0a", timeout=TIMEOUT)  # field 1, its length missing
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, path
        assert "not a valid message" in raised.value.details()
    stream = ps_channel.unary_stream(PS + "Subscribe", request_serializer=lambda b: b, response_deserializer=lambda b: b)
    with pytest.raises(grpc.RpcError) as raised:
        next(stream(b"\x0a", timeout=TIMEOUT))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
