"""ps/bulk_messages.py: messages whose bulk bytes fields are written once and read in place must
mean, byte for byte, what protobuf's own encoding and parsing mean: for any bytes, `parse` fails
where FromString fails and otherwise reads the same fields."""

from __future__ import annotations

import numpy as np
import pytest
from google.protobuf.message import DecodeError
from hypothesis import given
from hypothesis import strategies as st

from ps import bulk_messages
from ps.rpc import ps_pb2, replication_pb2, serving_pb2

PUSH_BULK = ("keys", "grads", "counts")


def _full(parsed: bulk_messages.BulkMessage, cls) -> object:
    """The protobuf message `parsed` stands for: its other fields and its bulk fields' bytes."""
    message = cls()
    message.CopyFrom(parsed.message)
    for name in PUSH_BULK if cls is ps_pb2.MultiPushRequest else ("values",):
        data = bytes(getattr(parsed, name))
        if data:
            setattr(message, name, data)
    return message


def _outcome(parse):
    try:
        return parse()
    except DecodeError:
        return DecodeError


push_requests = st.builds(
    ps_pb2.MultiPushRequest,
    tables=st.lists(st.text(max_size=8), max_size=4),
    dims=st.lists(st.integers(0, 2**32 - 1), max_size=4),
    offsets=st.lists(st.integers(0, 2**64 - 1), max_size=5),
    keys=st.binary(max_size=64),
    grads=st.binary(max_size=300),
    dtype=st.sampled_from([ps_pb2.DTYPE_UNSPECIFIED, ps_pb2.FLOAT32, ps_pb2.FLOAT16]),
    push_id=st.builds(ps_pb2.PushId, client_id=st.text(max_size=8), sequence=st.integers(0, 2**64 - 1)),
    counts=st.binary(max_size=64),
)


@given(push_requests, st.booleans())
def test_encode_writes_what_protobuf_reads(request: ps_pb2.MultiPushRequest, with_step: bool) -> None:
    header = ps_pb2.MultiPushRequest()
    header.CopyFrom(request)
    for name in PUSH_BULK:
        header.ClearField(name)
    if with_step:
        header.step = request.step = 7
    data = bulk_messages.encode(header, keys=request.keys, grads=request.grads, counts=request.counts)
    assert ps_pb2.MultiPushRequest.FromString(data) == request


@given(push_requests)
def test_parse_reads_what_protobuf_wrote(request: ps_pb2.MultiPushRequest) -> None:
    data = request.SerializeToString()
    parsed = bulk_messages.parse(ps_pb2.MultiPushRequest, data, PUSH_BULK)
    assert _full(parsed, ps_pb2.MultiPushRequest) == request
    assert parsed.SerializeToString() is data
    assert parsed.tables == request.tables and parsed.push_id == request.push_id
    for name in PUSH_BULK:
        view = getattr(parsed, name)
        assert isinstance(view, memoryview) and view.readonly and bytes(view) == getattr(request, name)


def _damaged(valid: bytes, data) -> tuple[bytes, ...]:
    """A valid message cut, spliced with junk, junk alone, and followed by junk."""
    cut = data.draw(st.integers(0, len(valid)))
    junk = data.draw(st.binary(max_size=40))
    at = data.draw(st.integers(0, len(valid)))
    return valid[:cut], valid[:at] + junk + valid[at:], junk, valid + junk


@given(push_requests, st.data())
def test_any_bytes_parse_as_protobuf_parses_them(request: ps_pb2.MultiPushRequest, data) -> None:
    """Valid messages cut, spliced with junk, or junk alone: the same error or the same fields."""
    for raw in _damaged(request.SerializeToString(), data):
        mine = _outcome(lambda r=raw: _full(bulk_messages.parse(ps_pb2.MultiPushRequest, r, PUSH_BULK),
                                            ps_pb2.MultiPushRequest))
        theirs = _outcome(lambda r=raw: ps_pb2.MultiPushRequest.FromString(r))
        assert mine == theirs, raw


def test_a_repeated_bulk_field_reads_the_last_and_other_wire_types_are_not_it() -> None:
    first = ps_pb2.MultiPushRequest(keys=b"a" * 8, tables=["t"]).SerializeToString()
    second = ps_pb2.MultiPushRequest(keys=b"b" * 8, dims=[3]).SerializeToString()
    as_varint = bytes([4 << 3 | 0, 5])  # field 4 (keys) as a varint: an unknown field to protobuf
    for raw in (first + second, first + as_varint, as_varint + first):
        parsed = bulk_messages.parse(ps_pb2.MultiPushRequest, raw, PUSH_BULK)
        assert _full(parsed, ps_pb2.MultiPushRequest) == ps_pb2.MultiPushRequest.FromString(raw)


def test_many_fields_go_to_protobuf_whole() -> None:
    """Past the scan's bound (a message of many small fields) protobuf parses it all, the same."""
    request = ps_pb2.MultiPushRequest(tables=[str(i) for i in range(5000)], keys=b"k" * 16, grads=b"g" * 4)
    data = request.SerializeToString()
    parsed = bulk_messages.parse(ps_pb2.MultiPushRequest, data, PUSH_BULK)
    assert _full(parsed, ps_pb2.MultiPushRequest) == request
    assert bytes(parsed.keys) == request.keys


