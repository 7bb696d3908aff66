"""Malformed and extreme requests against a real shard and a real serving replica (issue 8, point 4).

Hypothesis draws max_examples requests per RPC (the profile's: 1,000 in make test, 10,000 in
make test-deep; see tests/conftest.py): random bytes where int64/float32 arrays belong
(lengths not a multiple of 8 or 4, empty, truncated), dims 0/1/huge/uint32 max, unknown,
unicode and very long table names, NaN/Inf/huge gradients, duplicate keys, counts of the wrong
length, steps at uint64 max; one call in ten is raw bytes (a valid message cut or corrupted, or
junk) sent through a generic call, so the server's protobuf parsing sees garbage too; three
messages per method are just over the server's limit.

Every reply must be OK or a status of the contract (never INTERNAL/UNKNOWN: those mean an
unmapped exception); an out-of-contract reply fails the example, and hypothesis shrinks it to
the smallest request that shows it. The processes stay alive, their memory bounded, and a valid
request gets the right answer afterwards. The runs are derandomized: CI sees the same requests
every time, and a failure reproduces.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Callable
from dataclasses import dataclass, replace

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ps.job_config import SnapshotConfig
from ps.rpc import ps_pb2, ps_pb2_grpc, serving_pb2, serving_pb2_grpc, snapshot_pb2, snapshot_pb2_grpc
from ps.table.config import OptimizerConfig, OptimizerKind, TableConfig
from tests.helpers.processes import ShardCluster, make_job, rss_bytes
from tests.serving.replicas import ServingReplica

pytestmark = pytest.mark.slow

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

INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
INT64_EXTREMES = (0, -1, 1, INT64_MIN, INT64_MAX)
UINT32_MAX = (1 << 32) - 1
UINT64_MAX = (1 << 64) - 1
ODD_NAMES = ("", "nope", "USER", "user ", "tablé", "表格", "🙂🙃", "a\x00b", "../user", "x" * 4096, "y" * 200_000)
ODD_DIMS = (0, 1, 2, 3, 4, 5, 65536, 1 << 31, UINT32_MAX)
FUZZ_SETTINGS = settings(
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)

# --- strategies ------------------------------------------------------------------------------

tables = st.one_of(st.sampled_from(FUZZED_TABLES), st.none())  # None: a name no table has


ODD_NAME_STRATEGY = st.one_of(st.sampled_from(ODD_NAMES), st.text(max_size=12))
ODD_DIM_STRATEGY = st.one_of(st.sampled_from(ODD_DIMS), st.integers(0, UINT32_MAX))
# Built once: a strategy built per draw costs more than the draw.
NAME_STRATEGIES = {t.name: st.just(t.name) for t in FUZZED_TABLES}
DIM_STRATEGIES = {t.name: st.one_of(st.just(t.dim), st.just(t.dim), ODD_DIM_STRATEGY) for t in FUZZED_TABLES}


def names(table: TableConfig | None) -> st.SearchStrategy[str]:
    return ODD_NAME_STRATEGY if table is None else NAME_STRATEGIES[table.name]


def dims(table: TableConfig | None) -> st.SearchStrategy[int]:
    return ODD_DIM_STRATEGY if table is None else DIM_STRATEGIES[table.name]


# Arrays are drawn as (shape, kind, special values, seed) and filled by numpy from the seed:
# hypothesis picks and shrinks the structure, and an example costs a few draws, not one per element.
seeds = st.integers(0, (1 << 32) - 1)
positions = st.integers(0, 1 << 20)  # an index into a buffer of any length, taken modulo its length
key_counts = st.sampled_from((0, 1, 2, 3, 8, 33))
key_kinds = st.sampled_from(("small range", "one key", "extremes", "any"))
int64s = st.integers(INT64_MIN, INT64_MAX)
manglings = st.sampled_from(("as is", "as is", "as is", "cut", "extended", "junk"))
extensions = st.binary(min_size=1, max_size=7)
junks = {size: st.binary(max_size=size) for size in (3, 24, 96, 200)}


@st.composite
def keys(draw: st.DrawFn) -> np.ndarray:
    """keys (n,) int64: a small range (duplicates), one key repeated, extremes, or any 64-bit value."""
    n = draw(key_counts)
    kind = draw(key_kinds)
    rng = np.random.default_rng(draw(seeds))
    if kind == "small range":
        return rng.integers(0, 64, n, dtype=np.int64)
    if kind == "one key":
        return np.full(n, draw(int64s), dtype=np.int64)
    if kind == "extremes":
        return rng.choice(np.array(INT64_EXTREMES, dtype=np.int64), n)
    return rng.integers(INT64_MIN, INT64_MAX, n, dtype=np.int64, endpoint=True)


KEYS = keys()


def mangled(draw: st.DrawFn, data: bytes, junk_size: int = 96) -> bytes:
    """`data` as is (most often), cut short, extended by a few bytes, or replaced by junk."""
    how = draw(manglings)
    if how == "cut" and data:
        return data[: draw(positions) % len(data)]
    if how == "extended":
        return data + draw(extensions)
    if how == "junk":
        return draw(junks[junk_size])
    return data


SPECIAL_FLOATS = (np.nan, np.inf, -np.inf, np.float32(3.0e38), np.float32(1e-45), -0.0)
specials = st.one_of(st.none(), st.sampled_from(SPECIAL_FLOATS))
count_kinds = st.sampled_from(("none", "none", "right length", "wrong length", "junk"))
length_errors = st.sampled_from((-1, 1, 2))


def gradients(draw: st.DrawFn, n: int, dim: int) -> bytes:
    """grads (n, dim) float32 bytes: normal values with NaN, Inf, 3e38 or a subnormal in one place
    or everywhere, possibly mangled; junk where dim is too large to build."""
    if dim > 64:
        return draw(junks[96])
    grads = np.random.default_rng(draw(seeds)).normal(size=(n, dim)).astype("<f4")
    special = draw(specials)
    if special is not None and grads.size:
        if draw(st.booleans()):
            grads[:] = special
        else:
            grads.flat[draw(positions) % grads.size] = special
    return mangled(draw, grads.tobytes())


def counts(draw: st.DrawFn, n: int) -> bytes:
    how = draw(count_kinds)
    rng = np.random.default_rng(draw(seeds))
    if how == "right length":
        return rng.integers(-3, 5, n, dtype=np.int64).astype("<i8").tobytes()
    if how == "wrong length":
        wrong_n = max(0, n + draw(length_errors))
        return rng.integers(0, 5, wrong_n, dtype=np.int64).astype("<i8").tobytes()
    if how == "junk":
        return draw(junks[24])
    return b""


dtypes = st.one_of(
    st.sampled_from((ps_pb2.DTYPE_UNSPECIFIED, ps_pb2.FLOAT32)),
    st.sampled_from((ps_pb2.FLOAT16, 3, 77, -1)),
    st.integers(-(1 << 31), (1 << 31) - 1),
)
uint64s = st.one_of(st.sampled_from((0, 1, 2, UINT64_MAX - 1, UINT64_MAX)), st.integers(0, UINT64_MAX))
client_ids = st.one_of(st.sampled_from(("w0", "w1", "ü", "z" * 300)), st.text(max_size=8))


@st.composite
def lookups(draw: st.DrawFn) -> ps_pb2.LookupRequest:
    table = draw(tables)
    return ps_pb2.LookupRequest(
        table=draw(names(table)), keys=mangled(draw, draw(KEYS).tobytes()), dim=draw(dims(table))
    )


@st.composite
def pushes(draw: st.DrawFn) -> ps_pb2.PushRequest:
    table = draw(tables)
    push_keys = draw(KEYS)
    dim = draw(dims(table))
    request = ps_pb2.PushRequest(
        table=draw(names(table)),
        keys=mangled(draw, push_keys.tobytes()),
        grads=gradients(draw, push_keys.shape[0], dim),
        dim=dim,
        dtype=draw(dtypes),
        counts=counts(draw, push_keys.shape[0]),
    )
    if draw(st.booleans()):
        request.step = draw(uint64s)
    if draw(st.booleans()):
        request.push_id.client_id = draw(client_ids)
        request.push_id.sequence = draw(uint64s)
    return request


def batches(requests: st.SearchStrategy, message: type) -> st.SearchStrategy:
    return st.lists(requests, max_size=4).map(lambda rs: message(requests=rs))


@st.composite
def subscribes(draw: st.DrawFn) -> ps_pb2.SubscribeRequest:
    table = draw(tables)
    return ps_pb2.SubscribeRequest(
        table=draw(names(table)),
        from_version=draw(uint64s),
        incarnation=draw(uint64s),
        full_sync=draw(st.booleans()),
        stored_rows=draw(st.booleans()),
    )


@st.composite
def subscribe_tables(draw: st.DrawFn) -> ps_pb2.SubscribeTablesRequest:
    entries = draw(st.lists(subscribes(), max_size=3))
    for entry in entries:
        entry.stream_id = draw(uint64s)
        entry.committed = draw(st.booleans())
    credit = [ps_pb2.StreamCredit(stream_id=draw(uint64s), messages=draw(st.sampled_from((0, 1, UINT32_MAX))))
              for _ in range(draw(st.integers(0, 2)))]
    return ps_pb2.SubscribeTablesRequest(
        subscribe=entries, stop=draw(st.lists(uint64s, max_size=2)),
        window=draw(st.sampled_from((0, 1, 4, UINT32_MAX))), credit=credit,
    )


@st.composite
def write_snapshots(draw: st.DrawFn, base: str, job: str) -> snapshot_pb2.WriteSnapshotRequest:
    """base: the job's [snapshot] uri, a local path; the shard writes there alone. The other uris
    are out of place (refused: nothing is written there), malformed, or of a scheme it refuses.
    A job of one shard: num_shards 0 or 1."""
    in_place = (base, f"file://{base}", f"{base}/")
    uri = draw(
        st.sampled_from(
            (*in_place, f"file://{base}/ü-表", f"{base}-elsewhere", "", "nope://bucket/x", "file://host/tmp/x",
             f"file://{base}?a=1", "://x")
        )
    )
    request = snapshot_pb2.WriteSnapshotRequest(
        uri=uri,
        job=draw(st.one_of(st.just(job), st.sampled_from(("", "other", "tést", "../test", "j" * 5000)))),
        step=draw(uint64s),
        kind=draw(st.sampled_from(("full", "incremental", "", "FULL", "delta", "ful\x00l"))),
        num_shards=draw(st.one_of(st.sampled_from((0, 1, 2, UINT32_MAX)), st.integers(0, UINT32_MAX))),
    )
    if draw(st.booleans()):
        request.parent = draw(uint64s)
    writes = request.job == job and request.kind == "full" and request.uri in in_place and request.num_shards in (0, 1)
    if writes and draw(st.integers(0, 9)) > 0:
        request.job = "other"  # a real write costs milliseconds: keep them to about a tenth
    return request


dense_formats = st.one_of(
    st.sampled_from(("", "torch.save", "TORCH.SAVE", "pickle", "f\x00", "格式")), st.text(max_size=8)
)


@st.composite
def commits(draw: st.DrawFn) -> ps_pb2.CommitRequest:
    """Steps forwards, backwards (a new history), repeated and at the extremes; dense states of
    junk bytes, with or without a format."""
    return ps_pb2.CommitRequest(
        step=draw(uint64s),
        dense_state=draw(st.one_of(st.just(b""), junks[200], st.binary(min_size=1000, max_size=4000))),
        dense_format=draw(dense_formats),
    )


serving_dtypes = st.sampled_from((0, 1, 2, 2, 3, 9, -5))


@st.composite
def serving_lookups(draw: st.DrawFn) -> serving_pb2.ServingLookupRequest:
    table = draw(tables)
    return serving_pb2.ServingLookupRequest(
        table=draw(names(table)),
        keys=mangled(draw, draw(KEYS).tobytes()),
        dim=0 if draw(st.booleans()) else draw(dims(table)),
        dtype=draw(serving_dtypes),
    )


@st.composite
def serving_lookup_manys(draw: st.DrawFn) -> serving_pb2.ServingLookupManyRequest:
    return serving_pb2.ServingLookupManyRequest(lookups=draw(st.lists(serving_lookups(), max_size=4)))


raw_kinds = st.sampled_from(("cut", "corrupted", "no length", "junk"))
byte_edits = st.lists(st.tuples(positions, st.integers(0, 255)), min_size=1, max_size=3)


@st.composite
def raw_bytes(draw: st.DrawFn, requests: st.SearchStrategy) -> bytes:
    """Garbage for the server's parser: a valid message cut or corrupted, a field with no length, junk."""
    valid = draw(requests).SerializeToString()
    how = draw(raw_kinds)
    if how == "cut" and valid:
        return valid[: draw(positions) % len(valid)]
    if how == "corrupted" and valid:
        data = bytearray(valid)
        for position, value in draw(byte_edits):
            data[position % len(data)] = value
        return bytes(data)
    if how == "no length":
        return b"\x0a" + draw(junks[3])  # field 1, a length-delimited field cut short
    return draw(junks[200])


