"""`embps bench catchup` at toy size: both phases are measured and every figure is reported."""

import json

from bench.catchup_bench import CatchupBenchConfig, run_catchup_bench
from bench.report import render


def test_catchup_reports_push_latency_alone_and_beside_subscribers(tmp_path, capsys):
    out = tmp_path / "catchup.json"
    config = CatchupBenchConfig(subscribers=1, behind=20, seconds=1.0, alone_seconds=0.5, out=str(out))
    assert run_catchup_bench(config) == 0
    result = json.loads(out.read_text())
    for phase in ("alone", "beside_subscribers"):
        figures = result[phase]
        assert figures["pushes"] > 0 and figures["max_ms"] >= figures["p99_ms"] >= figures["p50_ms"] > 0
    assert result["beside_subscribers"]["ranges_read"] > 0 and result["beside_subscribers"]["shard_rss_mib"] > 0
    assert "pushes beside 1 subscribers" in capsys.readouterr().out
    assert "| `embps bench catchup` |" in render([(str(out), result)])
