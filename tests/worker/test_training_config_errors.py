"""Bad training sections of a job file, and bad `embps launch` flags: one line naming the field (by
its whole path) or the flag, exit status 2, and nothing of the previous run touched."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest

from ps.errors import ConfigTypeError
from ps.job_config import ShardConfig
from ps.snapshot.ops import ShardSnapshotter
from ps.table.config import TableConfig
from ps.table.embedding_table import EmbeddingTable
from tests.helpers.processes import REPO_ROOT
from tests.worker.training_jobs import trainer_extras
from worker.launch_config import parse_launch_settings
from worker.launcher import LaunchOptions
from worker.model_config import MAX_LAYER_WIDTH
from worker.train_config import parse_training_job

# Nothing listens on these ports: no test here starts a shard or a worker.
JOB = """
job = "config-errors"

[[shards]]
address = "127.0.0.1:47311"
metrics_port = 47321

[tables.emb]
dim = 4

[train]
workers = 1
steps = 2
batch_size = 8
tables = ["emb"]
output_dir = "{out}"

[model]
bottom_sizes = [8]
top_sizes = [8]

[data]
source = "synthetic"

[data.synthetic]
num_sparse = 2
num_keys = 10
"""


def job_text(out: Path | str, old: str = "", new: str = "") -> str:
    """JOB writing to `out`, with `old` replaced by `new`."""
    text = JOB.format(out=out)
    assert old in text
    return text.replace(old, new, 1)


def launch(tmp_path: Path, text: str, *flags: str) -> str:
    """`embps launch` on the job `text`: checks the exit status (2) and the one line of stderr; returns it."""
    path = tmp_path / "job.toml"
    path.write_text(text)
    done = subprocess.run(
        [sys.executable, "-m", "embps", "launch", str(path), *flags],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("embps launch: "), lines[0]
    return lines[0].removeprefix("embps launch: ")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('data = 5\n', r"^data: must be a table \(\[data\]\), got 5$"),
        ('data = "x"\n', r"^data: must be a table \(\[data\]\), got 'x'$"),
        ('train = 5\n', r"^train: must be a table \(\[train\]\), got 5$"),
        ('model = [8]\n', r"^model: must be a table \(\[model\]\), got \[8\]$"),
        ('launch = "restart"\n', r"^launch: must be a table \(\[launch\]\), got 'restart'$"),
    ],
    ids=["data-int", "data-str", "train-int", "model-list", "launch-str"],
)
def test_a_section_of_the_wrong_shape_is_one_line_naming_it(tmp_path, text, message):
    """A top-level key replaces its section (TOML allows no table and key of the same name)."""
    section = re.match(r"\w+", text).group()
    base = job_text(tmp_path / "out")
    kept = re.sub(rf"^\[{section}(\.\w+)?\]\n(?:[^\[\n].*\n|\n)*", "", base, flags=re.M)
    assert re.search(message, launch(tmp_path, text + kept))


TYPE, VALUE = ConfigTypeError, ValueError
SYNTHETIC, TRAIN, DATA = "num_keys = 10", "workers = 1", 'source = "synthetic"'

# Each row: a change to JOB (old, new), the message it gives and the exception's type. Wrong types
# raise ConfigTypeError: a TypeError, and a ValueError so that the command line prints one line.
LOADER_CASES = [
    ("[data.synthetic]\nnum_sparse = 2\nnum_keys = 10", "synthetic = 5", r"^data\.synthetic: must be a table", TYPE),
    (TRAIN, 'workers = "1"', r"^train\.workers: must be an integer, got '1'$", TYPE),
    (SYNTHETIC, 'num_keys = "10"', r"^data\.synthetic\.num_keys: must be an integer", TYPE),
    ("bottom_sizes = [8]", 'bottom_sizes = "8"', r"^model\.bottom_sizes: must be a list", TYPE),
    ('tables = ["emb"]', "tables = [1]", r"^train\.tables\[0\]: must be a table name", TYPE),
    (DATA, DATA + "\npaths = [3]", r"^data\.paths\[0\]: must be a path or URI", TYPE),
    (DATA, DATA + "\nstorage = 5", r"^data\.storage: must be a table", TYPE),
    (SYNTHETIC, "num_keys = 0", r"^data\.synthetic\.num_keys: must be >= 1, got 0$", VALUE),
    (
        SYNTHETIC,
        "num_keys = 10000000000000",
        r"^data\.synthetic\.num_keys: must be at most 268,435,456 \(2\^28; .*got 10,000,000,000,000$",
        VALUE,
    ),
    (SYNTHETIC, SYNTHETIC + "\nzipf_alpha = nan", r"^data\.synthetic\.zipf_alpha: must be a finite", VALUE),
    (SYNTHETIC, SYNTHETIC + "\nseed = -1", r"^data\.synthetic\.seed: must be in \[0, ", VALUE),
    (SYNTHETIC, SYNTHETIC + "\nnum_dense = 0", r"^data\.synthetic\.num_dense: the model needs >= 1", VALUE),
    (SYNTHETIC, SYNTHETIC + "\nbogus = 1", r"^data\.synthetic\.bogus: unknown field", VALUE),
    ("bottom_sizes = [8]", "bottom_sizes = [0]", r"^model\.bottom_sizes\[0\]: a layer width must be", VALUE),
    (
        "bottom_sizes = [8]",
        "bottom_sizes = [8, 10000000000]",
        rf"^model\.bottom_sizes\[1\]: .*\[1, {MAX_LAYER_WIDTH}\], got 10000000000$",
        VALUE,
    ),
    ("top_sizes = [8]", "top_sizes = [true]", r"^model\.top_sizes\[0\]: a layer width must be", VALUE),
    ("top_sizes = [8]", "top_sizes = [8]\nseed = -1", r"^model\.seed: must be an integer in \[0, ", VALUE),
    (TRAIN, TRAIN + "\ndense_lr = inf", r"^train\.dense_lr: must be a finite number > 0, got inf$", VALUE),
    (TRAIN, TRAIN + "\ndense_lr = nan", r"^train\.dense_lr: must be a finite number > 0, got nan$", VALUE),
    ('output_dir = "OUT"', 'output_dir = ""', r"^train\.output_dir: must be a folder path, got ''$", VALUE),
    ('output_dir = "OUT"', 'output_dir = " "', r"^train\.output_dir: must be a folder path, got ' '$", VALUE),
    ("batch_size = 8", "batch_size = 0", r"^train\.batch_size: must be >= 1, got 0$", VALUE),
    (DATA, DATA + "\nseed = -1", r"^data\.seed: must be in \[0, ", VALUE),
    (DATA, 'source = "parquet"\npaths = ["x"]\nnum_dense = 0', r"^data\.num_dense: must be >= 1, got 0$", VALUE),
    (TRAIN, TRAIN + "\nmetrics_port = 47321", r"^train\.metrics_port: 47321 is also shards\[0\]\.metrics_port", VALUE),
    # Numbers that sized memory or threads at the reader's start, and failed there in every worker.
    (DATA, DATA + "\narrow_threads = 1099511627776", r"^data\.arrow_threads: must be in \[0, 1,024\]", VALUE),
    (DATA, DATA + "\nprefetch_batches = 4096", r"^data\.prefetch_batches: must be in \[0, 1,024\], got 4,096$", VALUE),
    (DATA, DATA + "\nshuffle_buffer = 4611686018427387904", r"^data\.shuffle_buffer: must be in \[0, 2,147", VALUE),
    ("batch_size = 8", "batch_size = 1180591620717411303424", r"^train\.batch_size: must be at most 16,777,216", VALUE),
    (TRAIN, "workers = 1099511627776", r"^train\.workers: must be at most 65,536, got 1,099,511,627,776$", VALUE),
    # Widths of the model's layers that the data sets: the worker died allocating the model.
    (
        "num_sparse = 2",
        "num_sparse = 100000",
        r"^data\.synthetic\.num_sparse: must be at most 361 with tables\.emb\.dim = 4 \(the top MLP .*got 100,000$",
        VALUE,
    ),
    (SYNTHETIC, SYNTHETIC + "\nnum_dense = 65537", r"^data\.synthetic\.num_dense: must be at most 65,536 ", VALUE),
    (
        DATA,
        'source = "criteo"\npaths = ["x"]\nnum_sparse = 362',
        r"^data\.num_sparse: must be at most 361 with tables\.emb\.dim = 4 ",
        VALUE,
    ),
    (DATA, 'source = "parquet"\npaths = ["x"]\nnum_dense = 65537', r"^data\.num_dense: must be at most 65,536 ", VALUE),
    ("dim = 4", "dim = 65536", r"^tables\.emb\.dim: 65,536 leaves no room for one feature's dot product", VALUE),
]


@pytest.mark.parametrize(("old", "new", "message", "error"), LOADER_CASES, ids=[c[2][1:40] for c in LOADER_CASES])
def test_every_loader_message_carries_the_whole_path(old, new, message, error):
    with pytest.raises(error, match=message):
        parse_training_job(tomllib.loads(job_text("OUT", old, new)))


def test_a_good_job_still_loads():
    job = parse_training_job(tomllib.loads(job_text("OUT")))
    assert job.model.bottom_sizes == (8,) and job.data.synthetic.num_keys == 10


def test_wrong_types_and_paths_from_the_command_line(tmp_path):
    """The loader's messages reach the command line whole (wrong type: ConfigTypeError is a ValueError)."""
    out = tmp_path / "out"
    assert launch(tmp_path, job_text(out, "num_keys = 10", "num_keys = 0")) == (
        "data.synthetic.num_keys: must be >= 1, got 0"
    )
    assert launch(tmp_path, job_text(out, "bottom_sizes = [8]", 'bottom_sizes = ["8"]')).startswith(
        "model.bottom_sizes[0]: a layer width must be an integer"
    )
    assert launch(tmp_path, job_text(out, "workers = 1", "workers = 1\ndense_lr = inf")).startswith("train.dense_lr:")
    assert launch(tmp_path, job_text(out, "num_sparse = 2", "num_sparse = 100000")).startswith(
        "data.synthetic.num_sparse: must be at most 361"
    )
    assert not out.exists()