@dataclass(frozen=True)
class Raw:
    """Bytes sent as they are through a generic call."""

    data: bytes


def calls(requests: st.SearchStrategy) -> st.SearchStrategy:
    """Mostly request messages, some raw bytes (hypothesis weighs the choice, not uniformly)."""
    raw = raw_bytes(requests).map(Raw)
    return st.integers(0, 9).flatmap(lambda i: raw if i == 0 else requests)


# --- running them ----------------------------------------------------------------------------


class Tally:
    """The status of every call of one method. An out-of-contract status fails the example."""

    def __init__(self, allowed: frozenset[grpc.StatusCode]) -> None:
        self.allowed = allowed
        self.codes: collections.Counter[str] = collections.Counter()

    def call(self, fn: Callable[[], object], what: object) -> None:
        try:
            fn()
        except grpc.RpcError as exc:
            code = exc.code()
            self.codes[code.name] += 1
            assert code in self.allowed, f"{code.name}: {exc.details()!r} for {str(what)[:300]!r}"
            return
        self.codes["OK"] += 1

    def check(self, n: int) -> None:
        assert sum(self.codes.values()) >= n, f"only {sum(self.codes.values())} calls: {dict(self.codes)}"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    job = make_job([USER, SMALL, CHECK], num_shards=1, message_limit_bytes=MESSAGE_LIMIT)
    job = replace(job, snapshot=SnapshotConfig(str(tmp_path_factory.mktemp("fuzz-snapshots"))))
    with ShardCluster.start(job, tmp_path_factory.mktemp("fuzz-ps")) as c:
        yield c


