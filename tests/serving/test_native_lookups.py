"""The serving gate's native Lookups (csrc/serving_lookup.h), called in-process: the same values,
found flags, codes and messages as the Python path (TableReplica.lookup, ServingServicer), for
every storage dtype, reply dtype and default; the token check; a resync's swapped shard."""

from __future__ import annotations

import re

import numpy as np
import pytest

from ps.process.metrics import LATENCY_BUCKETS
from ps.rpc import ps_pb2, serving_pb2
from ps.sharding import ShardMap
from ps.table.config import Initializer, TableConfig
from serving.config import DefaultRow, StorageDType
from serving.gate import native_lookups
from serving.server import shown_name
from serving.store import ShardRows, TableReplica

pytest.importorskip("_embps_gate", reason="embps was built without grpc++: no serving gate module")

LOOKUP = "/embps.v1.Serving/Lookup"
MANY = "/embps.v1.Serving/LookupMany"
OK, INVALID_ARGUMENT, NOT_FOUND, RESOURCE_EXHAUSTED, UNAUTHENTICATED = 0, 3, 5, 8, 16


def make_table(storage: StorageDType, default: DefaultRow) -> TableReplica:
    config = TableConfig("user", dim=5, initializer=Initializer.NORMAL, init_scale=0.7, seed=3)
    table = TableReplica(config, ShardMap.uniform(3), default, storage)
    keys = np.arange(0, 400, 2, dtype=np.int64)
    values = np.random.default_rng(5).standard_normal((keys.shape[0], 5)).astype(np.float32) * 3
    owners = table.shard_map.shard_of(keys)
    for s in range(3):
        table.shards[s].upsert(keys[owners == s], values[owners == s])
        table.shards[s].version = 10 + s
    return table


@pytest.mark.parametrize("storage", [StorageDType.FLOAT32, StorageDType.FLOAT16, StorageDType.INT8])
@pytest.mark.parametrize("default", [DefaultRow.ZEROS, DefaultRow.INIT])
@pytest.mark.parametrize("dtype", [ps_pb2.DTYPE_UNSPECIFIED, ps_pb2.FLOAT32, ps_pb2.FLOAT16])
def test_native_replies_match_the_python_path_bit_for_bit(storage, default, dtype):
    table = make_table(storage, default)
    native = native_lookups([table.native], LATENCY_BUCKETS, 2.0, False)
    keys = np.concatenate([np.arange(-5, 50, dtype=np.int64), [1 << 62, -(1 << 63), 398]])
    request = serving_pb2.ServingLookupRequest(table="user", keys=keys.astype("<i8").tobytes(), dtype=dtype)
    code, message, payload = native(LOOKUP, b"", request.SerializeToString())
    assert (code, message) == (OK, "")
    reply = serving_pb2.ServingLookupResponse.FromString(payload)
    reply_dtype = np.float16 if dtype == ps_pb2.FLOAT16 else np.float32
    values, found = table.lookup(keys, reply_dtype)
    assert reply.dim == 5 and reply.dtype == (ps_pb2.FLOAT16 if dtype == ps_pb2.FLOAT16 else ps_pb2.FLOAT32)
    assert reply.values == values.astype(values.dtype.newbyteorder("<")).tobytes()
    assert reply.found == found.view(np.uint8).tobytes()
    assert [(s.shard, s.version, s.stale) for s in reply.shards] == [(0, 10, False), (1, 11, False), (2, 12, False)]