def test_a_misspelled_section_lists_every_top_level_field():
    text = job_text("OUT", "[train]", "[trian]")
    with pytest.raises(ValueError, match=r"^trian: unknown field; known fields: ") as caught:
        parse_training_job(tomllib.loads(text))
    known = str(caught.value).split("known fields: ")[1].split(", ")
    for section in ("train", "model", "data", "launch", "deploy", "job", "shards", "tables"):
        assert section in known, caught.value


NODE_1 = ["--nnodes", "2", "--node-rank", "1"]


def previous_run(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    out = tmp_path / "out"
    out.mkdir()
    files = {"summary.json": '{"steps": 7}\n', "progress.jsonl": '{"step": 7, "loss": 0.5, "samples_per_s": 1}\n'}
    for name, text in files.items():
        (out / name).write_text(text)
    return out, files


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ([*NODE_1, "--rdzv-endpoint", "not a host"], r"^--rdzv-endpoint: must be .*'not a host'$"),
        ([*NODE_1, "--rdzv-endpoint", "10.0.0.1"], r"^--rdzv-endpoint: must be .*'10.0.0.1'$"),
        ([*NODE_1, "--rdzv-endpoint", "10.0.0.1:0"], r"^--rdzv-endpoint: must be .*'10.0.0.1:0'$"),
        (["--local-addr", "a b"], r"^--local-addr: must be a host name"),
        (["--resume"], r"^--resume: the job has no \[snapshot\] section"),
    ],
    ids=["rdzv-host", "rdzv-no-port", "rdzv-port-0", "local-addr", "resume"],
)
def test_a_refused_launch_leaves_the_previous_run_untouched(tmp_path, flags, message):
    out, files = previous_run(tmp_path)
    assert re.search(message, launch(tmp_path, job_text(out), *flags))
    assert {p.name: p.read_text() for p in out.iterdir()} == files


