"""`embps bench train --peer torchrec` says how to get TorchRec when it is not there, before any run."""

import argparse
import importlib.util
from dataclasses import replace

import pytest

from bench.cli import _add_train, _run_train
from bench.train_bench import TrainBenchConfig, check_peer


@pytest.mark.skipif(importlib.util.find_spec("torchrec") is not None, reason="torchrec is importable here anyway")
def test_missing_torchrec_names_the_folder_and_make_torchrec(tmp_path, capsys):
    config = TrainBenchConfig(peer="torchrec", torchrec_path=str(tmp_path))
    problem = check_peer(config)
    assert problem is not None and str(tmp_path) in problem and "`make torchrec`" in problem
    assert check_peer(replace(config, peer="dlrm")) == "--peer: only 'torchrec' is known, got 'dlrm'"
    assert check_peer(replace(config, peer=None)) is None
    parser = argparse.ArgumentParser()
    _add_train(parser)
    assert _run_train(parser.parse_args(["--peer", "torchrec", "--torchrec-path", str(tmp_path)])) == 2
    assert "make torchrec" in capsys.readouterr().err


@pytest.mark.parametrize("shared_table", [False, True], ids=["table-per-feature", "shared-table"])
def test_the_peer_s_tables_hold_as_many_rows_as_embps_touches(tmp_path, shared_table):
    """The peer folds each key into its table (key mod rows). Its shared table had num_keys rows
    while embps's holds every feature's keys (26 x num_keys): TorchRec trained 3x fewer distinct
    rows a batch, in a table that stayed in cache."""
    from bench.torchrec_peer import feature_rows
    from bench.train_bench import _job_toml
    from worker.data_sources import train_reader
    from worker.train_config import load_training_job

    config = TrainBenchConfig(num_tables=26, shared_table=shared_table, num_keys=10_000, steps=4)
    path = tmp_path / "job.toml"
    path.write_text(_job_toml(config, "sync", tmp_path / "out"))
    job = load_training_job(path)
    rows = feature_rows(job)
    assert rows.tolist() == [10_000 * (26 if shared_table else 1)] * 26
    embps, peer = set(), set()
    for _, batch in zip(range(4), train_reader(job, 0, 1), strict=False):
        for f, table in enumerate(job.feature_tables()):
            embps.update((table, int(k)) for k in batch.sparse[:, f])
            peer.update((table, int(k)) for k in batch.sparse[:, f] % rows[f])
    assert len(peer) >= 0.85 * len(embps), (len(peer), len(embps))  # folding collides ~10%; it was 0.18