def test_errors_have_the_python_paths_codes_and_messages():
    table = make_table(StorageDType.FLOAT32, DefaultRow.ZEROS)
    native = native_lookups([table.native], LATENCY_BUCKETS, 2.0, False)

    def call(method: str, data: bytes) -> tuple[int, str]:
        code, message, _ = native(method, b"", data)
        return code, message

    lookup = serving_pb2.ServingLookupRequest
    assert call(LOOKUP, lookup(table="nope").SerializeToString()) == (
        NOT_FOUND, "table 'nope' is not served here; tables: user"
    )
    assert call(LOOKUP, lookup(table="user", dim=4).SerializeToString()) == (
        INVALID_ARGUMENT, "dim: table 'user' has dim 5, the request says 4"
    )
    assert call(LOOKUP, lookup(table="user", dtype=9).SerializeToString()) == (
        INVALID_ARGUMENT, "dtype: unsupported dtype 9; supported: FLOAT32, FLOAT16"
    )
    assert call(LOOKUP, lookup(table="user", keys=b"12345").SerializeToString()) == (
        INVALID_ARGUMENT, "keys: byte length 5 is not a multiple of 8; keys travel as little-endian int64"
    )
    many = serving_pb2.ServingLookupManyRequest(lookups=[lookup(table="user"), lookup(table="x")])
    code, message = call(MANY, many.SerializeToString())
    assert code == NOT_FOUND and message.startswith("lookups[1]: table 'x'"), message
    for garbage in (b"\x0a", b"\xff\xff\xff", b"\x0a\x05ab", b"\x12\xff\xff\xff\xff\x0f", b"\x0b", b"\x0a\x02\xc3\x28"):
        code, message = call(LOOKUP, garbage)
        assert code == INVALID_ARGUMENT and "not a valid message for /embps.v1.Serving/Lookup" in message, garbage
        assert call(MANY, b"\x0a\x02" + garbage[:2])[0] == INVALID_ARGUMENT
    # Unknown fields are skipped, as protobuf does; an empty LookupMany is answered empty.
    extra = lookup(table="user", keys=np.arange(2, dtype="<i8").tobytes()).SerializeToString() + b"\x28\x01\x35abcd"
    assert call(LOOKUP, extra)[0] == OK
    assert native(MANY, b"", b"") == (OK, "", b"")
    calls = {(t, m, c): n for t, m, c, n, _cumulative, _sum in native.metrics()["calls"]}
    assert calls[("unknown", "Lookup", NOT_FOUND)] == 1 and calls[("", "Lookup", INVALID_ARGUMENT)] == 6
    # A long unknown name is cut in the message, as the Python path cuts it: whole and escaped, it
    # passed gRPC's 16 KiB bound on a client's trailers (RESOURCE_EXHAUSTED instead of NOT_FOUND).
    for name in ("\u00e9" * 3000, "\x01" * 5000, "t" * 64 + "\u00e9"):
        code, message = call(LOOKUP, lookup(table=name).SerializeToString())
        assert (code, message) == (NOT_FOUND, f"table {shown_name(name)} is not served here; tables: user")
        assert len(message) < 400 and (len(name) <= 64 or message.endswith("bytes) is not served here; tables: user"))


def test_tokens_are_checked_and_replaced():
    table = make_table(StorageDType.FLOAT32, DefaultRow.ZEROS)
    native = native_lookups([table.native], LATENCY_BUCKETS, 2.0, True)
    request = serving_pb2.ServingLookupRequest(table="user").SerializeToString()
    native.set_tokens([b"first-token-0123456789"])
    assert native(LOOKUP, b"Bearer first-token-0123456789", request)[0] == OK
    assert native(LOOKUP, b"bearer  first-token-0123456789 ", request)[0] == OK
    for header in (b"", b"Bearer", b"Bearer ", b"Basic first-token-0123456789", b"Bearer first-token-012345678"):
        assert native(LOOKUP, header, request)[:2] == (
            UNAUTHENTICATED, "missing or unknown bearer token (authorization metadata)"
        ), header
    native.set_tokens([b"second-token-0123456789"])
    assert native(LOOKUP, b"Bearer first-token-0123456789", request)[0] == UNAUTHENTICATED
    assert native(LOOKUP, b"Bearer second-token-0123456789", request)[0] == OK