def test_resume_without_a_snapshot_is_refused_before_anything_starts(tmp_path):
    out, files = previous_run(tmp_path)
    (tmp_path / "snapshots").mkdir()
    text = job_text(out) + f'\n[snapshot]\nuri = "{tmp_path / "snapshots"}"\n'
    line = launch(tmp_path, text, "--resume")
    assert line.startswith("--resume: no complete snapshot of job 'config-errors' under "), line
    assert {p.name: p.read_text() for p in out.iterdir()} == files


def test_a_fresh_launch_over_an_earlier_run_s_snapshots_is_refused_before_anything_starts(tmp_path):
    """Without --resume, a restart would have resumed from the earlier run's newest snapshot and
    every snapshot round of the new run would have found its step committed already."""
    out, files = previous_run(tmp_path)
    uri = str(tmp_path / "snapshots")
    text = job_text(out) + f'\n[snapshot]\nuri = "{uri}"\n'
    config = TableConfig("emb", dim=4)
    ShardSnapshotter({"emb": EmbeddingTable(config)}, 0).snapshot(uri, "config-errors", 60)
    line = launch(tmp_path, text)
    assert line == (
        f"snapshot.uri: {uri} already holds snapshots of job 'config-errors' (newest step 60): pass --resume "
        "to go on from it, or give this run another job name or snapshot.uri"
    ), line
    assert {p.name: p.read_text() for p in out.iterdir()} == files


