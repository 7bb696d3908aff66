"""payload_bytes: a table request's key and gradient bytes, counted without copying its gradients
where its keys and dims give their size (ps/shard/server.py)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from ps import wire
from ps.rpc import ps_pb2
from ps.shard.server import payload_bytes


def _keys(n: int) -> bytes:
    return wire.encode_keys(np.arange(n, dtype=np.int64))


@settings(max_examples=100, deadline=None)
@given(sizes=st.lists(st.integers(0, 40), min_size=1, max_size=6), data=st.data())
def test_a_valid_request_counts_its_bytes_as_they_are(sizes, data):
    dims = [data.draw(st.integers(1, 9)) for _ in sizes]
    offsets = np.concatenate([[0], np.cumsum(sizes)]).tolist()
    n = offsets[-1]
    grads = np.zeros(sum(s * d for s, d in zip(sizes, dims, strict=True)), np.float32).tobytes()
    tables = [f"t{i}" for i in range(len(sizes))]
    push_multi = ps_pb2.MultiPushRequest(tables=tables, dims=dims, offsets=offsets, keys=_keys(n), grads=grads)
    lookup_multi = ps_pb2.MultiLookupRequest(tables=tables, dims=dims, offsets=offsets, keys=_keys(n))
    push = ps_pb2.PushRequest(table="t", keys=_keys(sizes[0]), dim=dims[0], grads=bytes(4 * sizes[0] * dims[0]))
    lookup = ps_pb2.LookupRequest(table="t", keys=_keys(sizes[0]), dim=dims[0])
    for request in (push_multi, lookup_multi, push, lookup):
        actual = (len(request.keys), len(getattr(request, "grads", b"")))
        assert payload_bytes(request, trust_sizes=True) == actual
        assert payload_bytes(request, trust_sizes=False) == actual
    assert payload_bytes(ps_pb2.StatsRequest(), trust_sizes=True) == (0, 0)


def test_a_failed_request_counts_the_bytes_it_carried():
    short = ps_pb2.PushRequest(table="t", keys=_keys(10), dim=8, grads=bytes(12))
    assert payload_bytes(short, trust_sizes=False) == (80, 12)
    hostile = ps_pb2.MultiPushRequest(tables=["a"], dims=[4], offsets=[2**64 - 1, 0], keys=_keys(3), grads=bytes(5))
    assert payload_bytes(hostile, trust_sizes=False) == (24, 5)
    assert payload_bytes(hostile, trust_sizes=True) == (24, 0)  # an estimate: never raises, never negative


class _GradsUnread:
    """A request whose gradients must not be read (each read of a upb bytes field copies it)."""

    def __init__(self, request) -> None:
        self._request = request

    def __getattr__(self, name: str):
        if name == "grads":
            raise AssertionError("the gradients were read")
        return getattr(self._request, name)


def test_the_gradients_of_an_answered_call_are_not_read():
    push_multi = ps_pb2.MultiPushRequest(
        tables=["a", "b"], dims=[2, 3], offsets=[0, 1, 3], keys=_keys(3), grads=bytes(32)
    )
    push = ps_pb2.PushRequest(table="t", keys=_keys(2), dim=4, grads=bytes(32))
    assert payload_bytes(_GradsUnread(push_multi), trust_sizes=True) == (24, 32)
    assert payload_bytes(_GradsUnread(push), trust_sizes=True) == (16, 32)