def test_a_replaced_shard_is_served_whole():
    table = make_table(StorageDType.FLOAT32, DefaultRow.ZEROS)
    native = native_lookups([table.native], LATENCY_BUCKETS, 2.0, False)
    keys = np.arange(0, 400, 2, dtype=np.int64)
    owners = table.shard_map.shard_of(keys)
    fresh = ShardRows(5, version=99)
    fresh.upsert(keys[owners == 1][:3], np.full((3, 5), 7.0, np.float32))
    table.replace_shard(1, fresh)
    request = serving_pb2.ServingLookupRequest(table="user", keys=keys.astype("<i8").tobytes())
    reply = serving_pb2.ServingLookupResponse.FromString(native(LOOKUP, b"", request.SerializeToString())[2])
    found = np.frombuffer(reply.found, np.uint8).astype(bool)
    values = np.frombuffer(reply.values, "<f4").reshape(-1, 5)
    assert found[owners == 1].sum() == 3 and (values[owners == 1][:3] == 7.0).all()
    assert found[owners != 1].all() and reply.shards[1].version == 99


def test_a_reply_past_the_message_limit_is_refused_before_it_is_built():
    """A Lookup whose reply would pass message_limit_bytes is RESOURCE_EXHAUSTED with the PS's
    "split the request", before any row is gathered (1M keys used to build a 65 MB reply that
    gRPC's send then refused with its own message, and the replica kept the memory)."""
    table = make_table(StorageDType.FLOAT32, DefaultRow.ZEROS)
    limit = 4000  # the reply to n keys of dim 5: 20 n bytes of values, n found flags, framing
    native = native_lookups([table.native], LATENCY_BUCKETS, 2.0, False, limit)
    fits = np.arange(150, dtype="<i8").tobytes()  # ~3.3 KB
    too_many = np.arange(200, dtype="<i8").tobytes()  # ~4.4 KB
    request = serving_pb2.ServingLookupRequest(table="user", keys=fits)
    assert native(LOOKUP, b"", request.SerializeToString())[0] == OK
    request.keys = too_many
    code, message, payload = native(LOOKUP, b"", request.SerializeToString())
    assert (code, payload) == (RESOURCE_EXHAUSTED, b"")
    assert message.startswith("keys: the reply would be about ") and message.endswith(
        f"over message_limit_bytes {limit}; split the request"
    )
    many = serving_pb2.ServingLookupManyRequest(
        lookups=[serving_pb2.ServingLookupRequest(table="user", keys=fits)] * 2
    )
    code, message, _ = native(MANY, b"", many.SerializeToString())  # each fits, both do not
    assert code == RESOURCE_EXHAUSTED and "split the request" in message


def test_the_python_path_s_reply_size_check_counts_each_result_s_shard_entries():
    """Without the gate (EMBPS_SERVING_GATE=0, or no grpc++), the size check left out the version
    entry per shard each result carries: on an 8-shard job a LookupMany of many one-key lookups
    passed it, and the reply built (1.78 MB for a 1 MiB limit) was refused by gRPC's send."""
    from ps.errors import CapacityError
    from ps.table.config import TableConfig
    from serving.config import Consistency, ServeConfig
    from serving.metrics import ServingMetrics
    from serving.server import Replica, ServingServicer
    from serving.store import TableReplica
    from tests.helpers.processes import make_job

    job = make_job([TableConfig("user", dim=4)], num_shards=8, message_limit_bytes=1 << 20)
    config = ServeConfig(job=job, listen="127.0.0.1:1", metrics_port=0, tables=("user",),
                         consistency=Consistency.LATEST)
    tables = {"user": TableReplica(job.table("user"), job.shard_map)}
    for s, rows in enumerate(tables["user"].shards):
        rows.version, rows.incarnation = 123456 + s, 0xF123456789ABCDEF - s
    servicer = ServingServicer(Replica(config, tables), ServingMetrics())

    def many(n: int) -> serving_pb2.ServingLookupManyRequest:
        return serving_pb2.ServingLookupManyRequest(lookups=[
            serving_pb2.ServingLookupRequest(table="user", keys=np.array([k], "<i8").tobytes()) for k in range(n)
        ])

    with pytest.raises(CapacityError, match=r"lookups\[\d+\]: keys: the reply would be about \d+ bytes, over "
                       "message_limit_bytes 1048576; split the request"):
        servicer.answer_lookup_many(many(10_000))
    fits = many(2_000)
    assert servicer.answer_lookup_many(fits).ByteSize() <= job.message_limit_bytes


