"""Clients that send a Lookup and never take the reply, against a real `embps serve` replica with its
serving gate: they hold an admitted place (and its bytes) only until client_stall_seconds, then the
gate cancels their calls, and the replica answers everyone else again. Clients that send only a
Lookup's headers, or half its request, hold no place at all (a Lookup is admitted once its request
has arrived), and are cancelled after client_stall_seconds too. A forwarded call (Status) whose
reply is never taken is cancelled the same way.

Before, 16 clients asking 100,000 keys each and never reading (25.6 MB replies, over
max_queue_bytes together) made the replica answer every other Lookup RESOURCE_EXHAUSTED for as long
as they stayed connected, and so did 2 clients that sent half a request, or only the headers, to a
replica with max_queue = 2 (until client_stall_seconds; then they could open 2 more)."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import grpc
import pytest

from bench.serve_targets import TABLE, EmbpsServer, bench_keys
from ps import wire
from ps.rpc import serving_pb2, serving_pb2_grpc
from serving.config import load_serve_config
from serving.gate import unavailable_reason
from tests.helpers.stalled_client import StalledCall
from tests.helpers.waiting import wait_until

MAX_QUEUE = 2
ROWS = 1_000
DIM = 16
STALL_SECONDS = 1.0
MAX_CONCURRENT_STREAMS = 0x3  # the HTTP/2 SETTINGS id


@pytest.fixture
def replica(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("EMBPS_SERVING_GATE", raising=False)
    if unavailable_reason() is not None:
        pytest.skip(f"no serving gate here: {unavailable_reason()}")
    server = EmbpsServer.start(ROWS, DIM, tmp_path / "replica", max_queue=MAX_QUEUE, client_stall_seconds=STALL_SECONDS)
    try:
        yield server
    finally:
        server.stop()


def _stalled_count(server: EmbpsServer) -> float:
    port = load_serve_config(server.log_path.parent / "serve.toml").metrics_port
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    for line in text.splitlines():
        if line.startswith("embps_serving_stalled_calls_total "):
            return float(line.split()[1])
    raise AssertionError("embps_serving_stalled_calls_total not in the scrape")


def test_lookups_whose_clients_never_take_the_reply_give_their_places_back(replica):
    keys = bench_keys(ROWS)[:64]
    request = serving_pb2.ServingLookupRequest(table=TABLE, keys=wire.encode_keys(keys), dim=DIM)
    stalled = [StalledCall(replica.address, "/embps.v1.Serving/Lookup", request.SerializeToString())
               for _ in range(MAX_QUEUE)]  # fmt: skip
    try:
        with grpc.insecure_channel(replica.address) as channel:
            stub = serving_pb2_grpc.ServingStub(channel)

            def answered() -> bool:
                try:
                    reply = stub.Lookup(request, timeout=5)
                except grpc.RpcError as exc:
                    assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc
                    return False
                assert list(reply.found) == [1] * keys.shape[0]
                return True

            # The stalled calls hold both places: a Lookup is shed while they do.
            wait_until(lambda: not answered(), "the stalled calls to fill the queue")
            wait_until(answered, "the replica to answer again once the stalled calls are cancelled")
        assert _stalled_count(replica) == MAX_QUEUE
        for call in stalled:
            wait_until(call.reset.is_set, "the stalled call's stream to be reset")
    finally:
        for call in stalled:
            call.close()


@pytest.mark.parametrize("headers_only", [True, False], ids=["headers-only", "request-half-sent"])
def test_lookups_whose_request_has_not_arrived_hold_no_place(replica, headers_only):
    """Twice max_queue Lookup calls that send their headers (and maybe half the request) and no
    more: each honest Lookup meanwhile is answered, not shed, and the gate still resets them after
    client_stall_seconds. Before, a call took its place as it started: max_queue such calls had
    every other Lookup refused RESOURCE_EXHAUSTED until they were reset, and the client could
    open more."""
    keys = bench_keys(ROWS)[:64]
    request = serving_pb2.ServingLookupRequest(table=TABLE, keys=wire.encode_keys(keys), dim=DIM)
    before = _stalled_count(replica)
    stalled = [
        StalledCall(replica.address, "/embps.v1.Serving/Lookup", request.SerializeToString(), whole=False,
                    headers_only=headers_only)
        for _ in range(2 * MAX_QUEUE)
    ]  # fmt: skip
    try:
        with grpc.insecure_channel(replica.address) as channel:
            stub = serving_pb2_grpc.ServingStub(channel)
            answered = 0

            def all_reset_after_a_lookup() -> bool:
                """One honest Lookup, which must be answered; then whether every stalled call is reset."""
                nonlocal answered
                reset = all(call.reset.is_set() for call in stalled)  # before the Lookup: it ran while they were open
                reply = stub.Lookup(request, timeout=5)
                assert list(reply.found) == [1] * keys.shape[0]
                answered += 1
                return reset

            wait_until(all_reset_after_a_lookup, "the calls without a request to be reset")
        assert answered > 1
        assert _stalled_count(replica) == before + 2 * MAX_QUEUE
    finally:
        for call in stalled:
            call.close()


def test_a_forwarded_call_whose_reply_is_never_taken_is_reset(replica):
    """Status goes through the gate to the replica's own server; a caller that never takes its reply
    would hold both calls for good."""
    before = _stalled_count(replica)
    request = serving_pb2.ServingStatusRequest().SerializeToString()
    call = StalledCall(replica.address, "/embps.v1.Serving/Status", request)
    try:
        wait_until(call.reset.is_set, "the stalled Status call's stream to be reset")
        assert _stalled_count(replica) == before + 1
    finally:
        call.close()


def test_a_forwarded_call_that_sends_only_its_headers_is_reset_and_connections_hold_few_streams(replica):
    """A forwarded call (Status, health, reflection) was watched only while its reply was written:
    one that sent its headers and nothing more held itself and its upstream call (~30 KB) for as
    long as its connection lived, and HTTP/2 let a connection open any number (a review: 20,000
    on one connection, +670 MiB, and health checks timed out). Now its first message is due
    within client_stall_seconds, as a Lookup's, and a connection holds at most 1,024 streams."""
    before = _stalled_count(replica)
    call = StalledCall(replica.address, "/embps.v1.Serving/Status", b"", headers_only=True)
    try:
        wait_until(call.reset.is_set, "the headers-only Status call's stream to be reset")
        assert _stalled_count(replica) == before + 1
        assert call.settings.get(MAX_CONCURRENT_STREAMS) == 1024  # twice max_queue (2), at least 1,024
    finally:
        call.close()
