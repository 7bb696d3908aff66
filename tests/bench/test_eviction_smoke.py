"""The eviction part of `embps bench table` at toy size: both kinds of full table (victims from
every row, and from a sample) are timed against an unbounded twin, and they evict as they push;
the TTL case times a large table's sweep against the same table without a TTL."""

import pytest

from bench.eviction_part import EvictionPartConfig, run_eviction_part
from ps.table.embedding_table import EXACT_SCAN_ROWS


def test_eviction_part_times_full_tables_of_both_kinds_against_unbounded_ones():
    capacities = (2_000, EXACT_SCAN_ROWS + 1_000)
    config = EvictionPartConfig(capacities=capacities, dim=8, batch=256, pushes=5, zipf=0.0, ttl_rows=70_000)
    result = run_eviction_part(config)
    assert result["batch"] == 256 and result["rounds"] >= 1
    for capacity, kind in zip(capacities, ("all rows", "a sample"), strict=True):
        entry = result[str(capacity)]
        assert entry["rows_picked_among"] == kind
        assert entry["full_pushes_per_s"] > 0 and entry["unbounded_pushes_per_s"] > 0
        assert entry["full_vs_unbounded"] == entry["full_pushes_per_s"] / entry["unbounded_pushes_per_s"]
        assert entry["evicted_per_push"] > 0, "every timed push of the full table should make room"
    ttl = result["ttl"]
    assert ttl["rows"] == 70_000 and ttl["ttl_ms_per_push"] > 0 and ttl["no_ttl_ms_per_push"] > 0
    assert ttl["ttl_vs_no_ttl"] == pytest.approx(ttl["no_ttl_ms_per_push"] / ttl["ttl_ms_per_push"])
