"""`embps bench report`: each bench's JSON is recognised and rendered as one markdown row."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.report import kind_of, render, run_report

PS = {
    "config": {"shards": 2, "batch": 4096, "zipf": 1.05, "dim": 64},
    "machine": {"cpu_count": 2, "memory_bytes": 24 << 30, "python": "3.11.7"},
    "in_process": {"lookup_keys_per_s": 41e6},
    "phases": [
        {"verb": "lookup", "clients": 1, "keys_per_s": 1.5e6, "p50_ms": 2.0, "p99_ms": 5.0},
        {"verb": "lookup", "clients": 4, "keys_per_s": 3.3e6, "p50_ms": 4.6, "p99_ms": 9.8},
        {"verb": "push", "clients": 4, "keys_per_s": 2.8e6, "p50_ms": 5.0, "p99_ms": 11.0},
    ],
}
FRESHNESS = {
    "config": {"rate": 100_000, "batch": 5_000, "seconds": 20.0, "dim": 16},
    "end_to_end_seconds": {"measured_pushes": 400, "p50": 0.012, "p99": 0.031, "max": 0.05},
}


def test_kinds_are_recognised_by_field_or_shape() -> None:
    assert kind_of(PS) == "ps"
    assert kind_of(FRESHNESS) == "freshness"
    assert kind_of({"bench": "serve"}) == "serve"
    assert kind_of({"local.full_write": {}}) == "snapshot"


def test_rows_carry_the_headline_figures_in_bench_order() -> None:
    text = render([("b.json", FRESHNESS), ("a.json", PS), ("c.json", {"bench": "other", "x": {"rate": 5.0}})])
    lines = text.splitlines()
    assert lines[:2] == ["| benchmark | setup | figures | machine |", "|---|---|---|---|"]
    assert lines[2].startswith("| `embps bench ps` | 2 shards, batch 4096")
    assert "lookup 3.30 M keys/s (4 clients, p50 4.6 ms, p99 9.8 ms)" in lines[2]
    assert "push 2.80 M keys/s" in lines[2] and "2 cores, 24 GiB" in lines[2]
    assert lines[3].startswith("| `embps bench freshness`") and "p99 31.0 ms" in lines[3]
    assert lines[4].startswith("| `embps bench other`") and "x.rate 5" in lines[4]


def test_a_freshness_result_of_today_s_shape_is_rendered() -> None:
    """`embps bench freshness --out` writes 2 shards' and 2 replicas' figures; the report knew only
    the shape of the bench's first version and refused every result since ("missing
    'end_to_end_seconds'")."""
    summary = {"measured": 160, "min": -0.001, "p50": 0.011, "p99": 0.022, "max": 0.025}
    result = {
        "bench": "freshness",
        "config": {"rate": 100_000, "batch": 5_000, "seconds": 8.0, "dim": 16, "shards": 2},
        "pushes": 160,
        "per_shard_ack_to_visible_seconds": summary,
        "consistent_cut_ack_to_visible_seconds": {**summary, "p50": 0.012, "p99": 0.021},
        "replica_histogram_seconds": {"observations": 320.0, "p50": 0.007, "p99": 0.019},
        "cut_commit_to_visible_histogram_seconds": {"observations": 160.0, "p50": 0.004, "p99": 0.0097},
    }
    row = render([("f.json", result)]).splitlines()[2]
    assert row.startswith("| `embps bench freshness` | 100,000 rows/s pushed in steps of 5000, dim 16, 2 shards")
    assert "consistent cut: p50 12.0 ms, p99 21.0 ms; commit -> visible p50 4.0 ms, p99 9.7 ms" in row
    assert "polled: p50 11.0 ms, p99 22.0 ms (160 pushes)" in row


def test_an_incomplete_result_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text(json.dumps({"bench": "serve", "config": {}}))
    with pytest.raises(ValueError, match="broken.json"):
        run_report([str(path)])


def test_a_file_nested_too_deep_is_named_not_a_traceback(tmp_path: Path) -> None:
    path = tmp_path / "deep.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match=r"deep\.json: not JSON: nested too deeply"):
        run_report([str(path)])


def test_overload_result_shows_both_replicas() -> None:
    side = {"answered_qps": 900.0, "shed_fraction": 0.5, "answered_p50_ms": 2.0, "answered_p99_ms": 9.0}
    result = {
        "bench": "serve_overload",
        "config": {"rows": 20_000, "dim": 16, "batch": 64, "factor": 3.0},
        "capacity_qps": 1000.0,
        "bounded": {**side, "max_queue": 8, "shed_p99_ms": 1.5},
        "unbounded": {**side, "max_queue": 0, "shed_fraction": 0.0, "answered_p99_ms": 900.0, "shed_p99_ms": None},
    }
    (line,) = render([("o.json", result)]).splitlines()[2:]
    assert line.startswith("| `embps bench serve_overload` | 20,000 rows x 16, batch 64, 3x capacity (1,000 req/s)")
    assert "max_queue 8: answered 900 req/s, shed 50%, answered p50 2.0 ms p99 9.0 ms, shed p99 1.5 ms" in line
    assert "; max_queue 0: answered 900 req/s, shed 0%, answered p50 2.0 ms p99 900.0 ms |" in line


def test_table_result_shows_the_eviction_part() -> None:
    rates = {"lookup_rows_per_s": 9e6, "rowwise_adagrad_rows_per_s": 4e6}
    result = {
        "bench": "table",
        "config": {"rows": 1_000_000, "dim": 64, "batch": 4096},
        "hash_find_keys_per_s": 40e6,
        "uniform": rates,
        "zipf": rates,
        "eviction": {
            "dim": 64, "batch": 512, "rounds": 3, "clock": "thread CPU time",
            "40000": {"full_ms_per_push": 0.175, "full_vs_unbounded": 0.4},
            "ttl": {"rows": 1_000_000, "ttl_ms_per_push": 0.137, "ttl_vs_no_ttl": 0.63},
        },
    }
    (line,) = render([("t.json", result)]).splitlines()[2:]
    assert line.startswith("| `embps bench table` | 1,000,000 rows x 64, batch 4096, 1 thread")
    assert "; a 512-key push (rate vs the table unbounded): full LRU at 40,000 rows 0.175 ms (0.40x), " \
        "a TTL on 1,000,000 rows 0.137 ms (0.63x) |" in line


def test_a_bench_without_its_own_renderer_shows_the_figures_of_its_rows() -> None:
    """bench cut writes its figures as a list of rows: the generic renderer walked dicts only and
    left the figures cell empty."""
    cut = {
        "bench": "cut",
        "config": {"shards": 2, "steps": 3},
        "machine": {"cpu_count": 2},
        "results": [{"rows": 16, "cpu_ms_per_step": 1.25}],
    }
    row = render([("cut.json", cut)]).splitlines()[2]
    assert "results.0.rows 16" in row and "results.0.cpu_ms_per_step 1.25" in row, row
