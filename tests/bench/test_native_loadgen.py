"""The native load generator (csrc/load_gen.h) against real servers on loopback: its schedule
(sent no earlier than due, never at or after the hard end), and the code of each call: OK, the
server's status, or the generator's own verdict on the reply (MISSING_ROWS, BAD_REPLY). The
end-to-end runs (embps, Redis, several tables) are in test_serve_smoke.py."""

from __future__ import annotations

import time
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest

from bench.loadgen import OK, LoadSpec, closed_loop_native, native_module
from bench.serve_targets import EmbpsTarget, RedisServer, bench_keys
from ps import wire
from ps.rpc import serving_pb2

pytestmark = pytest.mark.skipif(native_module() is None, reason="_embps_loadgen is not built (no grpc++)")

DIM = 4


def _schedule(n: int, gap_s: float = 0.002) -> tuple[np.ndarray, float]:
    return np.arange(n) * gap_s, time.monotonic() + 0.05


def _reply(request: bytes, context: grpc.ServicerContext) -> bytes:
    """A Lookup answered by the request's first key: 1 rows found, 2 a row missing, 3 values of the
    wrong length, 4 RESOURCE_EXHAUSTED."""
    lookup = serving_pb2.ServingLookupRequest.FromString(request)
    keys = wire.decode_keys(lookup.keys)
    n, kind = keys.shape[0], int(keys[0])
    if kind == 4:
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "full")
    found = bytes([0 if kind == 2 and i == n - 1 else 1 for i in range(n)])
    values = bytes(4 * DIM * n - (4 if kind == 3 else 0))
    return serving_pb2.ServingLookupResponse(values=values, dim=DIM, found=found).SerializeToString()


@pytest.fixture()
def lookup_server():
    server = grpc.server(futures.ThreadPoolExecutor(4))
    handler = grpc.method_handlers_generic_handler(
        "embps.v1.Serving", {"Lookup": grpc.unary_unary_rpc_method_handler(_reply)}
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(0)


def test_grpc_codes_come_from_the_status_and_the_reply_check(lookup_server: str) -> None:
    batches = [np.array([kind, 10, 11], dtype=np.int64) for kind in (1, 2, 3, 4)]
    caller = EmbpsTarget(lookup_server, "emb", DIM).connect(batches)
    try:
        times, t0 = _schedule(8)
        sent, done, codes = caller.run_native(times, t0, t0 + 30.0, 10.0, 2)
    finally:
        caller.close()
    assert codes == ["OK", "MISSING_ROWS", "BAD_REPLY", "RESOURCE_EXHAUSTED"] * 2
    assert np.all(sent >= t0 + times) and np.all(done >= sent)


def test_a_native_closed_loop_runs_schedule_after_schedule_until_its_window_ends(lookup_server: str) -> None:
    """Schedules of `chunk` calls follow each other (memory stays bounded at any rate): the calls
    come back in send order, each answered, and the loop goes on past the measurement window's end."""
    spec = LoadSpec(rate=None, duration_s=0.4, warmup_s=0.1, clients=1, concurrency=4, rows=100)
    caller = EmbpsTarget(lookup_server, "emb", DIM).connect([np.array([1, 10, 11], dtype=np.int64)])
    try:
        t0 = time.monotonic() + 0.05
        window_end = t0 + spec.warmup_s + spec.duration_s
        sent, done, codes = closed_loop_native(caller, spec, t0, window_end + spec.drain_s, chunk=20)
        returned = time.monotonic()
    finally:
        caller.close()
    assert len(sent) > 3 * 20, len(sent)  # several schedules
    assert codes == [OK] * len(sent)
    assert np.all(sent >= t0) and np.all(np.diff(sent) >= 0) and np.all(done >= sent)
    assert returned >= window_end


def test_redis_rows_checked_and_nothing_sent_after_the_hard_end(tmp_path: Path) -> None:
    server = RedisServer.start(rows=100, dim=DIM, workdir=tmp_path)
    try:
        held, absent = bench_keys(100)[:5], bench_keys(200)[150:155]  # rows 100.. are not loaded
        caller = server.target.connect([held, absent])
        try:
            times, t0 = _schedule(4)
            times = np.append(times, 60.0)  # due after the hard end: never sent
            sent, done, codes = caller.run_native(times, t0, t0 + 3.0, 10.0, 1)
        finally:
            caller.close()
    finally:
        server.stop()
    assert codes == ["OK", "MISSING_ROWS", "OK", "MISSING_ROWS", None]
    assert np.isnan(sent[4]) and np.isnan(done[4])
    assert np.all(sent[:4] >= t0 + times[:4]) and np.all(done[:4] >= sent[:4])
