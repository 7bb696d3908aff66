"""`embps bench serve --overload 3` end to end: two real `embps serve` replicas of the same rows
behind the serving gate, one with max_queue and one without, each offered 3x the capacity
measured on the unbounded one (a closed loop with as many calls in flight as the overload runs).

What must hold, and why the bounds are what they are:
- the bounded replica sheds, every refusal the gate's RESOURCE_EXHAUSTED, and gives no other error;
- its answered p99 stays a small fraction of the unbounded replica's: offered 3x capacity for
  DURATION_S, the unbounded replica's backlog grows by ~2x capacity per second, so its late calls
  wait on the order of the run's length (seconds), while a bounded call waits behind at most
  max_queue calls. The unbounded side is timed from each call's scheduled time: its backlog sits
  in the generator, waiting for a place in flight, so only that time shows it. The bounded side is
  timed from each call's send (`answered_service_p99_ms`): that replica answers at once, so what
  its calls wait before they are sent is the generator's own lag, not the replica's. On a loaded
  machine that lag alone reached 865 ms p99 in the bounded run (a busy core beside the suite,
  2026-12-03: answered p99 from the schedule 882 ms, unbounded 1,742 ms). The test asks for a
  factor of 3 between the two, not an absolute figure;
- the unbounded replica sheds nothing: the difference is the bound, not the harness;
- the generator keeps its schedule against the bounded replica (it sends at least 1.5x capacity),
  and what it could not send in time (UNSENT, LATE) is its own, reported apart and never counted
  among the replica's errors. Against the unbounded replica every call it may have in flight
  waits, so its backlog sits in the generator by design (bench/overload_bench.py).

The calls are large (2,048 keys x 64 floats, a 512 KiB reply): the replica's capacity is then a
rate the generator, which shares this machine's two cores, can offer three times over. With
64-key calls the gate answers ~3,500 calls/s here and the generator cannot send 10,000 calls/s
beside it: the run then measures the generator's lag, not the replica (CI saw exactly that).
The replicas get one lookup thread and uniform keys over 200,000 rows (51 MiB, so a call's
gathers miss the caches): the replica's work per call then outweighs the generator's. With 20,000
rows, two lookup threads and Zipf keys, the generator needed about as much CPU per call as the
replica, could not offer three times capacity on two cores, and lagged 1.5 s in the bounded run
(2026-12-02); with this shape its lag stays near 0.3 s.
Without the gate (EMBPS_SERVING_GATE=0, or a build without grpc++) shedding is pinned down by
tests/serving/test_shedding.py (both no-gate transports).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import embps
from serving.gate import unavailable_reason

# The unbounded replica's backlog, and so its p99, grows with the run's length; the bounded one's
# does not. 3 s already puts the unbounded p99 at seconds (591 ms on a quiet machine, against
# 37 ms for the bounded replica's calls from their send).
DURATION_S = 3.0


def test_three_times_capacity_is_shed_and_answered_latency_stays_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("GRPC_EXPERIMENTS", raising=False)
    monkeypatch.delenv("EMBPS_SERVING_GATE", raising=False)  # the replicas are child processes: they inherit it
    if unavailable_reason() is not None:
        pytest.skip(f"no serving gate here: {unavailable_reason()}")
    out = tmp_path / "overload.json"
    argv = [
        "bench", "serve", "--overload", "3", "--max-queue", "16", "--rows", "200000", "--zipf", "0",
        "--lookup-threads", "1", "--dim", "64", "--batch", "2048", "--duration", str(DURATION_S),
        "--warmup", "0.5", "--out", str(out),
    ]
    assert embps.main(argv) == 0
    result = json.loads(out.read_text())
    assert result["bench"] == "serve_overload"
    capacity = result["capacity_qps"]
    assert capacity > 0 and abs(result["offered_rate"] - 3 * capacity) < 1e-6 * capacity
    bounded, unbounded = result["bounded"], result["unbounded"]
    for run in (bounded, unbounded):
        assert run["offered_qps"] > 2 * capacity, run  # the generator really offered overload
    assert bounded["sent_qps"] > 1.5 * capacity, bounded  # ... and sent it to the replica that answers at once

    assert bounded["shed_fraction"] > 0, bounded
    assert bounded["other_errors"] == {}, bounded
    assert sum(bounded["shed_by_code"].values()) > 0
    assert result["gate"] and result["core_refusal"] is None
    assert bounded["shed_by_code"]["CANCELLED"] == 0, bounded  # every refusal is the gate's
    assert unbounded["shed_fraction"] == 0, unbounded
    # The premise: what was offered is an overload, so the unbounded replica answers well below
    # it (a capacity that measured a round trip, not the replica, would offer what it can answer).
    # Not against the measured capacity itself: a busy worker beside it once starved that closed
    # loop (the replica at 0.64 cores; 988 calls/s), and the same replica answered 1,521 calls/s
    # of the 2,944 offered at 1.02 cores, an overload all the same.
    assert unbounded["answered_qps"] < 0.8 * unbounded["offered_qps"], (capacity, unbounded)
    assert bounded["answered_service_p99_ms"] * 3 < unbounded["answered_p99_ms"], (bounded, unbounded)
    assert bounded["answered_qps"] > 0
    cores = os.cpu_count()
    for run in (bounded, unbounded):  # CPU time over wall time: both busy, neither beyond the machine
        assert 0.05 < run["replica_cores"] <= cores * 1.05 and 0.05 < run["client_cores"] <= cores * 1.05, run


def test_overload_takes_one_lookup_thread_count() -> None:
    """--overload runs one replica setup: a list of lookup thread counts is refused, naming the flag
    (before this, --lookup-threads was dropped with --overload, and the replicas ran one per core)."""
    with pytest.raises(ValueError, match="--lookup-threads: --overload runs one replica setup"):
        embps.main(["bench", "serve", "--overload", "3", "--lookup-threads", "1,2"])


@pytest.mark.parametrize(
    "argv",
    [["--overload", "3", "--tables", "26"], ["--overload", "3", "--rate", "300"], ["--overload", "3", "--sweep"],
     ["--overload", "3", "--target", "redis"], ["--overload", "3", "--generator", "python"], ["--max-queue", "4"]],
    ids=["tables", "rate", "sweep", "target", "generator", "max-queue"],
)
def test_flags_an_overload_run_would_ignore_are_refused_by_name(argv: list[str]) -> None:
    flag = next(a for a in argv if a.startswith("--") and a != "--overload")
    with pytest.raises(ValueError, match=f"^{flag}: "):
        embps.main(["bench", "serve", *argv])
