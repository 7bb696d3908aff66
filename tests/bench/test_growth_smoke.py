"""The growth part of `embps bench table` at toy size (the bench runs it at 30M keys): it runs end
to end and splits each slow call into the map's work and the machine's pauses."""

from bench.table_growth import FIND_ROUNDS, GrowthConfig, run_growth


def test_growth_part_reports_wall_cpu_and_off_queue_times():
    config = GrowthConfig(rows=150_000, dim=2, batch=8192, read_batch=512, push_batch=512, grow_seconds=0.2,
                          checkpoints=(50_000, 150_000), fresh_keys=300_000)
    result = run_growth(config)
    for checkpoint in ("to_50000", "to_150000"):
        fill = result["fill"][checkpoint]
        for stats in fill.values():
            assert stats["off_queue"]["max_s"] <= stats["max_s"]
            assert 0 < stats["slowest_call_cpu_s"] <= stats["max_s"]
            assert stats["slowest_call_entries_rehashed"] <= stats["max_entries_rehashed_by_one_call"]
    # The single-array map moves every entry in one call; the sub-maps a bounded share.
    moved = {name: s["max_entries_rehashed_by_one_call"] for name, s in result["fill"]["to_150000"].items()}
    assert moved["flat"] > 4 * moved["sub_maps"], moved
    find = result["find"]
    assert len(find["sub_maps_vs_flat_rounds"]) == FIND_ROUNDS and find["sub_maps_keys_per_s"] > 0
    for name, reader in result["reader_under_grower"].items():
        assert reader["grower_calls"] > 0 and reader["reader"]["calls"] > 0, name
        assert reader["reader_off_queue"]["max_s"] <= reader["reader"]["max_s"]
