"""The training part of a job's TOML: `[train]`, `[model]` and `[data]`, beside the PS part.

    [train]
    workers = 2                 # worker processes on this node
    steps = 300                 # global steps (each one global batch); ends at steps or epochs
    epochs = 1                  # criteo/parquet: passes over data.paths, whichever ends first
    batch_size = 2048           # samples per global batch, split evenly over workers
    mode = "sync"               # "sync" | "async"
    staleness = 1               # async: steps of pushes that may still be in flight
    dense_optimizer = "adam"    # "adam" | "adagrad" | "sgd"
    dense_lr = 0.001
    tables = ["emb"]            # one table shared by all sparse features, or one per feature
    eval_every = 100            # steps between evaluations (0: only at the end)
    eval_batches = 8            # held-out global batches per evaluation
    output_dir = "runs/demo"    # summary.json, dense model
    on_ps_unavailable = "abort" # a shard gives no answer within its deadline: "abort" | "wait"
    ps_unavailable_timeout_s = 600.0  # wait: how long one step may wait for the shard
    metrics_port = 9300         # rank 0's Prometheus /metrics: snapshot rounds (default: none)
    publish_dense_every = 1     # rank 0 commits every step to the PS; the dense tower goes
                                # with every k-th commit (0: never), for replicas to serve

    [model]                     # worker.model_config.ModelConfig; num_dense/num_sparse/dim are derived
    bottom_sizes = [64, 16]
    top_sizes = [64]

    [data]
    source = "synthetic"        # "synthetic" | "criteo" | "parquet"
    paths = []                  # criteo/parquet: files, folders, globs; local, s3://, hdfs://
    eval_paths = []             # criteo/parquet: held-out files (read whole by rank 0)
    bad_rows = "skip"           # "skip" | "fail"
    seed = 0                    # file order per epoch and shuffle-buffer draws
    shuffle_files = true        # a new file order every epoch
    shuffle_buffer = 0          # rows per worker held back and drawn at random (0: file order)
    range_bytes = 67108864      # TSV: byte range a worker reads as one unit
    prefetch_batches = 4        # batches made ahead in a background thread (every source)
    arrow_threads = 0           # Arrow CPU threads per worker (0: the node's cores / train.workers)
    arrow_memory_pool = "auto"  # "auto" | "system" | "jemalloc" | "mimalloc" | "default" (ArrowMemoryPool)
    [data.storage]              # S3 endpoint/credentials (ps.snapshot.storage.StorageConfig)
    [data.synthetic]            # worker.data_options.SyntheticConfig (batch size from [train])
    num_keys = 100000

Errors name the field by its whole path: `train.mode: must be one of 'sync', 'async', got 'fast'`,
`data.synthetic.num_keys: must be >= 1, got 0`. A value of the wrong type or shape raises
ConfigTypeError (a TypeError and a ValueError, so every command ends with one line).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from datetime import timedelta
from enum import StrEnum
from pathlib import Path

from ps.errors import ConfigTypeError
from ps.job_config import LOOPBACK_HOSTS, JobConfig, build_config, parse_job_config, shard_endpoints
from ps.snapshot.storage import StorageConfig
from ps.toml_reader import read_toml, toml_path
from worker.data_options import ArrowMemoryPool, BadRowPolicy, SyntheticConfig
from worker.model_config import MAX_LAYER_WIDTH, ModelConfig

TRAINING_SECTIONS = ("train", "model", "data")


class Mode(StrEnum):
    SYNC = "sync"  # step t+1's lookups see every update of step t
    ASYNC = "async"  # lookups may miss up to `staleness` steps of in-flight pushes


class DenseOptimizer(StrEnum):
    ADAM = "adam"
    ADAGRAD = "adagrad"
    SGD = "sgd"


class PSUnavailablePolicy(StrEnum):
    """What a worker does when a PS shard gives no answer within the call's deadline (a dead or
    partitioned shard: ShardUnavailableError, code UNAVAILABLE)."""

    ABORT = "abort"  # the worker exits non-zero naming the shard; the launcher stops the job
    # The step's lookup or push is sent again (the push with the same push ids, so it applies
    # once) until the shard answers or train.ps_unavailable_timeout_s has passed; the other ranks
    # wait at the step's collectives meanwhile.
    WAIT = "wait"


DEFAULT_COLLECTIVE_TIMEOUT = timedelta(minutes=30)  # torch.distributed's for gloo
MAX_STEPS = 2**32 - 1
MAX_BATCH_SIZE = 2**24  # rows of one global batch: the reader allocates them (and the shuffle buffer) up front
MAX_WORKERS = 2**16
# A number past these was taken and failed in every worker at the reader's start with numpy's or
# Arrow's own error (a 52 TiB allocation, "value too large to convert to int").
_DATA_BOUNDS = {"shuffle_buffer": 2**31 - 1, "prefetch_batches": 1024, "arrow_threads": 1024}
MAX_WAIT_S = 7 * 86400.0  # the longest a step or a snapshot round may wait: ranks wait as long in a collective
COLLECTIVE_MARGIN_S = 300.0  # past a shard's wait: the step's other calls, each within its deadline


class DataSource(StrEnum):
    SYNTHETIC = "synthetic"
    CRITEO = "criteo"
    PARQUET = "parquet"


@dataclass(frozen=True)
class TrainConfig:
    workers: int = 2
    steps: int = 300
    batch_size: int = 2048
    mode: Mode = Mode.SYNC
    staleness: int = 1
    epochs: int = 1
    dense_optimizer: DenseOptimizer = DenseOptimizer.ADAM
    dense_lr: float = 0.001
    tables: tuple[str, ...] = ("emb",)
    eval_every: int = 0
    eval_batches: int = 8
    output_dir: str = "runs/job"
    on_ps_unavailable: PSUnavailablePolicy = PSUnavailablePolicy.ABORT
    ps_unavailable_timeout_s: float = 600.0
    metrics_port: int | None = None
    publish_dense_every: int = 1

    @property
    def collective_timeout(self) -> timedelta:
        """How long a rank waits in one collective of its process groups: torch's default (30
        minutes), or under "wait" longer than a step may wait for a shard, since the other ranks
        wait at the step's collectives meanwhile (else gloo ends them first, naming no shard)."""
        waiting = self.ps_unavailable_timeout_s if self.on_ps_unavailable == PSUnavailablePolicy.WAIT else 0.0
        return max(DEFAULT_COLLECTIVE_TIMEOUT, timedelta(seconds=waiting + COLLECTIVE_MARGIN_S))


