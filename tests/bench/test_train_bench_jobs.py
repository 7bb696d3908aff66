"""The jobs `embps bench train` launches: `--serving` adds one serving replica of every table
beside the job (`[[launch.serving]]`), on a port of its own; without it, the job has none. And its
ratios round by round pair the runs of one round."""

import argparse

import embps
from bench.cli import _add_train
from bench.train_bench import TrainBenchConfig, _job_toml, round_ratios
from worker.launch_config import load_launch_settings
from worker.train_config import load_training_job


def test_serving_adds_one_replica_beside_the_job_and_only_then(tmp_path) -> None:
    config = TrainBenchConfig(steps=3, num_tables=4)
    for serving in (False, True):
        path = tmp_path / f"job-{serving}.toml"
        path.write_text(_job_toml(config, "sync", tmp_path / "out", serving=serving))
        job = load_training_job(path)
        shards = [s.address for s in job.ps.shards]
        settings = load_launch_settings(path, job.ps.shards)
        assert len(settings.serving) == int(serving), settings
        assert [t.name for t in job.ps.tables] == ["t0", "t1", "t2", "t3"]
        for replica in settings.serving:
            assert replica.listen not in shards and replica.metrics_port > 0, (replica, shards)


def test_the_flag_reaches_the_config() -> None:
    parser = argparse.ArgumentParser()
    _add_train(parser)
    assert parser.parse_args(["--serving"]).serving is True
    assert parser.parse_args([]).serving is False


def test_round_ratios_pair_the_runs_of_each_round() -> None:
    runs = {
        "in_process": [{"samples_per_s": 100.0}, {"samples_per_s": 50.0}],
        "ps_sync": [{"samples_per_s": 70.0}, {"samples_per_s": 40.0}],
        "ps_async": [{"samples_per_s": 80.0}, {"samples_per_s": 45.0}],
    }
    ratios = round_ratios(runs)
    # Round by round, not the fastest of each mode (that would read 70 / 100 and 80 / 100).
    assert ratios == {"ps_sync/in_process": [0.7, 0.8], "ps_async/in_process": [0.8, 0.9]}


def test_a_torchrec_path_without_the_peer_is_refused(capsys) -> None:
    """--torchrec-path says where the peer is installed; without --peer torchrec nothing would read it."""
    assert embps.main(["bench", "train", "--torchrec-path", "/opt/torchrec"]) == 2
    assert "--torchrec-path applies with --peer torchrec only" in capsys.readouterr().err


def test_capacity_makes_every_table_a_full_lru_one_with_every_shards_rows_in_process(tmp_path) -> None:
    config = TrainBenchConfig(steps=3, num_tables=3, num_keys=5_000, capacity=1_000)
    for in_process, expected in ((False, 1_000), (True, 1_000 * config.shards)):
        path = tmp_path / f"job-{in_process}.toml"
        path.write_text(_job_toml(config, "sync", tmp_path / "out", in_process=in_process))
        job = load_training_job(path)
        assert [t.capacity for t in job.ps.tables] == [expected] * 3
        assert {str(t.eviction.policy) for t in job.ps.tables} == {"lru"}
        assert job.data.synthetic.num_keys == 5_000
    path = tmp_path / "unbounded.toml"
    path.write_text(_job_toml(TrainBenchConfig(steps=3, num_tables=3), "sync", tmp_path / "out"))
    assert {t.capacity for t in load_training_job(path).ps.tables} == {None}


def test_capacity_and_keys_flags_reach_the_config_and_the_peer_is_refused_with_capacity(capsys) -> None:
    parser = argparse.ArgumentParser()
    _add_train(parser)
    args = parser.parse_args(["--capacity", "40000", "--keys", "200000"])
    assert (args.capacity, args.keys) == (40_000, 200_000)
    assert parser.parse_args([]).capacity is None
    assert embps.main(["bench", "train", "--capacity", "1000", "--peer", "torchrec"]) == 2
    assert "--capacity: TorchRec's tables have no capacity" in capsys.readouterr().err
