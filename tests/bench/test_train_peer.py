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