@dataclass(frozen=True)
class ModelSection:
    bottom_sizes: tuple[int, ...] = (64, 16)
    top_sizes: tuple[int, ...] = (64,)
    seed: int = 0


@dataclass(frozen=True)
class DataConfig:
    source: DataSource = DataSource.SYNTHETIC
    paths: tuple[str, ...] = ()
    eval_paths: tuple[str, ...] = ()
    bad_rows: BadRowPolicy = BadRowPolicy.SKIP
    seed: int = 0
    shuffle_files: bool = True
    shuffle_buffer: int = 0
    range_bytes: int = 64 << 20
    prefetch_batches: int = 4
    arrow_threads: int = 0
    arrow_memory_pool: ArrowMemoryPool = ArrowMemoryPool.AUTO
    storage: StorageConfig = field(default_factory=StorageConfig)
    num_dense: int = 13
    num_sparse: int = 26
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass(frozen=True)
class TrainingJob:
    """A whole training job: the PS part (shards, tables) and the worker part."""

    ps: JobConfig
    train: TrainConfig
    model: ModelConfig
    data: DataConfig
    path: str | None = None

    @property
    def collective_timeout(self) -> timedelta:
        """How long a rank waits in one collective: the train section's, and longer than a snapshot
        round, whose tries rank 0 makes while the other ranks wait at its barrier (else gloo ended
        them, and the job, in a round that was to be skipped with a warning)."""
        timeout = self.train.collective_timeout
        if self.ps.snapshot is not None:
            timeout = max(timeout, timedelta(seconds=self.ps.snapshot.round_timeout_s + COLLECTIVE_MARGIN_S))
        return timeout

    @property
    def num_dense(self) -> int:
        return self.data.synthetic.num_dense if self.data.source == DataSource.SYNTHETIC else self.data.num_dense

    @property
    def num_sparse(self) -> int:
        return self.data.synthetic.num_sparse if self.data.source == DataSource.SYNTHETIC else self.data.num_sparse

    def feature_tables(self) -> list[str]:
        """Table of each sparse feature, feature order."""
        tables = self.train.tables
        return list(tables) * self.num_sparse if len(tables) == 1 else list(tables)


def load_training_job(path: str | Path) -> TrainingJob:
    """Reads and validates a job TOML with its training sections; errors name the field."""
    path = toml_path(path)
    data = read_toml(path)
    return replace(parse_training_job(data, path.resolve().parent), path=str(path.resolve()))


