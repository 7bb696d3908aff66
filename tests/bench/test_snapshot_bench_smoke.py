"""`embps bench snapshot` at toy size, rows spread over several tables: every phase is measured on
every table's rows, and the restored tables are checked against the live ones inside the bench."""

import json

import pytest

from bench.snapshot_bench import SnapshotBenchConfig, run_snapshot_bench


def test_snapshot_bench_over_several_tables(tmp_path, capsys):
    out = tmp_path / "snapshot.json"
    config = SnapshotBenchConfig(rows=300, dim=4, tables=3, touched=0.1, targets=("local",), out=str(out))
    assert run_snapshot_bench(config) == 0
    result = json.loads(out.read_text())
    phases = ("full_write", "full_read", "incremental_write", "incremental_read", "restore_chain")
    for phase in phases:
        assert result[f"local.{phase}"]["seconds"] > 0
    assert result["local.full_write"]["rows"] == 300
    assert result["local.incremental_write"]["rows"] == 3 * 10  # 10% of each table's 100 rows
    assert result["local.restore_chain"]["rows"] == 300
    assert "in 3 tables" in capsys.readouterr().out


def test_snapshot_bench_refuses_fewer_rows_than_tables():
    with pytest.raises(ValueError, match="rows: must be >= tables"):
        SnapshotBenchConfig(rows=2, tables=3).validate()
