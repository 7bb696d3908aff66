"""`embps bench follow` at toy size: each mode measured on real shards and a real replica, the
replica caught up at the end, the ratio against no replica reported."""

import json

from bench.follow_bench import MODES, FollowBenchConfig, run_follow_bench


def test_follow_bench_measures_each_mode_against_no_replica(tmp_path, capsys):
    out = tmp_path / "follow.json"
    assert run_follow_bench(FollowBenchConfig(tables=(3,), keys=30, seconds=0.5, out=str(out))) == 0
    results = json.loads(out.read_text())["results"]
    assert [(r["tables"], r["mode"]) for r in results] == [(3, mode) for mode in MODES]
    assert all(r["steps"] > 0 and min(r["shard_cpu_ms_per_step"]) > 0 for r in results)
    assert results[0]["shards_vs_none"] == 1.0 and results[0]["replica_cpu_ms_per_step"] == 0.0
    assert all(r["replica_cpu_ms_per_step"] > 0 for r in results[1:])
    assert "of no replica" in capsys.readouterr().out