def test_an_output_dir_that_is_a_file_is_refused_before_anything_starts(tmp_path):
    out = tmp_path / "out"
    out.write_text("not a folder")
    assert launch(tmp_path, job_text(out)) == f"train.output_dir: {str(out)!r} exists and is not a folder"
    assert out.read_text() == "not a folder"


def test_max_restarts_names_the_flag_when_the_flag_set_it(tmp_path):
    out, files = previous_run(tmp_path)
    flags = ["--max-restarts", "2", "--nnodes", "2", "--rdzv-endpoint", "127.0.0.1:29400"]
    line = launch(tmp_path, job_text(out), *flags)
    assert line.startswith("--max-restarts: restarts need one launcher"), line
    assert "launch.max_restarts" not in line
    assert {p.name: p.read_text() for p in out.iterdir()} == files


def test_rdzv_endpoint_accepts_what_torch_accepts():
    for endpoint in ("10.0.0.1:29400", "node-0.cluster.local:29400", "[fe80::1]:29400", "localhost:1"):
        LaunchOptions("job.toml", nnodes=2, node_rank=1, rdzv_endpoint=endpoint)
    with pytest.raises(ValueError, match="^--rdzv-endpoint: "):
        LaunchOptions("job.toml", nnodes=2, node_rank=1, rdzv_endpoint="host:99999")


SHARDS = (
    ShardConfig("127.0.0.1:47311", metrics_port=47321),
    ShardConfig("127.0.0.1:47312", metrics_port=47322, standby="127.0.0.1:47313", standby_metrics_port=47323),
)

LISTEN_0 = r"launch\.serving\[0\]\.listen"


@pytest.mark.parametrize(
    ("serving", "message"),
    [
        ([{"listen": "127.0.0.1:47321"}], rf"^{LISTEN_0}: '127.0.0.1:47321' is also shards\[0\]\.metrics_port;"),
        ([{"listen": "127.0.0.1:47323"}], rf"^{LISTEN_0}: .* is also shards\[1\]\.standby_metrics_port;"),
        ([{"listen": "127.0.0.1:47313"}], rf"^{LISTEN_0}: .* is a PS shard.s address \(shards\[1\]\.standby\)"),
        (
            [{"listen": "127.0.0.1:50200", "metrics_port": 47311}],
            r"^launch\.serving\[0\]\.metrics_port: '127.0.0.1:47311' is a PS shard's address \(shards\[0\]\.address\)",
        ),
        (
            [{"listen": "127.0.0.1:50200", "metrics_port": 9200}, {"listen": "127.0.0.1:9200"}],
            r"^launch\.serving\[1\]\.listen: '127.0.0.1:9200' is also launch\.serving\[0\]\.metrics_port",
        ),
        ([{"listen": 5}], r"^launch\.serving\[0\]\.listen: must be a string"),
        (["127.0.0.1:50200"], r"^launch\.serving\[0\]: must be a table"),
    ],
    ids=["metrics", "standby-metrics", "standby", "replica-metrics", "replicas", "listen-int", "item-str"],
)
def test_a_replica_may_bind_nothing_a_shard_or_replica_binds(serving, message):
    with pytest.raises(ValueError, match=message):
        parse_launch_settings({"serving": serving}, SHARDS)


def test_a_replica_on_another_host_or_a_free_port_is_fine():
    settings = parse_launch_settings(
        {"serving": [{"listen": "10.0.0.2:47321", "metrics_port": 47311}, {"listen": "127.0.0.1:50200"}]}, SHARDS
    )
    assert len(settings.serving) == 2


def test_a_replica_on_a_shard_metrics_port_from_the_command_line(tmp_path):
    text = job_text(tmp_path / "out") + '\n[[launch.serving]]\nlisten = "127.0.0.1:47321"\n'
    line = launch(tmp_path, text)
    assert line == (
        "launch.serving[0].listen: '127.0.0.1:47321' is also shards[0].metrics_port; only one of the two could bind it"
    )
    assert not (tmp_path / "out").exists()


