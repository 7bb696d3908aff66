"""`embps bench serve --overload 3` end to end: two real `embps serve` replicas of the same rows,
one with max_queue and one without, each offered 3x the capacity measured on the bounded one.

What must hold, and why the bounds are what they are:
- the bounded replica sheds (RESOURCE_EXHAUSTED from its own bound, CANCELLED from gRPC's core
  queue, which has the same bound) and gives no other error;
- its answered p99 stays a small fraction of the unbounded replica's: offered 3x capacity for
  DURATION_S, the unbounded replica's backlog grows by ~2x capacity per second, so its late calls
  wait on the order of the run's length (seconds), while a bounded call waits behind at most
  2 x max_queue calls of a few milliseconds each. The load generator shares this machine's two
  cores and its own lag counts in both runs (latency runs from each call's scheduled time), so
  the test asks for a factor of 3 between the two, not an absolute figure;
- the unbounded replica sheds nothing: the difference is the bound, not the harness;
- what the generator could not do on a busy machine (calls it never sent, or sent too late to
  have their deadline) is its own failure, reported apart and not counted as the replica's
  errors; it must still have sent well above capacity, or the run proves nothing.
Without shedding (max_queue ignored) both replicas behave alike and the ratio check fails.

Run twice: behind the serving gate (the default), where every shed call is the gate's
RESOURCE_EXHAUSTED, and without it (EMBPS_SERVING_GATE=0, as on a build without grpc++), where
gRPC's default HTTP/2 server transport refuses the core's backlog with CANCELLED.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import embps
from serving.gate import unavailable_reason

DURATION_S = 3.0


@pytest.mark.parametrize("front", ["gate", "no-gate"])
def test_three_times_capacity_is_shed_and_answered_latency_stays_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, front: str
) -> None:
    monkeypatch.delenv("GRPC_EXPERIMENTS", raising=False)
    if front == "gate":
        if unavailable_reason() is not None:
            pytest.skip(f"no serving gate here: {unavailable_reason()}")
        monkeypatch.delenv("EMBPS_SERVING_GATE", raising=False)
    else:
        monkeypatch.setenv("EMBPS_SERVING_GATE", "0")  # the replicas are child processes: they inherit it
    out = tmp_path / "overload.json"
    argv = [
        "bench", "serve", "--overload", "3", "--max-queue", "16", "--rows", "20000", "--dim", "16",
        "--batch", "32", "--duration", str(DURATION_S), "--warmup", "0.5", "--out", str(out),
    ]
    assert embps.main(argv) == 0
    result = json.loads(out.read_text())
    assert result["bench"] == "serve_overload"
    capacity = result["capacity_qps"]
    assert capacity > 0 and abs(result["offered_rate"] - 3 * capacity) < 1e-6 * capacity
    bounded, unbounded = result["bounded"], result["unbounded"]
    for run in (bounded, unbounded):
        assert run["offered_qps"] > 2 * capacity, run  # the generator really offered overload
        assert run["sent_qps"] > 1.5 * capacity, run  # ... and sent it, though it may fall behind

    assert bounded["shed_fraction"] > 0, bounded
    assert bounded["other_errors"] == {}, bounded
    assert sum(bounded["shed_by_code"].values()) > 0
    assert result["gate"] == (front == "gate")
    if front == "gate":
        assert result["core_refusal"] is None
        assert bounded["shed_by_code"]["CANCELLED"] == 0, bounded  # every refusal is the gate's
    else:
        assert result["core_refusal"] == "CANCELLED"
    assert unbounded["shed_fraction"] == 0, unbounded
    assert bounded["answered_p99_ms"] * 3 < unbounded["answered_p99_ms"], (bounded, unbounded)
    assert bounded["answered_qps"] > 0
    cores = os.cpu_count()
    for run in (bounded, unbounded):  # CPU time over wall time: both busy, neither beyond the machine
        assert 0.05 < run["replica_cores"] <= cores * 1.05 and 0.05 < run["client_cores"] <= cores * 1.05, run
