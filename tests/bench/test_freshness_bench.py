"""`embps bench freshness`: its delays computed from recorded pushes and polls, and the bench at toy
size on real shards and replicas."""

import json

import pytest

from bench.freshness_bench import FreshnessBenchConfig, _ack, _ack_delays, run_freshness_bench
from ps.client import PushResult


def test_delays_pair_each_push_with_the_first_poll_showing_its_version() -> None:
    # Shaped after a run's first pushes (2 shards, step s pushed at version s on each): the polls
    # saw version 0 on both shards long before the first push.
    shard_seen = [
        [(0, 0.000), (1, 1.549), (2, 1.587), (3, 1.630), (4, 1.695)],
        [(0, 0.000), (1, 1.549), (2, 1.587), (3, 1.636), (4, 1.688), (5, 1.740)],
    ]
    cut_seen = [(0, 0.000), (1, 1.560), (2, 1.600), (3, 1.650), (4, 1.700)]
    acks = [
        _ack(1, PushResult(versions={0: 1, 1: 1}), 1.528),
        _ack(2, PushResult(versions={0: 2, 1: 2}), 1.571),
        _ack(3, PushResult(versions={0: 3, 1: 3}), 1.622),
        # shard 1 answered first and its rows showed before the pusher took shard 0's reply
        _ack(4, PushResult(versions={0: 4, 1: 4}), 1.690),
        # the run ended before shard 0 and the cut showed step 5
        _ack(5, PushResult(versions={0: 5, 1: 5}), 1.735),
    ]
    per_shard, in_cut = _ack_delays(acks, shard_seen, cut_seen)
    assert per_shard == pytest.approx([0.021, 0.021, 0.016, 0.016, 0.008, 0.014, 0.005, -0.002, 0.005])
    assert in_cut == pytest.approx([0.032, 0.029, 0.028, 0.010])


def test_a_shard_s_version_is_its_own_not_its_number() -> None:
    """A shard whose versions run ahead of the steps (it was pushed to before the bench) is matched
    by its version: shard 1 at version 11 shows step 1."""
    shard_seen = [[(0, 0.0), (1, 1.010)], [(10, 0.0), (11, 1.012)]]
    per_shard, _ = _ack_delays([_ack(1, PushResult(versions={0: 1, 1: 11}), 1.000)], shard_seen, [(1, 1.02)])
    assert per_shard == pytest.approx([0.010, 0.012])


def test_freshness_bench_measures_every_push_on_real_shards_and_replicas(tmp_path, capsys) -> None:
    out = tmp_path / "freshness.json"
    config = FreshnessBenchConfig(rate=2_000, batch=100, seconds=1.0, rows=10_000, out=str(out))
    assert run_freshness_bench(config) == 0
    result = json.loads(out.read_text())
    assert result["pushes"] == 20
    per_shard, in_cut = result["per_shard_ack_to_visible_seconds"], result["consistent_cut_ack_to_visible_seconds"]
    assert per_shard["measured"] == 2 * result["pushes"] and in_cut["measured"] == result["pushes"]
    assert per_shard["min"] <= per_shard["p50"] <= per_shard["p99"] <= per_shard["max"]
    assert result["replica_histogram_seconds"]["observations"] > 0
    assert "2 replicas (latest, step) up" in capsys.readouterr().out