def test_held_out_files_that_are_training_files_are_refused_before_anything_starts(tmp_path):
    """Evaluating on a file the job trains on scores rows the model saw: its AUC says nothing of
    held-out data. Refused with the file named, and a held-out entry that names no file too."""
    out, files = previous_run(tmp_path)
    day = tmp_path / "day_0"
    day.mkdir()
    (day / "part-0.tsv").write_text("1\t1\tab\tcd\n")
    text = job_text(
        out,
        'source = "synthetic"',
        f'source = "criteo"\nnum_dense = 1\nnum_sparse = 2\npaths = ["{day}"]\neval_paths = ["{day}/part-0.tsv"]',
    )
    line = launch(tmp_path, text)
    assert line == (
        f"data.eval_paths[0]: {day}/part-0.tsv: names {day}/part-0.tsv, which data.paths trains on; held-out files "
        "must not be training files (the evaluation would score rows the model saw)"
    ), line
    line = launch(tmp_path, text.replace(f'eval_paths = ["{day}/part-0.tsv"]', f'eval_paths = ["{day}/nope*.tsv"]'))
    assert line == f"data.eval_paths: {day}/nope*.tsv: the glob matches no file", line
    assert {p.name: p.read_text() for p in out.iterdir()} == files


def test_training_files_that_name_no_file_are_one_line_before_anything_starts(tmp_path):
    """data.paths was only listed before the shards started when the job had eval_paths; without
    them a typo started the shards and printed every rank's traceback (exit 1; a review)."""
    out, files = previous_run(tmp_path)
    for entry, message in (
        (f"{tmp_path}/nope.tsv", "no such file or directory"),
        (f"{tmp_path}/day*/x.tsv", "the glob matches no file"),
    ):
        data = f'source = "criteo"\nnum_dense = 1\nnum_sparse = 2\npaths = ["{entry}"]'
        text = job_text(out, 'source = "synthetic"', data)
        assert launch(tmp_path, text) == f"data.paths: {entry}: {message}"
    assert {p.name: p.read_text() for p in out.iterdir()} == files


def test_held_out_files_out_of_reach_are_one_line_before_anything_starts(tmp_path):
    """The held-out check lists data.paths: an S3 endpoint out of reach raised an OSError without a
    file name, which `embps launch` printed as a 40-line traceback (exit 1; a review)."""
    out, files = previous_run(tmp_path)
    storage = '\n[data.storage]\nendpoint_override = "127.0.0.1:1"\nscheme = "http"\nmax_attempts = 1\n'
    text = job_text(
        out,
        'source = "synthetic"',
        'source = "parquet"\nnum_dense = 1\nnum_sparse = 2\npaths = ["s3://bucket/train/part-0.parquet"]\n'
        'eval_paths = ["s3://bucket/eval/part-0.parquet"]',
    ).replace("\n[data.synthetic]", storage + "\n[data.synthetic]")
    line = launch(tmp_path, text)
    assert line.startswith("data.paths: s3://bucket/train/part-0.parquet: cannot read: "), line
    assert {p.name: p.read_text() for p in out.iterdir()} == files


