"""The [launch] section: defaults, a full example, and errors that name the field."""

from __future__ import annotations

import tomllib

import pytest

from ps.job_config import ShardConfig
from ps.table.config import TableConfig
from tests.worker.training_jobs import write_training_job
from worker.launch_config import LaunchSettings, ReplicaSpec, parse_launch_settings
from worker.launcher import LaunchOptions, launch

SHARDS = (ShardConfig("127.0.0.1:50051"), ShardConfig("127.0.0.1:50052"))
EXAMPLE = """
max_restarts = 3
[[serving]]
listen = "127.0.0.1:50200"
metrics_port = 9200
[[serving]]
listen = "127.0.0.1:50201"
"""


def test_defaults_and_a_full_section():
    assert parse_launch_settings({}, SHARDS) == LaunchSettings(max_restarts=0, serving=())
    assert parse_launch_settings(tomllib.loads(EXAMPLE), SHARDS) == LaunchSettings(
        max_restarts=3,
        serving=(ReplicaSpec("127.0.0.1:50200", 9200), ReplicaSpec("127.0.0.1:50201", 0)),
    )


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"max_restarts": -1}, r"launch.max_restarts: must be in \[0, 1000\], got -1"),
        ({"max_restarts": 1.5}, "launch.max_restarts: must be an integer"),
        ({"max_restart": 1}, "launch.max_restart: unknown field"),
        ({"serving": {"listen": "127.0.0.1:1"}}, r"launch.serving: must be an array of tables"),
        ({"serving": [{}]}, r"launch.serving\[0\].listen: required field is missing"),
        ({"serving": [{"listen": "nohost"}]}, r"launch.serving\[0\].listen: must be 'host:port'"),
        ({"serving": [{"listen": "127.0.0.1:1", "metrics_port": 70000}]}, r"launch.serving\[0\].metrics_port"),
        ({"serving": [{"listen": "127.0.0.1:1"}, {"listen": "127.0.0.1:1"}]}, r"also launch.serving\[0\].listen"),
        ({"serving": [{"listen": SHARDS[1].address}]}, r"launch.serving\[0\].listen: .* is a PS shard's address"),
        ({"serving": [{"listen": "127.0.0.1:1", "port": 2}]}, r"launch.serving\[0\].port: unknown field"),
    ],
)
def test_errors_name_the_field(raw, message):
    with pytest.raises((ValueError, TypeError), match=message):
        parse_launch_settings(raw, SHARDS)


@pytest.mark.parametrize(
    ("replicas", "message"),
    [
        # A wildcard binds every interface: it clashes with any host on its port, either way round.
        ([{"listen": "0.0.0.0:50051"}], r"launch.serving\[0\].listen: '0.0.0.0:50051' is also shards\[0\].address"),
        ([{"listen": "127.0.0.1:7000"}, {"listen": "0.0.0.0:7000"}], r"'0.0.0.0:7000' is also launch.serving\[0\]"),
        ([{"listen": "[::]:7000"}, {"listen": "10.1.2.3:7000"}], r"'10.1.2.3:7000' is also launch.serving\[0\]"),
        # Rank 0 serves train.metrics_port on every interface of the launcher's node.
        ([{"listen": "127.0.0.1:7000", "metrics_port": 9300}],
         r"launch.serving\[0\].metrics_port: '127.0.0.1:9300' is also train.metrics_port"),
    ],
)
def test_ports_on_every_interface_clash_with_any_host(replicas, message):
    """Before, only the same host (or localhost against a loopback) counted: each of these was
    accepted, and one of the two servers then failed to bind at start."""
    with pytest.raises(ValueError, match=message):
        parse_launch_settings({"serving": replicas}, SHARDS, train_metrics_port=9300)


def test_max_restarts_flag_is_checked():
    with pytest.raises(ValueError, match=r"--max-restarts: must be in \[0, 1000\], got -2"):
        LaunchOptions("job.toml", max_restarts=-2)


def test_restarts_need_a_launcher_that_owns_every_process(tmp_path):
    train = {"workers": 1, "steps": 1, "batch_size": 8, "output_dir": str(tmp_path / "out")}
    path, _ = write_training_job(tmp_path / "job.toml", [TableConfig(name="emb", dim=4)], 1, train, {"num_keys": 10})
    path.write_text(path.read_text() + "\n[launch]\nmax_restarts = 1\n")
    options = LaunchOptions(str(path), nnodes=2, node_rank=0, rdzv_endpoint="127.0.0.1:29400")
    with pytest.raises(ValueError, match="launch.max_restarts: restarts need one launcher"):
        launch(options)
    with pytest.raises(ValueError, match="no shards on this node"):
        launch(LaunchOptions(str(path), start_ps=False))
    assert not (tmp_path / "out").exists()


def test_an_output_dir_that_cannot_be_made_names_the_field(tmp_path):
    """mkdir's error named a parent of the folder ("/proc/x: No such file or directory"), not the field."""
    (tmp_path / "file").write_text("")
    train = {"workers": 1, "steps": 1, "batch_size": 8, "output_dir": str(tmp_path / "file" / "out")}
    path, _ = write_training_job(tmp_path / "job.toml", [TableConfig(name="emb", dim=4)], 1, train, {"num_keys": 10})
    with pytest.raises(ValueError, match=r"train\.output_dir: cannot create '.*file/out': Not a directory"):
        launch(LaunchOptions(str(path), start_ps=False))


def test_a_restart_at_the_last_step_keeps_the_summary_of_the_attempt_that_trained(tmp_path):
    """A rank failed after rank 0 had trained to the end and written summary.json (in the final
    evaluation, after the last snapshot); the restart from that snapshot trained nothing and wrote
    its own summary over it (samples 0, no loss, no rate), and the launcher said "the job was at its
    last step already: nothing left to train" of a launch that had just trained it (a review's
    repro). The summary of the attempt that trained is the run's; a restart that trained steps
    keeps its own, and a job resumed at its last step by the user keeps the restart's."""
    import json

    from worker.launcher import _run_summary

    trained = {"steps": 60, "resumed_from": None, "samples": 7680, "final_loss": 0.41, "samples_per_s": 900.0}
    restart = {"steps": 60, "resumed_from": 60, "samples": 0, "final_loss": None, "samples_per_s": None}
    path = tmp_path / "summary.json"
    path.write_text(json.dumps(restart))
    assert _run_summary(path, json.dumps(trained)) == trained
    assert json.loads(path.read_text()) == trained
    path.write_text(json.dumps(restart))
    assert _run_summary(path, None) == restart  # `--resume` of a finished job: nothing was trained
    later = {**restart, "resumed_from": 40, "samples": 2560}
    path.write_text(json.dumps(later))
    assert _run_summary(path, json.dumps(trained)) == later