def parse_training_job(data: dict, base_dir: Path | None = None) -> TrainingJob:
    ps = parse_job_config({k: v for k, v in data.items() if k not in TRAINING_SECTIONS}, base_dir)
    train = _build(TrainConfig, _table(data, "train", "train"), "train")
    section = _build(ModelSection, _table(data, "model", "model"), "model")
    raw_data = dict(_table(data, "data", "data"))
    synthetic = dict(_table(raw_data, "synthetic", "data.synthetic"))
    raw_data.pop("synthetic", None)
    if "global_batch_size" in synthetic:
        raise ValueError("data.synthetic.global_batch_size: set train.batch_size instead")
    data_config = _build(DataConfig, raw_data, "data")
    _check_names("train.tables", train.tables, "a table name")
    _check_names("data.paths", data_config.paths, "a path or URI")
    _check_names("data.eval_paths", data_config.eval_paths, "a path or URI")
    if not train.output_dir.strip():
        raise ValueError(f"train.output_dir: must be a folder path, got {train.output_dir!r}")
    _positive("train.batch_size", train.batch_size)
    synthetic_config = _build(SyntheticConfig, synthetic | {"global_batch_size": train.batch_size}, "data.synthetic")
    data_config = replace(data_config, synthetic=synthetic_config)

    _positive("train.workers", train.workers)
    _positive("train.steps", train.steps)
    if train.steps > MAX_STEPS:  # a step is a uint32 on the PS (a row's last_step, Commit's step)
        raise ValueError(f"train.steps: must be at most {MAX_STEPS:,} (2^32 - 1), got {train.steps:,}")
    _positive("train.eval_batches", train.eval_batches)
    _positive("train.epochs", train.epochs)
    _positive("data.range_bytes", data_config.range_bytes)
    for name, most in _DATA_BOUNDS.items():  # each sizes memory or threads taken at the reader's start
        if not 0 <= getattr(data_config, name) <= most:
            raise ValueError(f"data.{name}: must be in [0, {most:,}], got {getattr(data_config, name):,}")
    for name, value, most in (("train.batch_size", train.batch_size, MAX_BATCH_SIZE),
                              ("train.workers", train.workers, MAX_WORKERS)):
        if value > most:
            raise ValueError(f"{name}: must be at most {most:,}, got {value:,}")
    data_config.storage.validate("data.storage")
    if train.batch_size % train.workers:
        raise ValueError(
            f"train.batch_size: must be divisible by train.workers={train.workers}, got {train.batch_size}"
        )
    if train.publish_dense_every < 0:
        raise ValueError(f"train.publish_dense_every: must be >= 0, got {train.publish_dense_every}")
    if train.staleness < 0:
        raise ValueError(f"train.staleness: must be >= 0, got {train.staleness}")
    if train.mode == Mode.ASYNC and train.staleness < 1:
        raise ValueError("train.staleness: async mode needs staleness >= 1 (0 is sync mode)")
    if not (math.isfinite(train.dense_lr) and train.dense_lr > 0):
        raise ValueError(f"train.dense_lr: must be a finite number > 0, got {train.dense_lr}")
    if train.eval_every < 0:
        raise ValueError(f"train.eval_every: must be >= 0, got {train.eval_every}")
    timeout = train.ps_unavailable_timeout_s
    if not 0 < timeout <= MAX_WAIT_S:
        raise ValueError(
            f"train.ps_unavailable_timeout_s: must be a number of seconds in (0, {MAX_WAIT_S:g}], got {timeout}"
        )
    if ps.snapshot is not None and ps.snapshot.round_timeout_s > MAX_WAIT_S:
        raise ValueError(
            f"snapshot.round_timeout_s: must be at most {MAX_WAIT_S:g} s (a week), got {ps.snapshot.round_timeout_s}"
        )
    if train.metrics_port is not None and not 0 <= train.metrics_port < 65536:
        raise ValueError(f"train.metrics_port: must be in [0, 65535], got {train.metrics_port}")
    if train.metrics_port:
        # Rank 0 serves it on every interface, so it clashes with a shard's port on loopback.
        for (host, port), where in shard_endpoints(ps.shards).items():
            if port == train.metrics_port and host in LOOPBACK_HOSTS:
                raise ValueError(f"train.metrics_port: {port} is also {where} (rank 0 binds it on every interface)")
    if not 0 <= data_config.seed < 2**64:
        raise ValueError(f"data.seed: must be in [0, {2**64 - 1}], got {data_config.seed}")
    if data_config.source != DataSource.SYNTHETIC:
        if not data_config.paths:
            raise ValueError(f"data.paths: source '{data_config.source}' needs at least one file")
        # The synthetic set has its own counts (data.synthetic.*), checked when it was built.
        _positive("data.num_dense", data_config.num_dense)
        _positive("data.num_sparse", data_config.num_sparse)
    elif synthetic_config.num_dense < 1:
        count = synthetic_config.num_dense
        raise ValueError(f"data.synthetic.num_dense: the model needs >= 1 dense feature, got {count}")
    known = {t.name: t for t in ps.tables}
    job = TrainingJob(ps=ps, train=train, model=ModelConfig(), data=data_config)
    data_field = "data.synthetic" if data_config.source == DataSource.SYNTHETIC else "data"
    if job.num_dense > MAX_LAYER_WIDTH:  # the bottom MLP's input width
        raise ValueError(
            f"{data_field}.num_dense: must be at most {MAX_LAYER_WIDTH:,} (the widest layer a model may have: its "
            f"bottom MLP takes one input a dense feature), got {job.num_dense:,}"
        )
    if len(train.tables) not in (1, job.num_sparse):
        raise ValueError(
            f"train.tables: give one table for all features or one per feature ({job.num_sparse}), "
            f"got {len(train.tables)}"
        )
    dims = set()
    for i, name in enumerate(train.tables):
        if name not in known:
            raise ValueError(f"train.tables[{i}]: no table {name!r} in [tables]; known: {', '.join(sorted(known))}")
        dims.add(known[name].dim)
    if len(dims) != 1:
        raise ValueError(f"train.tables: the dot interaction needs one dim for every table, got {sorted(dims)}")
    dim = dims.pop()
    _check_top_width(job.num_sparse, dim, f"{data_field}.num_sparse", f"tables.{train.tables[0]}.dim")
    try:
        # num_dense, num_sparse and dim were checked above, under their own fields.
        model = ModelConfig(
            num_dense=job.num_dense,
            num_sparse=job.num_sparse,
            dim=dim,
            bottom_sizes=section.bottom_sizes,
            top_sizes=section.top_sizes,
            seed=section.seed,
        )
    except ValueError as exc:
        raise ValueError(f"model.{exc}") from None
    return replace(job, model=model)


