"""The serving gate (serving/gate.py) in a real `embps serve` replica: calls that end early (the
caller's deadline, the caller cancelling) release their place in the Lookup bound, so a replica
that saw many of them still admits up to max_queue; the gate's counts say so exactly. A Lookup
read while others hold more than max_queue_bytes is shed, and those bytes are given back. And the
gate's private directories of killed replicas do not pile up."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import h2.config
import h2.connection
import h2.events
import h2.settings
import numpy as np
import pytest

from bench.serve_targets import TABLE, EmbpsServer, bench_keys
from ps import wire
from ps.rpc import serving_pb2, serving_pb2_grpc
from serving.config import load_serve_config
from serving.gate import unavailable_reason

MAX_QUEUE = 2
MAX_QUEUE_BYTES = 2 << 20  # one slow Lookup's request (1.2 MB) fits, a second one beside it does not
ROWS = 20_000
DIM = 16
SLOW_KEYS = 150_000  # ~10-40 ms of server work per call here
_LIMIT = 64 << 20


@pytest.fixture
def replica(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    if unavailable_reason() is not None:
        pytest.skip(f"no serving gate here: {unavailable_reason()}")
    monkeypatch.delenv("EMBPS_SERVING_GATE", raising=False)
    server = EmbpsServer.start(ROWS, DIM, tmp_path / "replica", max_queue=MAX_QUEUE, max_queue_bytes=MAX_QUEUE_BYTES)
    try:
        yield server
    finally:
        server.stop()


def _metrics(server: EmbpsServer) -> dict[str, float]:
    port = load_serve_config(server.log_path.parent / "serve.toml").metrics_port
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(embps_serving_\w+) (\S+)$", text, re.MULTILINE)}


def test_calls_ended_by_their_caller_release_their_place_in_the_bound(replica) -> None:
    keys = np.resize(bench_keys(ROWS), SLOW_KEYS)
    slow = serving_pb2.ServingLookupRequest(table=TABLE, keys=wire.encode_keys(keys), dim=DIM)
    small = serving_pb2.ServingLookupRequest(table=TABLE, keys=wire.encode_keys(keys[:8]), dim=DIM)
    options = [("grpc.max_receive_message_length", _LIMIT), ("grpc.max_send_message_length", _LIMIT)]
    with grpc.insecure_channel(replica.address, options=options) as channel:
        stub = serving_pb2_grpc.ServingStub(channel)
        ended_early = 0
        for _ in range(20):  # deadlines shorter than the work: the caller gives up mid-call
            try:
                stub.Lookup(slow, timeout=0.003)
            except grpc.RpcError as exc:
                assert exc.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED), exc
                ended_early += 1
        for _ in range(10):  # cancelled by the caller after it was sent
            future = stub.Lookup.future(slow, timeout=30)
            time.sleep(0.002)
            future.cancel()
        assert ended_early > 0
        # Whatever is still running upstream finishes; then the gate holds nothing.
        deadline = time.monotonic() + 10
        while _metrics(replica)["embps_serving_lookup_queue"] != 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        before = _metrics(replica)
        assert before["embps_serving_lookup_queue"] == 0, before
        # MAX_QUEUE concurrent calls are all admitted again: no place leaked.
        futures = [stub.Lookup.future(small, timeout=30) for _ in range(MAX_QUEUE)]
        replies = [f.result() for f in futures]
        counted = _metrics(replica)
    assert all(len(r.found) == 8 and r.found.count(0) == 0 for r in replies)
    after = counted
    assert after["embps_serving_lookup_queue"] == 0
    assert after["embps_serving_shed_lookups_total"] == before["embps_serving_shed_lookups_total"]
    assert after["embps_serving_admitted_lookups_total"] == before["embps_serving_admitted_lookups_total"] + MAX_QUEUE
    # Calls that ended early did reach the gate and were admitted (a caller may also give up
    # before its call leaves the channel: those the gate never sees), each counted once.
    assert before["embps_serving_admitted_lookups_total"] > 0, before
    total = after["embps_serving_admitted_lookups_total"] + after["embps_serving_shed_lookups_total"]
    assert total <= 20 + 10 + MAX_QUEUE, after


class _LookupNeverRead:
    """One Lookup sent over a raw HTTP/2 connection that gives the replica a receive window of 0:
    the replica reads the request and answers, but can send none of the reply's bytes, so the call
    holds its place and its bytes in the gate until this connection closes. (A grpc client reads
    every reply at once, so two of its calls overlap in the gate only by timing.)"""

    def __init__(self, address: str, request: bytes) -> None:
        host, port = address.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=10)
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.conn.initiate_connection()
        self.conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
        stream = self.conn.get_next_available_stream_id()
        headers = [
            (":method", "POST"), (":scheme", "http"), (":path", "/embps.v1.Serving/Lookup"),
            (":authority", address), ("content-type", "application/grpc"), ("te", "trailers"),
        ]  # fmt: skip
        self.conn.send_headers(stream, headers)
        body = b"\x00" + len(request).to_bytes(4, "big") + request  # gRPC's message framing
        sent = 0
        while sent < len(body):  # as fast as the replica's flow-control window lets it
            room = min(self.conn.local_flow_control_window(stream), self.conn.max_outbound_frame_size)
            if room == 0:
                self._receive()
                continue
            chunk = body[sent : sent + room]
            sent += len(chunk)
            self.conn.send_data(stream, chunk, end_stream=sent == len(body))
            self.sock.sendall(self.conn.data_to_send())

    def _receive(self) -> None:
        data = self.sock.recv(1 << 16)
        assert data, "the replica closed the connection while the request was being sent"
        for event in self.conn.receive_data(data):
            assert not isinstance(event, h2.events.StreamReset | h2.events.StreamEnded), event
        self.sock.sendall(self.conn.data_to_send())

    def close(self) -> None:
        self.sock.close()


def _wait_for(replica: EmbpsServer, condition, what: str) -> dict[str, float]:
    """The replica's metrics once `condition(metrics)` holds; fails after 10 s naming `what`."""
    deadline = time.monotonic() + 10
    while not condition(metrics := _metrics(replica)):
        assert time.monotonic() < deadline, f"{what}: {metrics}"
        time.sleep(0.01)
    return metrics