def earlier_run_snapshot(
    tmp_path: Path, step: int, world_size: int = 1, snapper: ShardSnapshotter | None = None
) -> str:
    """The job file's [snapshot] section, its uri holding a training snapshot at `step` of JOB (as
    it is, run by `world_size` workers) with the trainer's extra files."""
    uri = tmp_path / "snapshots"
    job = parse_training_job(tomllib.loads(job_text("OUT")))
    snapper = snapper or ShardSnapshotter({"emb": EmbeddingTable(TableConfig("emb", dim=4))}, 0)
    snapper.snapshot(str(uri), "config-errors", step, extras=trainer_extras(job, world_size, step))
    return f'\n[snapshot]\nuri = "{uri}"\n'


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("workers = 1", "workers = 2", "train.workers: snapshot step 60 was taken by 1 worker in all, this run has 2"),
        ("top_sizes = [8]", "top_sizes = [12]", "model.top_sizes: [12] in the job, [8] in snapshot step 60 "),
        ("bottom_sizes = [8]", "bottom_sizes = [8, 4]", "model.bottom_sizes: [8, 4] in the job, [8] in snapshot "),
        ("num_sparse = 2", "num_sparse = 3", "data.synthetic.num_sparse: 3 in the job, 2 in snapshot step 60 "),
        ("num_keys = 10", "num_keys = 10\nnum_dense = 3", "data.synthetic.num_dense: 3 in the job, 13 in snapshot "),
        ("dim = 4", "dim = 8", "tables.emb.dim: 8 in the job, 4 in snapshot step 60"),
    ],
    ids=["workers", "top-sizes", "bottom-sizes", "num-sparse", "num-dense", "dim"],
)
def test_a_resume_after_a_change_of_the_job_s_shape_is_refused_before_anything_starts(tmp_path, old, new, message):
    """Each change passed every load-time check: every worker then failed on torch's size mismatch
    (or the reader positions of another worker count), or every shard on the dim, and the launcher
    spent every restart on it."""
    out, files = previous_run(tmp_path)
    text = job_text(out, old, new) + earlier_run_snapshot(tmp_path, 60)
    line = launch(tmp_path, text, "--resume", "--max-restarts", "2")
    assert line.startswith(message), line
    assert {p.name: p.read_text() for p in out.iterdir()} == files


def test_the_resume_check_reads_the_step_the_launch_falls_back_to(tmp_path):
    """A newest step whose extra files are corrupt is one the start falls back from: the step
    checked is the one before it, and the refusal retires nothing."""
    out, files = previous_run(tmp_path)
    snapper = ShardSnapshotter({"emb": EmbeddingTable(TableConfig("emb", dim=4))}, 0)
    section = earlier_run_snapshot(tmp_path, 10, world_size=2, snapper=snapper)
    earlier_run_snapshot(tmp_path, 20, world_size=1, snapper=snapper)
    state = tmp_path / "snapshots" / "config-errors" / "20" / "extra" / "trainer_state.json"
    state.write_bytes(state.read_bytes().replace(b'"world_size": 1', b'"world_size": 3'))
    line = launch(tmp_path, job_text(out) + section, "--resume")
    assert line.startswith("train.workers: snapshot step 10 was taken by 2 workers in all, this run has 1"), line
    assert (tmp_path / "snapshots" / "config-errors" / "20" / "manifest.json").exists()
    assert {p.name: p.read_text() for p in out.iterdir()} == files


def test_a_worker_names_the_field_of_a_dense_tower_of_another_shape(tmp_path):
    """The workers' own check, behind the launcher's: load_state_dict raised torch's size mismatch."""
    import torch

    from worker.checkpoint import load_trainer_state
    from worker.model import DLRMDenseTower

    text = job_text("OUT", "top_sizes = [8]", "top_sizes = [12]") + earlier_run_snapshot(tmp_path, 60)
    job = parse_training_job(tomllib.loads(text))
    model = DLRMDenseTower(job.model)
    with pytest.raises(ValueError, match=r"^model\.top_sizes: \[12\] in the job, \[8\] in snapshot step 60 "):
        load_trainer_state(job, 60, 0, 1, model, torch.optim.Adam(model.parameters()))


def test_a_resume_with_another_dense_lr_trains_at_the_job_s_rate_and_says_so(tmp_path, caplog):
    """torch's load_state_dict takes the saved param groups' hyperparameters: a run resumed with a
    lowered train.dense_lr (a usual move) went on at the snapshot's rate without a word."""
    from worker.checkpoint import load_trainer_state
    from worker.model import DLRMDenseTower
    from worker.trainer import make_dense_optimizer

    section = earlier_run_snapshot(tmp_path, 60)  # dense_lr 0.001, the default
    for text, lr, said in ((job_text("OUT") + section, 0.001, False),
                           (job_text("OUT", 'tables = ["emb"]', 'tables = ["emb"]\ndense_lr = 0.0002') + section,
                            0.0002, True)):
        job = parse_training_job(tomllib.loads(text))
        model = DLRMDenseTower(job.model)
        optimizer = make_dense_optimizer(job, model.parameters())
        caplog.clear()
        load_trainer_state(job, 60, 0, 1, model, optimizer)
        assert [group["lr"] for group in optimizer.param_groups] == [lr]
        assert ("train.dense_lr: 0.0002 in the job, 0.001 in snapshot step 60" in caplog.text) == said, caplog.text