def _check_top_width(num_sparse: int, dim: int, sparse_field: str, dim_field: str) -> None:
    """ValueError naming the field when the top MLP's input, dim + (F + 1) F / 2 dot products of F
    features, is wider than MAX_LAYER_WIDTH: a number of features taken at load was the worker's
    out-of-memory error after the shards started (100,000 features: a 160 GB first layer)."""
    width = dim + (num_sparse + 1) * num_sparse // 2
    if width <= MAX_LAYER_WIDTH:
        return
    most = (math.isqrt(8 * (MAX_LAYER_WIDTH - dim) + 1) - 1) // 2  # the largest F that fits
    rule = f"the top MLP takes dim + (F + 1) F / 2 inputs, at most {MAX_LAYER_WIDTH:,}, the widest layer allowed"
    if most < 1:
        raise ValueError(f"{dim_field}: {dim:,} leaves no room for one feature's dot product ({rule})")
    raise ValueError(
        f"{sparse_field}: must be at most {most:,} with {dim_field} = {dim:,} ({rule}), got {num_sparse:,}"
    )


def _table(data: dict, key: str, where: str) -> dict:
    """The sub-table `key` of `data` ({} when absent); ConfigTypeError naming `where` when it is not one."""
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise ConfigTypeError(f"{where}: must be a table ([{where}]), got {value!r}")
    return value


def _build(cls: type, raw: dict, where: str):
    """build_config, with the dataclass's own checks (__post_init__, which name the field alone)
    under `where` too, and a wrong type as ConfigTypeError."""
    try:
        return build_config(cls, raw, where)
    except ValueError as exc:  # ConfigTypeError included
        message = str(exc)
        if message.startswith(f"{where}."):
            raise
        raise type(exc)(f"{where}.{message}") from None
    except TypeError as exc:  # a dataclass's check meeting a value of a type it did not expect
        raise ConfigTypeError(f"{where}: {exc}") from None


def _check_names(path: str, values: tuple, what: str) -> None:
    """Every entry of list `path` is a non-empty string."""
    for i, value in enumerate(values):
        if not isinstance(value, str):
            raise ConfigTypeError(f"{path}[{i}]: must be {what} (a string), got {value!r}")
        if not value:
            raise ValueError(f"{path}[{i}]: must be {what}, got an empty string")


def _positive(path: str, value: int) -> None:
    if value < 1:
        raise ValueError(f"{path}: must be >= 1, got {value}")
