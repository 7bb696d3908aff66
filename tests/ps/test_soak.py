"""A real shard process under a few thousand pushes (capacity + LRU + count admission with a
small max_pending + TTL), without and then with snapshots, then followed as a serving replica
follows it (a committed and a live Subscribe stream, a Commit after each push): a push costs the
same at the end of a phase as at its start, and the shard's memory stays flat. `embps bench soak
--minutes N` runs the same for as long as asked.

Cost is the shard's own CPU time per push (per-thread scheduler counters), not the wall time of
the call: a busy machine stretches the wall time of some pushes, not the work each one does.
"""

from __future__ import annotations

from bench.soak_bench import SoakConfig, run_soak


def test_push_cost_and_memory_stay_flat_with_and_without_snapshots_and_followed():
    config = SoakConfig()
    records = run_soak(config)
    assert list(records) == ["off", "on", "follow"]
    for name, record in records.items():
        s = record.summary()
        measured = config.pushes + config.warmup + config.pushes // 10  # the last tenth beside a young twin
        assert s["pushes"] == measured
        assert s["cpu_ratio"] <= config.max_growth, f"phase {name}: push cost grew: {s}"
        assert s["rss_ratio"] <= config.max_rss_growth, f"phase {name}: memory grew: {s}"
    assert records["on"].summary()["snapshots"] == measured // config.snapshot_every
