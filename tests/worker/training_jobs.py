"""Small training jobs for tests: a PS job on free loopback ports plus [train]/[model]/[data]."""

from __future__ import annotations

import base64
import io
import json
from dataclasses import replace
from pathlib import Path

import torch

from ps import toml_writer
from ps.job_config import JobConfig, SnapshotConfig, dump_job_config
from ps.table.config import OptimizerConfig, OptimizerKind, TableConfig
from tests.helpers.processes import make_job
from worker.model import DLRMDenseTower
from worker.train_config import TrainingJob
from worker.trainer import make_dense_optimizer

# One table per sparse feature, each with another sparse optimizer: one run checks all five.
OPTIMIZER_TABLES = [
    TableConfig(name="sgd", dim=8, init_scale=0.1, seed=1, optimizer=OptimizerConfig(kind=OptimizerKind.SGD, lr=0.5)),
    TableConfig(
        name="adagrad",
        dim=8,
        init_scale=0.1,
        seed=2,
        optimizer=OptimizerConfig(kind=OptimizerKind.ADAGRAD, lr=0.2, initial_accumulator=0.1),
    ),
    TableConfig(
        name="rowwise",
        dim=8,
        init_scale=0.1,
        seed=3,
        optimizer=OptimizerConfig(kind=OptimizerKind.ROWWISE_ADAGRAD, lr=0.2),
    ),
    TableConfig(
        name="adam",
        dim=8,
        init_scale=0.1,
        seed=4,
        optimizer=OptimizerConfig(kind=OptimizerKind.ADAM, lr=0.05, beta1=0.8, beta2=0.95, eps=1e-6),
    ),
    TableConfig(
        name="ftrl",
        dim=8,
        init_scale=0.1,
        seed=5,
        optimizer=OptimizerConfig(kind=OptimizerKind.FTRL, lr=0.5, l1=0.001, l2=0.01),
    ),
]

# float16 and int8 rows (row-wise Adagrad), checked against tests/ps/reference_codec.py.
LOW_PRECISION_TABLES = [
    TableConfig(
        name=storage,
        dim=8,
        init_scale=0.1,
        seed=seed,
        storage=storage,
        optimizer=OptimizerConfig(kind=OptimizerKind.ROWWISE_ADAGRAD, lr=0.2),
    )
    for storage, seed in (("int8", 6), ("float16", 7))
]


def training_toml(ps: JobConfig, train: dict, model: dict, data: dict, synthetic: dict) -> str:
    sections = [("train", train), ("model", model), ("data", data), (("data", "synthetic"), synthetic)]
    return dump_job_config(ps) + "\n" + toml_writer.document(toml_writer.table(path, v) for path, v in sections)


def write_training_job(
    path: Path,
    tables: list[TableConfig],
    num_shards: int,
    train: dict,
    synthetic: dict,
    model: dict | None = None,
    job: str = "train-test",
    snapshot: SnapshotConfig | None = None,
) -> tuple[Path, JobConfig]:
    ps = replace(make_job(tables=tables, num_shards=num_shards, job=job), snapshot=snapshot)
    path.write_text(
        training_toml(ps, train, model or {"bottom_sizes": [8], "top_sizes": [16]}, {"source": "synthetic"}, synthetic)
    )
    return path, ps


def trainer_extras(job: TrainingJob, world_size: int, step: int) -> dict[str, bytes]:
    """The extra files a training snapshot of `job` holds at `step` (worker/checkpoint.py): the
    job's dense tower, untrained, its dense optimizer's state, and a trainer state of `world_size`
    workers that read nothing (with this process's torch RNG state)."""
    model = DLRMDenseTower(job.model)
    dense = io.BytesIO()
    optimizer = make_dense_optimizer(job, model.parameters())
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, dense)
    rng = base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()
    state = {"step": step, "world_size": world_size, "readers": [None] * world_size, "torch_rng": rng}
    return {"dense.pt": dense.getvalue(), "trainer_state.json": json.dumps(state).encode()}
