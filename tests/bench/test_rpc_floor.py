"""bench/rpc_floor.py: an empty gRPC call measured against a real grpc.aio server process."""

from __future__ import annotations

import pytest

from bench import rpc_floor


def test_the_floor_counts_both_sides_and_stops_its_server(monkeypatch):
    started = []
    popen = rpc_floor.subprocess.Popen

    def recording_popen(*args, **kwargs):
        started.append(popen(*args, **kwargs))
        return started[-1]

    monkeypatch.setattr(rpc_floor.subprocess, "Popen", recording_popen)
    floor = rpc_floor.measure_rpc_floor(calls=300)
    assert floor.calls_per_s > 0 and floor.client_cpu_ms > 0
    # The server's CPU is read from /proc in 10 ms ticks: 300 calls of a real server take several.
    assert floor.server_cpu_ms > 0
    assert len(started) == 1 and started[0].poll() is not None, "the server process outlived the measurement"


def test_no_calls_is_refused():
    with pytest.raises(ValueError, match="calls: must be > 0"):
        rpc_floor.measure_rpc_floor(calls=0)
