"""`embps bench data` at a toy size: ranks run as processes, each parses only its share, and each
reports the CPU and page faults the bench's figures are built from (no timing is asserted)."""

import json

import pytest

from bench.data_bench import DataBenchConfig, run_data_bench


def test_data_bench_ranks_parse_their_shares_and_report_cpu_per_row(tmp_path):
    out = tmp_path / "data.json"
    config = DataBenchConfig(rows=4_000, batch=64, workers=(2,), repeats=1, row_group=500, vocab=300, out=str(out))
    assert run_data_bench(config) == 0
    results = json.loads(out.read_text())
    assert results["checks"]["each_rank_within_its_share"] is True
    for kind in ("tsv", "parquet"):
        runs = results[kind]
        assert [run["world_size"] for run in runs] == [2]
        for run in runs:
            assert run["rows"] == 4_000 and run["cpu_ns_per_row"] > 0 and run["median_cpu_ns_per_row"] > 0
            assert len(run["ranks"]) == 2
            for rank in run["ranks"]:
                assert rank["within_share"] and rank["parsed"] == rank["share_rows"]
                # LOCAL_WORLD_SIZE = W: each rank gets its part of the cores for Arrow's threads.
                assert rank["arrow_threads"] >= 1 and rank["cpu_seconds"] >= rank["first_batch_cpu_seconds"]
        assert runs[0]["vs_one_rank"] == 1.0 and runs[0]["cpu_per_row_vs_one_rank"] == 1.0


def test_data_bench_rejects_an_unknown_memory_pool(tmp_path):
    with pytest.raises(ValueError, match="arrow_memory_pool"):
        run_data_bench(DataBenchConfig(rows=100, memory_pool="tcmalloc", out=str(tmp_path / "x.json")))
