"""`embps bench standby-join` at toy size: the new standby joins and every figure is reported."""

import json

import pytest

from bench.etcd_server import etcd_missing
from bench.standby_join_bench import StandbyJoinBenchConfig, run_standby_join_bench


@pytest.mark.skipif(etcd_missing() is not None, reason=str(etcd_missing()))
def test_standby_join_reports_the_copy_the_longest_push_and_the_memory(tmp_path, capsys):
    out = tmp_path / "join.json"
    config = StandbyJoinBenchConfig(rows=20_000, dim=8, batch=64, timeout_s=120.0, out=str(out))
    assert run_standby_join_bench(config) == 0
    result = json.loads(out.read_text())
    assert result["pushes_during"] > 0 and result["push_max_during_ms"] >= result["push_p50_before_ms"] > 0
    assert result["copy_s"] >= 0 and result["catch_up_s"] >= 0
    assert result["primary_rss_peak_mib"] >= result["primary_rss_before_mib"] > 0
    assert "longest during the join" in capsys.readouterr().out