@pytest.fixture(scope="module")
def replica(cluster, tmp_path_factory):
    with ServingReplica.start(cluster, tmp_path_factory.mktemp("fuzz-serve")) as r:
        yield r


@pytest.fixture(scope="module")
def servers(cluster, replica):
    """(process, starting RSS) of the shard and the replica."""
    procs = [cluster.procs[0], replica.proc]
    return [(p, rss_bytes(p.pid)) for p in procs]


CHANNEL_OPTIONS = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]


@pytest.fixture(scope="module")
def ps_channel(cluster):
    with grpc.insecure_channel(cluster.job.shards[0].address, options=CHANNEL_OPTIONS) as channel:
        yield channel


@pytest.fixture(scope="module")
def serving_channel(replica):
    with grpc.insecure_channel(replica.config.listen, options=CHANNEL_OPTIONS) as channel:
        yield channel


def raw_call(channel: grpc.Channel, path: str):
    return channel.unary_unary(path, request_serializer=lambda b: b, response_deserializer=lambda b: b)


def fuzz_unary(
    channel: grpc.Channel,
    path: str,
    stub_method: Callable,
    requests: st.SearchStrategy,
    oversized: object | None = None,
) -> Tally:
    """FUZZ_SETTINGS.max_examples drawn calls of one unary method (see `calls`), then three oversized ones if given."""
    raw = raw_call(channel, path)
    tally = Tally(CONTRACT)

    @FUZZ_SETTINGS
    @given(calls(requests))
    def send(call) -> None:
        if isinstance(call, Raw):
            tally.call(lambda: raw(call.data, timeout=TIMEOUT), call)
        else:
            tally.call(lambda: stub_method(call, timeout=TIMEOUT), call)

    send()
    print(f"{path}: {dict(tally.codes)}")
    tally.check(FUZZ_SETTINGS.max_examples)
    if oversized is not None:
        for _ in range(3):
            tally.call(lambda: stub_method(oversized, timeout=TIMEOUT), f"oversized {oversized.ByteSize()} bytes")
        assert tally.codes["RESOURCE_EXHAUSTED"] >= 3
    return tally


