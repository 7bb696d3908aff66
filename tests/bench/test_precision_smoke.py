"""The precision parts of the benches at toy sizes: they run end to end and report what the issue
bounds (bytes per row of int8 and float16 rows against float32 at dim 64), and the quality bench
trains and evaluates each storage on a Criteo-format file it writes from the synthetic job."""

import json

from bench.precision_bench import PrecisionBenchConfig, run_precision_bench
from bench.table_bench import TableBenchConfig, run_precision_part


def test_table_bench_precision_part_reports_bytes_and_rates_per_storage():
    result = run_precision_part(TableBenchConfig(dim=64, batch=128, batches=2, precision_rows=5_000))
    assert result["int8"]["bytes_per_row_vs_float32"] <= 0.40
    assert result["float16"]["bytes_per_row_vs_float32"] <= 0.60
    for storage in ("float32", "float16", "int8"):
        for stream in ("uniform", "zipf"):
            rates = result[storage][stream]
            assert rates["lookup_rows_per_s"] > 0 and rates["rowwise_adagrad_rows_per_s"] > 0


def test_precision_bench_trains_each_storage_on_a_criteo_format_file(tmp_path):
    out = tmp_path / "precision.json"
    config = PrecisionBenchConfig(steps=3, batch=64, dim=16, num_keys=200, eval_batches=1, data="criteo", out=str(out))
    assert run_precision_bench(config) == 0
    results = json.loads(out.read_text())
    for dataset in ("criteo",):
        runs = results[dataset]["runs"]
        assert set(runs) == {"float32", "float16", "int8"}
        assert all(0.0 <= r["auc"] <= 1.0 and r["steps"] == 3 for r in runs.values())
        assert runs["float32"]["auc_loss_vs_float32"] == 0.0
        assert runs["int8"]["bytes_per_row"] < runs["float16"]["bytes_per_row"] < runs["float32"]["bytes_per_row"]