def test_a_local_snapshot_uri_that_is_a_file_is_refused_before_anything_starts(tmp_path):
    """Every snapshot round then failed on "Not a directory" and was skipped with a warning: the job
    ended 0 with no snapshot. A path under a file is no folder either; one that does not exist yet is."""
    out, files = previous_run(tmp_path)
    file = tmp_path / "snapshots"
    file.write_text("not a folder")
    for uri, message in (
        (str(file), f"snapshot.uri: {str(file)!r} is not a folder"),
        (f"file://{file}", f"snapshot.uri: 'file://{file}' is not a folder"),
        (f"{file}/ctr", f"snapshot.uri: '{file}/ctr' is not a folder: {str(file)!r} is a file"),
    ):
        for flags in ((), ("--resume",)):
            assert launch(tmp_path, job_text(out) + f'\n[snapshot]\nuri = "{uri}"\n', *flags) == message
    assert file.read_text() == "not a folder"
    assert {p.name: p.read_text() for p in out.iterdir()} == files


def test_a_resume_with_another_dense_optimizer_is_refused_before_anything_starts(tmp_path):
    """The snapshot's dense.pt holds Adam's state: torch's load_state_dict took it into an SGD, and
    every worker then died on its first step (KeyError: 'momentum') at each restart."""
    out, files = previous_run(tmp_path)
    text = job_text(out, 'tables = ["emb"]', 'tables = ["emb"]\ndense_optimizer = "sgd"')
    line = launch(tmp_path, text + earlier_run_snapshot(tmp_path, 60), "--resume", "--max-restarts", "1")
    assert line.startswith("train.dense_optimizer: sgd in the job, adam in snapshot step 60 "), line
    assert {p.name: p.read_text() for p in out.iterdir()} == files


@pytest.mark.parametrize(("incremental", "held"), [(False, "10"), (True, "at least 10")], ids=["full", "incremental"])
def test_a_resume_into_a_capacity_below_the_snapshot_s_rows_is_refused_before_anything_starts(
    tmp_path, incremental, held
):
    """A shard restores every row of its snapshot (EmbeddingTable.load evicts none, whatever the
    table's eviction policy): it exited 1 on "state has 10 rows, capacity is 5" at each restart, the
    reason in its log only. A chain's manifests bound its rows from below (an incremental holds the
    rows it rewrote, each deletion removes one), and what the bound lets through the shard refuses."""
    out, files = previous_run(tmp_path)
    table = EmbeddingTable(TableConfig("emb", dim=4))
    table.apply_gradients(np.arange(10, dtype=np.int64), np.ones((10, 4), np.float32), step=1)
    snapper = ShardSnapshotter({"emb": table}, 0)
    section = earlier_run_snapshot(tmp_path, 50, snapper=snapper)
    step = 50
    if incremental:
        table.apply_gradients(np.arange(8, 12, dtype=np.int64), np.ones((4, 4), np.float32), step=2)
        extras = trainer_extras(parse_training_job(tomllib.loads(job_text("OUT"))), 1, 60)
        snapper.snapshot(str(tmp_path / "snapshots"), "config-errors", 60, "incremental", extras=extras)
        step = 60
    text = job_text(out, "dim = 4", "dim = 4\ncapacity = 5") + section
    line = launch(tmp_path, text, "--resume", "--max-restarts", "1")
    assert line.startswith(f"tables.emb.capacity: 5 rows a shard in the job, snapshot step {step} holds {held} "), line
    assert {p.name: p.read_text() for p in out.iterdir()} == files


def test_a_resume_from_a_snapshot_of_the_ps_alone_is_refused_before_anything_starts(tmp_path):
    """A snapshot committed without the trainer's extra files (ShardSnapshotter.snapshot without
    extras, or a coordinator of its own calling the shards' SnapshotControl): the shards restored
    it, then every worker died on a KeyError for extra/trainer_state.json at each restart."""
    out, files = previous_run(tmp_path)
    uri = tmp_path / "snapshots"
    ShardSnapshotter({"emb": EmbeddingTable(TableConfig("emb", dim=4))}, 0).snapshot(str(uri), "config-errors", 60)
    text = job_text(out) + f'\n[snapshot]\nuri = "{uri}"\n'
    line = launch(tmp_path, text, "--resume", "--max-restarts", "1")
    assert line.startswith("--resume: snapshot step 60 of job 'config-errors' holds no trainer state "), line
    assert {p.name: p.read_text() for p in out.iterdir()} == files