def test_both_front_ends_check_a_reply_s_size_alike():
    """The Python path checked the whole call's size first, with its own estimate: a reply near the
    limit was answered by the gate and refused here, a lookup of a wrong dim (or an unknown table)
    beyond the limit got RESOURCE_EXHAUSTED here and its own code from the gate, and a LookupMany's
    refusal lacked its `lookups[i]: ` (found by a review of the two). Now each lookup is checked as
    the gate checks it, once its own checks passed, at the bytes of the reply built before it."""
    from ps.errors import CapacityError, UnknownTableError
    from ps.table.config import TableConfig
    from serving.config import Consistency, ServeConfig
    from serving.metrics import ServingMetrics
    from serving.server import Replica, ServingServicer
    from serving.store import TableReplica
    from tests.helpers.processes import make_job

    limit = 1 << 20
    job = make_job([TableConfig("user", dim=4)], num_shards=1, message_limit_bytes=limit)
    config = ServeConfig(job=job, listen="127.0.0.1:1", metrics_port=0, tables=("user",),
                         consistency=Consistency.LATEST)
    table = TableReplica(job.table("user"), job.shard_map)
    servicer = ServingServicer(Replica(config, {"user": table}), ServingMetrics())
    gate = native_lookups([table.native], LATENCY_BUCKETS, 2.0, False, limit)

    def keys(n: int) -> bytes:
        return np.arange(n, dtype="<i8").tobytes()

    # The largest n the gate answers: values 16 n, found flags n, 80 and a shard's 48 within the limit.
    n = (limit - 80 - 48) // 17
    for count, fits in ((n, True), (n + 1, False)):
        request = serving_pb2.ServingLookupRequest(table="user", keys=keys(count))
        code, message, _ = gate(LOOKUP, b"", request.SerializeToString())
        assert (code == 0) == fits, (count, message)
        if fits:
            servicer.answer_lookup(request)
        else:
            with pytest.raises(CapacityError, match=re.escape(message)):
                servicer.answer_lookup(request)
    wrong_dim = serving_pb2.ServingLookupRequest(table="user", keys=keys(n + 1), dim=9)
    with pytest.raises(ValueError, match="dim: table 'user' has dim 4"):
        servicer.answer_lookup(wrong_dim)
    unknown = serving_pb2.ServingLookupManyRequest(lookups=[
        serving_pb2.ServingLookupRequest(table="nope", keys=keys(8)),
        serving_pb2.ServingLookupRequest(table="user", keys=keys(n + 1)),
    ])
    with pytest.raises(UnknownTableError, match=r"lookups\[0\]: table 'nope'"):
        servicer.answer_lookup_many(unknown)
    half = serving_pb2.ServingLookupRequest(table="user", keys=keys(n // 2 + 8))
    halves = serving_pb2.ServingLookupManyRequest(lookups=[half, half])
    code, message, _ = gate(MANY, b"", halves.SerializeToString())
    assert message.startswith("lookups[1]: keys: the reply would be about")
    with pytest.raises(CapacityError, match=r"lookups\[1\]: keys: the reply would be about"):
        servicer.answer_lookup_many(halves)


def test_unknown_groups_are_skipped_as_protobuf_skips_them():
    """A group (wire type 3, deprecated but valid protobuf) among a request's unknown fields was
    refused INVALID_ARGUMENT by the gate and skipped by the Python path (found by a review of the
    two). Now the gate skips it to its end tag; what protobuf refuses, the gate refuses."""
    from google.protobuf.message import DecodeError

    table = make_table(StorageDType.FLOAT32, DefaultRow.ZEROS)
    native = native_lookups([table.native], LATENCY_BUCKETS, 2.0, False)
    plain = serving_pb2.ServingLookupRequest(table="user", keys=np.arange(4, dtype="<i8").tobytes()).SerializeToString()
    answer = native(LOOKUP, b"", plain)
    assert answer[0] == OK
    # field 3 = (9 << 3) | 3 = 0x4b starts group 9, 0x4c ends it; inside: field 1 varint, a nested group 10
    groups = {
        "empty": b"\x4b\x4c",
        "nested": b"\x4b\x08\x05\x53\x10\x01\x54\x4c",
        "inner field 0": b"\x4b\x00\x05\x4c",
        "mismatched end": b"\x4b\x54",
        "end without start": b"\x4c",
        "unterminated": b"\x4b\x08\x05",
    }
    for name, group in groups.items():
        data = plain + group
        try:
            serving_pb2.ServingLookupRequest.FromString(data)
            python_ok = True
        except DecodeError:
            python_ok = False
        code, message, payload = native(LOOKUP, b"", data)
        assert (code == OK) == python_ok, (name, code, message)
        if python_ok:
            assert payload == answer[2], name
        else:
            assert code == INVALID_ARGUMENT, (name, code, message)


def test_a_lookup_many_of_more_lookups_than_the_bound_is_refused_by_both_front_ends():
    """32M empty lookups (61 MiB, under the message limit) were each parsed into ~48 bytes before
    any was answered: three such calls grew a replica by 2.7 GB, past max_queue_bytes (which counts
    the requests' wire bytes). One call holds at most MAX_BATCH_PARTS lookups, the gate refusing
    the next as it parses it; the Python path the same."""
    import asyncio

    from ps import wire
    from ps.table.config import TableConfig
    from serving.config import Consistency, ServeConfig
    from serving.metrics import ServingMetrics
    from serving.server import Replica, ServingServicer
    from tests.helpers.processes import make_job

    job = make_job([TableConfig("user", dim=4)], num_shards=1)
    config = ServeConfig(job=job, listen="127.0.0.1:1", metrics_port=0, tables=("user",),
                         consistency=Consistency.LATEST)
    table = TableReplica(job.table("user"), job.shard_map)
    servicer = ServingServicer(Replica(config, {"user": table}), ServingMetrics())
    gate = native_lookups([table.native], LATENCY_BUCKETS, 2.0, False)
    one = serving_pb2.ServingLookupRequest(table="user", keys=np.arange(2, dtype="<i8").tobytes())
    bound = wire.MAX_BATCH_PARTS
    at_bound = serving_pb2.ServingLookupManyRequest(lookups=[one] * bound)
    code, _message, reply = gate(MANY, b"", at_bound.SerializeToString())
    assert code == OK and len(serving_pb2.ServingLookupManyResponse.FromString(reply).results) == bound
    past = b"\x0a\x00" * (bound + 1) + b"\x0a\x02\xff\xff"  # empty lookups, then bytes that do not parse
    code, message, _ = gate(MANY, b"", past)
    assert (code, message) == (
        INVALID_ARGUMENT, f"lookups: at most {bound} lookups in one LookupMany, got more; split the call"
    )
    calls = {(t, m, c): n for t, m, c, n, _cumulative, _sum in gate.metrics()["calls"]}
    assert calls[("", "LookupMany", INVALID_ARGUMENT)] == 1
    many = serving_pb2.ServingLookupManyRequest(lookups=[one] * (bound + 1))
    with pytest.raises(ValueError, match=f"^lookups: at most {bound} lookups in one LookupMany, got more"):
        asyncio.run(ServingServicer.LookupMany.__wrapped__(servicer, many))