def test_a_forwarded_push_travels_inside_a_replicate_request_without_a_copy() -> None:
    keys = np.arange(1000, dtype=np.int64)
    grads = np.ones((1000, 16), dtype=np.float32)
    push = bulk_messages.encode(
        ps_pb2.MultiPushRequest(tables=["t"], dims=[16], offsets=[0, 1000]), keys=keys, grads=grads
    )
    inner = bulk_messages.parse(ps_pb2.MultiPushRequest, push, PUSH_BULK)
    wrapped = bulk_messages.encode(
        replication_pb2.ReplicateRequest(epoch=3, sequence=9, method="PushMulti"), request=inner.SerializeToString()
    )
    message = bulk_messages.parse(replication_pb2.ReplicateRequest, wrapped, ("request",))
    assert message.epoch == 3 and message.method == "PushMulti"
    forwarded = bulk_messages.parse(ps_pb2.MultiPushRequest, message.request, PUSH_BULK)
    assert np.array_equal(np.frombuffer(forwarded.grads, np.float32).reshape(1000, 16), grads)
    assert np.frombuffer(forwarded.keys, np.int64)[-1] == 999
    assert forwarded.grads.obj is wrapped  # a view into the bytes that arrived: never copied


def test_encode_refuses_a_field_that_is_not_singular_bytes() -> None:
    with pytest.raises(TypeError, match="tables: not a singular bytes field"):
        bulk_messages.encode(ps_pb2.MultiPushRequest(), tables=b"x")
    with pytest.raises(TypeError, match="nope: not a singular bytes field"):
        bulk_messages.encode(ps_pb2.MultiPushRequest(), nope=b"x")


SERVING_BULK = ("values", "found")

lookup_replies = st.builds(
    serving_pb2.ServingLookupResponse,
    values=st.binary(max_size=64),
    dim=st.integers(0, 2**32 - 1),
    dtype=st.sampled_from([ps_pb2.DTYPE_UNSPECIFIED, ps_pb2.FLOAT32, ps_pb2.FLOAT16]),
    found=st.binary(max_size=8),
    model_version=st.integers(0, 2**64 - 1),
)
many_replies = st.builds(
    serving_pb2.ServingLookupManyResponse,
    results=st.lists(lookup_replies, max_size=4),
    model_version=st.integers(0, 2**64 - 1),
)


def _many(parsed: tuple) -> serving_pb2.ServingLookupManyResponse:
    """The ServingLookupManyResponse parse_repeated's two parts stand for."""
    message, items = parsed
    whole = serving_pb2.ServingLookupManyResponse()
    whole.CopyFrom(message)
    for item in items:
        result = whole.results.add()
        result.CopyFrom(item.message)
        for name in SERVING_BULK:
            data = bytes(getattr(item, name))
            if data:
                setattr(result, name, data)
    return whole


def _parse_many(raw):
    return bulk_messages.parse_repeated(
        serving_pb2.ServingLookupManyResponse, raw, "results", serving_pb2.ServingLookupResponse, SERVING_BULK
    )


@given(many_replies)
def test_parse_repeated_reads_each_item_where_it_arrived(reply: serving_pb2.ServingLookupManyResponse) -> None:
    data = reply.SerializeToString()
    message, items = _parse_many(data)
    assert _many((message, items)) == reply
    assert len(message.results) == 0 and message.model_version == reply.model_version
    for item, result in zip(items, reply.results, strict=True):
        for name in SERVING_BULK:
            view = getattr(item, name)
            assert isinstance(view, memoryview) and bytes(view) == getattr(result, name)
            if view.nbytes:
                assert view.obj is data  # not copied


@given(many_replies, st.data())
def test_any_bytes_parse_repeated_as_protobuf_parses_them(reply: serving_pb2.ServingLookupManyResponse, data) -> None:
    """Valid replies cut, spliced with junk, or junk alone: the same error or the same fields."""
    for raw in _damaged(reply.SerializeToString(), data):
        mine = _outcome(lambda r=raw: _many(_parse_many(r)))
        theirs = _outcome(lambda r=raw: serving_pb2.ServingLookupManyResponse.FromString(r))
        assert mine == theirs, raw


def test_parse_repeated_keeps_another_wire_type_of_the_field_as_protobuf_does() -> None:
    """The field as a varint is an unknown field to protobuf, not an item; past the scan's bound
    (many small fields) protobuf parses the whole, the same."""
    item = serving_pb2.ServingLookupResponse(values=b"v" * 8, dim=2).SerializeToString()
    one = bytes([1 << 3 | 2, len(item)]) + item
    as_varint = bytes([1 << 3 | 0, 5])
    many = serving_pb2.ServingLookupManyResponse(
        results=[serving_pb2.ServingLookupResponse(dim=i) for i in range(5000)], model_version=4
    ).SerializeToString()
    for raw in (one + as_varint + one, as_varint, many):
        message, items = _parse_many(raw)
        assert _many((message, items)) == serving_pb2.ServingLookupManyResponse.FromString(raw)
