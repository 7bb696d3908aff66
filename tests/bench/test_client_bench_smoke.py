"""`embps bench client` at toy size against a real `embps serve` replica: both calls of each kind
measured every round, the ratios reported, and the replica stopped by pid."""

import json

import pytest

from bench import client_bench
from bench.client_bench import ClientBenchConfig, run_client_bench


def test_client_bench_measures_each_call_and_stops_its_replica(tmp_path, capsys, monkeypatch):
    started = []
    start = client_bench.EmbpsServer.start

    def recording_start(*args, **kwargs):
        started.append(start(*args, **kwargs))
        return started[-1]

    monkeypatch.setattr(client_bench.EmbpsServer, "start", recording_start)
    out = tmp_path / "client.json"
    config = ClientBenchConfig(rows=500, dim=8, tables=3, batch=20, calls=30, repeat=2, out=str(out))
    result = run_client_bench(config)
    assert json.loads(out.read_text()) == result
    assert len(result["rounds"]) == 2
    for figures in result["rounds"]:
        assert set(figures) == {"raw_lookup_many_ms", "client_lookup_many_ms", "raw_lookup_ms", "client_lookup_ms"}
        assert all(value > 0 for value in figures.values())
    assert result["lookup_many_ratio"] > 0 and result["lookup_ratio"] > 0
    assert "ServingClient / the bare call" in capsys.readouterr().out
    assert len(started) == 1 and started[0].proc.poll() is not None, "the replica outlived the bench"


@pytest.mark.parametrize(("field", "value"), [("tables", 1), ("batch", 0), ("calls", 0), ("zipf", -1.0)])
def test_bad_sizes_are_refused_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"^{field}: must be"):
        ClientBenchConfig(**{field: value})
