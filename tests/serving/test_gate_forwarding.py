"""The serving gate (csrc/serving_gate.cpp) in this process, in front of a plain gRPC server on
a Unix socket as the replica's own server is: a forwarded call's headers reach its caller, and
the calls the gate ends itself are counted in embps_serving_requests_total beside the ones it
answers, with an admitted count that never goes down."""

from __future__ import annotations

import threading
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client import generate_latest

from ps.process.metrics import LATENCY_BUCKETS
from ps.rpc import serving_pb2
from ps.sharding import ShardMap
from ps.table.config import TableConfig
from serving.gate import ServingGate, native_lookups, unavailable_reason
from serving.metrics import ServingMetrics
from serving.shedding import LOOKUP_METHODS
from serving.store import TableReplica
from tests.helpers.stalled_client import StalledCall
from tests.helpers.waiting import wait_until

pytestmark = pytest.mark.skipif(unavailable_reason() is not None, reason=f"no serving gate: {unavailable_reason()}")
LOOKUP = "/embps.v1.Serving/Lookup"


HOLD = threading.Event()


class Upstream(grpc.GenericRpcHandler):
    def service(self, details):
        if details.method == "/t.T/Unary":
            def unary(request: bytes, context: grpc.ServicerContext) -> bytes:
                context.send_initial_metadata((("x-initial", "yes"),))
                context.set_trailing_metadata((("x-trailing", "yes"),))
                return request

            return grpc.unary_unary_rpc_method_handler(unary)
        if details.method == "/t.T/Hold":  # answers once HOLD is set
            def hold(request: bytes, context: grpc.ServicerContext) -> bytes:
                HOLD.wait(30)
                return request

            return grpc.unary_unary_rpc_method_handler(hold)
        if details.method == "/t.T/Stream":
            def stream(request: bytes, context: grpc.ServicerContext):
                context.send_initial_metadata((("x-initial", "stream"),))
                yield from (b"0", b"1")

            return grpc.unary_stream_rpc_method_handler(stream)
        return None


@pytest.fixture
def gate(tmp_path: Path):
    upstream = grpc.server(futures.ThreadPoolExecutor(4), handlers=[Upstream()])
    upstream.add_insecure_port(f"unix:{tmp_path}/up.sock")
    upstream.start()
    table = TableReplica(TableConfig("user", dim=4), ShardMap.uniform(1))
    table.shards[0].upsert(np.arange(8, dtype=np.int64), np.ones((8, 4), np.float32))
    native = native_lookups([table.native], LATENCY_BUCKETS, 2.0, False)
    gate = ServingGate("127.0.0.1:0", f"unix:{tmp_path}/up.sock", LOOKUP_METHODS, native, 1, 64 << 20, None)
    metrics = ServingMetrics()
    metrics.add_native_calls(native)
    metrics.native_calls.gate = gate
    try:
        yield gate, metrics
    finally:
        gate.shutdown(1.0)
        upstream.stop(None)


def test_a_forwarded_call_s_headers_reach_its_caller(gate):
    """The upstream's initial metadata was dropped: the caller got empty headers."""
    server, _ = gate
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        reply, call = channel.unary_unary("/t.T/Unary").with_call(b"ping", timeout=10)
        assert reply == b"ping"
        assert ("x-initial", "yes") in tuple(call.initial_metadata())
        assert ("x-trailing", "yes") in tuple(call.trailing_metadata())
        stream = channel.unary_stream("/t.T/Stream")(b"", timeout=10)
        assert list(stream) == [b"0", b"1"]
        assert ("x-initial", "stream") in tuple(stream.initial_metadata())


def test_calls_the_gate_ends_itself_are_counted_and_admitted_never_goes_down(gate):
    """A Lookup refused by the bound (max_queue = 1, a caller holding the place: its request read,
    its reply never taken) and one that ends without a request message were in no requests_total
    series; and the admitted count was taken on arrival, then taken back when the byte bound shed
    it. (A call without a request holds no place: tests/serving/test_stalled_readers.py. It is
    started here with nothing admitted: one that came while the holder was admitted was refused
    unread, RESOURCE_EXHAUSTED, a race this test once lost.)"""
    server, metrics = gate
    request = serving_pb2.ServingLookupRequest(table="user", keys=np.arange(4, dtype="<i8").tobytes())

    def nothing():
        return
        yield  # a generator that sends nothing

    address = f"127.0.0.1:{server.port}"
    with grpc.insecure_channel(address) as channel:
        lookup = channel.unary_unary(LOOKUP, request_serializer=lambda r: r.SerializeToString())
        holder = StalledCall(address, LOOKUP, request.SerializeToString())
        try:
            wait_until(lambda: server.stats().in_flight == 1, "the holder's place (taken as its request arrives)")
            with pytest.raises(grpc.RpcError) as shed:
                lookup(request, timeout=10)
            assert shed.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert server.stats().admitted == 1
        finally:
            holder.close()
        wait_until(lambda: server.stats().in_flight == 0, "the holder's place back once its connection closed")
        assert lookup(request, timeout=10) is not None
        with pytest.raises(grpc.RpcError) as empty:
            channel.stream_unary(LOOKUP)(nothing(), timeout=30)
        assert empty.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert server.stats().admitted == 2
    assert sorted(server.ended()) == [("Lookup", 3, 1), ("Lookup", 8, 1)]
    text = generate_latest(metrics.registry).decode()
    for code in ("RESOURCE_EXHAUSTED", "INVALID_ARGUMENT"):
        assert f'embps_serving_requests_total{{code="{code}",method="Lookup",table=""}} 1.0' in text, text
    assert 'embps_serving_requests_total{code="OK",method="Lookup",table="user"} 2.0' in text


def test_made_up_methods_refused_during_the_drain_share_one_series(gate):
    """While the gate drains (shutting down, a forwarded call still running), every new call is
    refused UNAVAILABLE before any token check, and each was counted under its own method name:
    a caller's made-up names were a new embps_serving_requests_total series each, without bound."""
    server, metrics = gate
    HOLD.clear()
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        held = channel.unary_unary("/t.T/Hold").future(b"x", timeout=30)
        wait_until(lambda: server.stats().forwarded == 1, "the held call forwarded")
        draining = threading.Thread(target=server.shutdown, args=(20.0,))
        draining.start()
        try:
            def refused(method: str) -> bool:
                try:
                    channel.unary_unary(method)(b"", timeout=5)
                except grpc.RpcError as exc:
                    return exc.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in (exc.details() or "")
                return False

            wait_until(lambda: refused("/evil.E/M0"), "the drain's refusals")
            assert all(refused(f"/evil.E/M{i}") for i in range(1, 40))
            assert refused(LOOKUP)
            ended = {(method, code): count for method, code, count in server.ended()}
            assert ended[("other", 14)] >= 40 and ended[("Lookup", 14)] == 1, ended
            assert not any(method.startswith("M") for method, _ in ended), ended
            text = generate_latest(metrics.registry).decode()
            assert "method=\"M1\"" not in text and 'method="other"' in text
        finally:
            HOLD.set()
            draining.join(30)
    assert held.result(timeout=30) == b"x"