def test_lookups_read_while_others_hold_max_queue_bytes_are_shed(replica) -> None:
    """The byte bound: a Lookup read while the admitted ones hold more than max_queue_bytes
    (request, then reply, until sent) is answered RESOURCE_EXHAUSTED, whatever its own size; once
    the holder ends, the bytes are released and a Lookup of the same size is answered."""
    keys = np.resize(bench_keys(ROWS), SLOW_KEYS)
    slow = serving_pb2.ServingLookupRequest(table=TABLE, keys=wire.encode_keys(keys), dim=DIM)
    small = serving_pb2.ServingLookupRequest(table=TABLE, keys=wire.encode_keys(keys[:8]), dim=DIM)
    options = [("grpc.max_receive_message_length", _LIMIT), ("grpc.max_send_message_length", _LIMIT)]
    holder = _LookupNeverRead(replica.address, slow.SerializeToString())
    try:
        # Its 1.2 MB request, then its 9.6 MB reply, which cannot leave: more than the 2 MiB bound.
        held = _wait_for(
            replica, lambda m: m["embps_serving_lookup_queue_bytes"] > MAX_QUEUE_BYTES, "the held reply"
        )
        assert held["embps_serving_lookup_queue"] == 1, held
        with grpc.insecure_channel(replica.address, options=options) as channel:
            stub = serving_pb2_grpc.ServingStub(channel)
            for request in (slow, small):
                with pytest.raises(grpc.RpcError) as shed:
                    stub.Lookup(request, timeout=30)
                assert shed.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, shed.value
                assert "max_queue_bytes" in shed.value.details()
            counted = _metrics(replica)
            assert counted["embps_serving_shed_lookups_total"] == held["embps_serving_shed_lookups_total"] + 2
            holder.close()  # the caller leaves: its call ends and gives back its place and bytes
            _wait_for(
                replica,
                lambda m: m["embps_serving_lookup_queue"] == 0 and m["embps_serving_lookup_queue_bytes"] == 0,
                "the bytes given back",
            )
            assert len(stub.Lookup(slow, timeout=30).found) == SLOW_KEYS
        assert _metrics(replica)["embps_serving_lookup_queue_bytes"] == 0
    finally:
        holder.close()


BIG_KEYS = 600_000  # a 4.8 MB request and a 39 MB reply: tens of ms or more in one lookup thread