def assert_servers_healthy(servers) -> None:
    for proc, start_rss in servers:
        assert proc.poll() is None, f"pid {proc.pid} exited with {proc.returncode}"
        rss = rss_bytes(proc.pid)
        assert rss < start_rss + RSS_GROWTH_BOUND, f"pid {proc.pid}: RSS {rss >> 20} MiB, started at {start_rss >> 20}"


PS = "/embps.v1.ParameterServer/"
OVERSIZED_KEYS = np.arange(OVERSIZED // 8, dtype="<i8").tobytes()


def test_fuzz_lookup(ps_channel, servers):
    stub = ps_pb2_grpc.ParameterServerStub(ps_channel)
    tally = fuzz_unary(
        ps_channel, PS + "Lookup", stub.Lookup, lookups(),
        oversized=ps_pb2.LookupRequest(table="user", keys=OVERSIZED_KEYS, dim=4),
    )
    assert tally.codes["OK"] > 0 and tally.codes["INVALID_ARGUMENT"] > 0 and tally.codes["NOT_FOUND"] > 0
    assert_servers_healthy(servers)


def test_fuzz_push(ps_channel, servers):
    stub = ps_pb2_grpc.ParameterServerStub(ps_channel)
    tally = fuzz_unary(
        ps_channel, PS + "Push", stub.Push, pushes(),
        oversized=ps_pb2.PushRequest(table="user", keys=OVERSIZED_KEYS, dim=4),
    )
    assert tally.codes["OK"] > 0 and tally.codes["INVALID_ARGUMENT"] > 0 and tally.codes["NOT_FOUND"] > 0
    assert tally.codes["RESOURCE_EXHAUSTED"] > 3  # the oversized ones and the full `small` table
    assert_servers_healthy(servers)


def test_fuzz_stats(ps_channel, servers):
    stub = ps_pb2_grpc.ParameterServerStub(ps_channel)
    tally = fuzz_unary(ps_channel, PS + "Stats", stub.Stats, st.just(ps_pb2.StatsRequest()))
    # Hypothesis never repeats an example, and StatsRequest has no field: nearly every call is raw bytes.
    assert tally.codes["OK"] > 0 and tally.codes["INVALID_ARGUMENT"] > 0
    assert_servers_healthy(servers)


def test_fuzz_lookup_batch(ps_channel, servers):
    stub = ps_pb2_grpc.ParameterServerStub(ps_channel)
    half = ps_pb2.LookupRequest(table="user", keys=OVERSIZED_KEYS[: OVERSIZED // 2], dim=4)
    tally = fuzz_unary(
        ps_channel, PS + "LookupBatch", stub.LookupBatch, batches(lookups(), ps_pb2.LookupBatchRequest),
        oversized=ps_pb2.LookupBatchRequest(requests=[half, half]),
    )
    assert tally.codes["OK"] > 0 and tally.codes["INVALID_ARGUMENT"] > 0
    assert_servers_healthy(servers)


def test_fuzz_push_batch(ps_channel, servers):
    stub = ps_pb2_grpc.ParameterServerStub(ps_channel)
    tally = fuzz_unary(
        ps_channel, PS + "PushBatch", stub.PushBatch, batches(pushes(), ps_pb2.PushBatchRequest),
        oversized=ps_pb2.PushBatchRequest(requests=[ps_pb2.PushRequest(table="x", keys=OVERSIZED_KEYS)]),
    )
    assert tally.codes["OK"] > 0 and tally.codes["INVALID_ARGUMENT"] > 0
    assert_servers_healthy(servers)


def test_fuzz_subscribe(ps_channel, servers):
    """Each stream is read for its first message at most, then cancelled."""
    stub = ps_pb2_grpc.ParameterServerStub(ps_channel)
    raw = ps_channel.unary_stream(PS + "Subscribe", request_serializer=lambda b: b, response_deserializer=lambda b: b)
    tally = Tally(STREAM_CONTRACT)
    first_messages = 0

    def first(stream) -> None:
        nonlocal first_messages
        try:
            next(stream, None)
            first_messages += 1
        finally:
            stream.cancel()

    @FUZZ_SETTINGS
    @given(calls(subscribes()))
    def send(call) -> None:
        if isinstance(call, Raw):
            tally.call(lambda: first(raw(call.data, timeout=SUBSCRIBE_TIMEOUT)), call)
        else:
            tally.call(lambda: first(stub.Subscribe(call, timeout=SUBSCRIBE_TIMEOUT)), call)

    send()
    tally.check(FUZZ_SETTINGS.max_examples)
    assert first_messages > 0 and tally.codes["NOT_FOUND"] > 0 and tally.codes["FAILED_PRECONDITION"] > 0
    assert_servers_healthy(servers)


def test_fuzz_subscribe_tables(ps_channel, servers):
    """Each call writes one drawn request (or raw bytes), then a probe's, and reads its first reply
    at most, then is cancelled. The statuses a reply gives the tables' streams (TableStreamEnd) keep
    the contract too."""
    stub = ps_pb2_grpc.ParameterServerStub(ps_channel)
    raw = ps_channel.stream_stream(
        PS + "SubscribeTables", request_serializer=lambda b: b,
        response_deserializer=ps_pb2.SubscribeTablesReply.FromString,
    )
    codes = {code.value[0]: code for code in grpc.StatusCode}
    tally = Tally(STREAM_CONTRACT)
    ended: collections.Counter[str] = collections.Counter()
    first_replies = 0

    def first(stream) -> None:
        nonlocal first_replies
        try:
            reply = next(stream, None)
        finally:
            stream.cancel()
        if reply is None:
            return
        first_replies += 1
        for end in reply.ended:
            code = codes[end.code]
            ended[code.name] += 1
            assert code in CONTRACT, f"table {end.table[:40]!r} ended {code.name}: {end.message[:300]!r}"

    # After each drawn request, one for the table the fuzz leaves alone: a reply comes at once (its
    # heartbeat, or the drawn streams' ends before it), not at the deadline: 1,000 calls waited
    # 0.2 s each for a request that started nothing.
    probe = ps_pb2.SubscribeTablesRequest(subscribe=[ps_pb2.SubscribeRequest(table=CHECK.name, stream_id=1 << 62)])

    @FUZZ_SETTINGS
    @given(calls(subscribe_tables()))
    def send(call) -> None:
        if isinstance(call, Raw):
            messages = [call.data, probe.SerializeToString()]
            tally.call(lambda: first(raw(iter(messages), timeout=SUBSCRIBE_TIMEOUT)), call)
        else:
            tally.call(lambda: first(stub.SubscribeTables(iter([call, probe]), timeout=SUBSCRIBE_TIMEOUT)), call)

    send()
    print(f"SubscribeTables: {dict(tally.codes)}, tables' ends {dict(ended)}")
    tally.check(FUZZ_SETTINGS.max_examples)
    assert first_replies > 0 and tally.codes["INVALID_ARGUMENT"] > 0
    assert ended["NOT_FOUND"] > 0 and ended["FAILED_PRECONDITION"] > 0
    assert_servers_healthy(servers)


def test_fuzz_write_snapshot(cluster, ps_channel, servers):
    stub = snapshot_pb2_grpc.SnapshotControlStub(ps_channel)
    base = cluster.job.snapshot.uri
    tally = fuzz_unary(
        ps_channel, "/embps.v1.SnapshotControl/WriteSnapshot", stub.WriteSnapshot,
        write_snapshots(base, cluster.job.job),
    )
    assert tally.codes["OK"] > 0 and tally.codes["INVALID_ARGUMENT"] > 0
    assert not os.path.exists(f"{base}-elsewhere") and not os.path.exists(f"{base}/ü-表"), "written out of place"
    assert_servers_healthy(servers)


def test_fuzz_stage_snapshot(cluster, ps_channel, servers):
    """StageSnapshot (a server stream: `staged`, then the records) with the same requests."""
    stub = snapshot_pb2_grpc.SnapshotControlStub(ps_channel)
    raw = ps_channel.unary_stream(
        "/embps.v1.SnapshotControl/StageSnapshot", request_serializer=lambda b: b, response_deserializer=lambda b: b
    )
    tally = Tally(CONTRACT)
    answers = collections.Counter()
    base = cluster.job.snapshot.uri

    @FUZZ_SETTINGS
    @given(calls(write_snapshots(base, cluster.job.job)))
    def send(call) -> None:
        if isinstance(call, Raw):
            tally.call(lambda: list(raw(call.data, timeout=TIMEOUT)), call)
            return

        def stage() -> None:
            replies = list(stub.StageSnapshot(call, timeout=TIMEOUT))
            assert [bool(r.staged) for r in replies] == [True, False], replies
            answers["records"] += 1

        tally.call(stage, call)

    send()
    print(f"StageSnapshot: {dict(tally.codes)}")
    tally.check(FUZZ_SETTINGS.max_examples)
    assert tally.codes["OK"] > 0 and tally.codes["INVALID_ARGUMENT"] > 0 and answers["records"] > 0
    assert not os.path.exists(f"{base}-elsewhere") and not os.path.exists(f"{base}/ü-表"), "written out of place"
    assert_servers_healthy(servers)


def test_fuzz_commit(ps_channel, servers):
    stub = ps_pb2_grpc.ParameterServerStub(ps_channel)
    tally = fuzz_unary(
        ps_channel, PS + "Commit", stub.Commit, commits(),
        oversized=ps_pb2.CommitRequest(step=1, dense_state=OVERSIZED_KEYS, dense_format="torch.save"),
    )
    assert tally.codes["OK"] > 0 and tally.codes["INVALID_ARGUMENT"] > 0
    assert_servers_healthy(servers)


def test_fuzz_serving_lookup(serving_channel, servers):
    stub = serving_pb2_grpc.ServingStub(serving_channel)
    tally = fuzz_unary(
        serving_channel, "/embps.v1.Serving/Lookup", stub.Lookup, serving_lookups(),
        oversized=serving_pb2.ServingLookupRequest(table="user", keys=OVERSIZED_KEYS),
    )
    assert tally.codes["OK"] > 0 and tally.codes["INVALID_ARGUMENT"] > 0 and tally.codes["NOT_FOUND"] > 0
    assert_servers_healthy(servers)


def test_fuzz_serving_lookup_many(serving_channel, servers):
    stub = serving_pb2_grpc.ServingStub(serving_channel)
    tally = fuzz_unary(
        serving_channel, "/embps.v1.Serving/LookupMany", stub.LookupMany, serving_lookup_manys(),
        oversized=serving_pb2.ServingLookupManyRequest(
            lookups=[serving_pb2.ServingLookupRequest(table="user", keys=OVERSIZED_KEYS)]
        ),
    )
    assert tally.codes["OK"] > 0 and tally.codes["INVALID_ARGUMENT"] > 0 and tally.codes["NOT_FOUND"] > 0
    assert_servers_healthy(servers)


def test_fuzz_serving_status(serving_channel, servers):
    stub = serving_pb2_grpc.ServingStub(serving_channel)
    tally = fuzz_unary(
        serving_channel, "/embps.v1.Serving/Status", stub.Status, st.just(serving_pb2.ServingStatusRequest())
    )
    assert tally.codes["OK"] > 0 and tally.codes["INVALID_ARGUMENT"] > 0
    assert_servers_healthy(servers)


def test_fuzz_serving_dense_model(serving_channel, servers):
    stub = serving_pb2_grpc.ServingStub(serving_channel)
    steps = st.builds(serving_pb2.DenseModelRequest, step=uint64s)
    tally = fuzz_unary(serving_channel, "/embps.v1.Serving/DenseModel", stub.DenseModel, steps)
    # This replica serves consistency = "latest": no dense tower, whatever the step.
    assert tally.codes["NOT_FOUND"] > 0 and tally.codes["INVALID_ARGUMENT"] > 0 and not tally.codes["OK"]
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
    for path in (PS + "Subscribe", "/embps.v1.SnapshotControl/StageSnapshot"):
        stream = ps_channel.unary_stream(path, request_serializer=lambda b: b, response_deserializer=lambda b: b)
        with pytest.raises(grpc.RpcError) as raised:
            next(stream(b"\x0a", timeout=TIMEOUT))
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, path
