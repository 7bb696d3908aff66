"""`embps bench cut` at toy size: every step's cut is published, and the report has each table count."""

import json

from bench.cut_bench import CutBenchConfig, run_cut_bench


def test_cut_bench_publishes_every_step_and_reports_each_table_count(tmp_path, capsys):
    out = tmp_path / "cut.json"
    config = CutBenchConfig(tables=(2, 8), steps=4, changed=0.5, rows=8, repeat=1, out=str(out))
    assert run_cut_bench(config) == 0
    results = json.loads(out.read_text())["results"]
    assert [r["tables"] for r in results] == [2, 8]
    assert all(r["cpu_s_per_step"] > 0 for r in results)
    assert results[0]["per_stream_vs_smallest"] == 1.0
    assert "vs 2 tables" in capsys.readouterr().out