def _lookup_seconds(server: EmbpsServer) -> float:
    """The replica's server time in Lookups of TABLE so far (its lookup histogram's sum)."""
    port = load_serve_config(server.log_path.parent / "serve.toml").metrics_port
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    match = re.search(rf'^embps_serving_lookup_duration_seconds_sum{{table="{TABLE}"}} (\S+)$', text, re.MULTILINE)
    assert match is not None, "no Lookup time in the scrape"
    return float(match.group(1))


def test_a_call_beyond_the_bound_is_refused_while_every_lookup_thread_answers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One lookup thread answers a large Lookup that fills the bound (max_queue 1): Lookups sent
    meanwhile are refused at once, by the gate's thread beside the lookup threads, not when that
    answer ends. With as many threads as lookup threads, nobody read them until it did."""
    if unavailable_reason() is not None:
        pytest.skip(f"no serving gate here: {unavailable_reason()}")
    monkeypatch.delenv("EMBPS_SERVING_GATE", raising=False)
    server = EmbpsServer.start(ROWS, DIM, tmp_path / "replica", max_queue=1, max_queue_bytes=0, lookup_threads=1)
    try:
        keys = np.resize(bench_keys(ROWS), BIG_KEYS)
        big = serving_pb2.ServingLookupRequest(table=TABLE, keys=wire.encode_keys(keys), dim=DIM)
        probe = serving_pb2.ServingLookupRequest(table=TABLE, keys=wire.encode_keys(keys[:8]), dim=DIM)
        options = [("grpc.max_receive_message_length", _LIMIT), ("grpc.max_send_message_length", _LIMIT)]
        with (
            grpc.insecure_channel(server.address, options=options) as big_channel,
            grpc.insecure_channel(server.address) as probe_channel,
        ):
            for channel in (big_channel, probe_channel):  # connected before: no handshake in the times
                grpc.channel_ready_future(channel).result(timeout=10)
            probe_stub = serving_pb2_grpc.ServingStub(probe_channel)
            answer = serving_pb2_grpc.ServingStub(big_channel).Lookup.future(big, timeout=60)
            # The big Lookup holds the one place from its headers to its reply: probes from then on.
            _wait_for(server, lambda m: m["embps_serving_lookup_queue"] == 1 or answer.done(), "the big Lookup")
            probes: list[tuple[float, grpc.StatusCode]] = []  # (seconds, code) of each probe, in order
            while not answer.done():
                sent = time.monotonic()
                try:
                    probe_stub.Lookup(probe, timeout=30)
                    code = grpc.StatusCode.OK
                except grpc.RpcError as exc:
                    assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc
                    code = exc.code()
                probes.append((time.monotonic() - sent, code))
            reply = answer.result()
        assert len(reply.found) == BIG_KEYS and reply.found.count(0) == 0
        answering = _lookup_seconds(server)  # the big Lookup's, and any probe answered after its reply left
        assert probes, "no probe was sent while the big Lookup held the bound"
        # The first probe, sent once the big Lookup held the place, is the one a thread-bound gate
        # would leave unread until that answer ends: refused at once, it takes less than half of it.
        # Only the first is timed: the slowest of a few hundred quick refusals measures how the two
        # cores were shared at that moment (one took 45 ms of an 88 ms answer in a CI run), not the gate.
        first_seconds, first_code = probes[0]
        assert first_code == grpc.StatusCode.RESOURCE_EXHAUSTED, probes[:3]
        assert first_seconds < answering / 2, (first_seconds, answering, len(probes))
    finally:
        server.stop()


def test_a_new_replica_removes_the_directories_of_killed_ones() -> None:
    """A replica killed with SIGKILL leaves its gate directory (socket, checked TLS copy); the next
    one removes it, and never one whose replica still runs."""
    from serving.gate import GateDirectory

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    first = GateDirectory()
    orphan = first.path.with_name(f"embps-serving-{dead.pid}-killed")
    orphan.mkdir(mode=0o700)
    (orphan / "identity.pem").write_bytes(b"a key copy")
    try:
        second = GateDirectory()
        try:
            assert not orphan.exists()
            assert first.path.is_dir()  # this process runs: its directory stays
            assert second.path != first.path and second.path.stat().st_mode & 0o777 == 0o700
        finally:
            second.close()
    finally:
        first.close()
        if orphan.exists():
            shutil.rmtree(orphan)
    assert not first.path.exists()
