"""Whether a job, as its file says now, can go on from a training snapshot (`embps launch --resume`).

A job resumed after a change to its shape (train.workers, a table's dim, [model] or the data's
widths), its dense optimizer or a table's capacity, or from a snapshot without the trainer's files,
passes every load-time check, and failed only once the shards and workers had started: each worker
on load_state_dict's size mismatch, the reader positions of another worker count, another
optimizer's state or the missing files, each shard on a table's dim or its capacity, and the
launcher spent every restart on it. The launcher runs `check_resumable` on the step it restores
from before anything starts; the workers run `check_dense_state` and `check_dense_optimizer` too,
before loading the dense tower. Cheap: the manifests, the trainer state and the dense tower
(small), never a table's files.
"""

from __future__ import annotations

import io
import json
import math
import re
from collections.abc import Mapping

import torch

from ps.shard.snapshot_service import check_capacity, check_fits
from ps.snapshot.files import Snapshot, snapshot_chain
from ps.snapshot.manifest import SnapshotCorruptError
from worker.model import DLRMDenseTower
from worker.train_config import DataSource, DenseOptimizer, TrainingJob

DENSE = "dense.pt"
TRAINER_STATE = "trainer_state.json"

_LINEAR = re.compile(r"(bottom|top)\.(\d+)\.weight")

# A key of the param groups in the state_dict of each dense optimizer (worker/trainer.py
# make_dense_optimizer: torch.optim.Adam, Adagrad, SGD) that the other two lack, in torch 2.x.
_GROUP_KEY = {DenseOptimizer.ADAM: "betas", DenseOptimizer.ADAGRAD: "lr_decay", DenseOptimizer.SGD: "momentum"}


def check_resumable(job: TrainingJob, snapshot: Snapshot, extras: Mapping[str, bytes], world_size: int) -> None:
    """ValueError naming the field (train.workers, train.dense_optimizer, shards, tables.<name>.dim,
    tables.<name>.capacity, model.bottom_sizes, model.top_sizes, data[.synthetic].num_dense /
    num_sparse) when `job`, run by `world_size` workers in all, cannot go on from `snapshot`, or
    naming --resume when the snapshot has no trainer's files (one of the PS alone); `extras` are its
    extra files, read and verified. SnapshotCorruptError when the trainer's files do not parse."""
    step = snapshot.manifest.step
    missing = [f"extra/{name}" for name in (DENSE, TRAINER_STATE) if name not in extras]
    if missing:
        config = job.ps.snapshot
        raise ValueError(
            f"--resume: snapshot step {step} of job {job.ps.job!r} holds no trainer state ({', '.join(missing)} "
            f"missing under {config.uri if config else 'its uri'}): it was written without a training job (a "
            "snapshot of the PS alone), and a training job goes on from its dense tower, optimizer and readers"
        )
    if job.ps.snapshot is not None:
        chain = snapshot_chain(job.ps.snapshot.uri, job.ps.job, step, job.ps.snapshot.storage)
    else:
        chain = [snapshot]
    check_fits(job.ps, chain, step)
    check_capacity(job.ps, chain, step)
    if TRAINER_STATE in extras:
        try:
            saved = json.loads(extras[TRAINER_STATE])["world_size"]
        except (ValueError, TypeError, KeyError) as exc:
            raise SnapshotCorruptError(f"snapshot step {step}: extra/{TRAINER_STATE} does not parse: {exc!r}") from None
        if saved != world_size:
            workers = f"{saved} worker{'s' * (saved != 1)}"
            raise ValueError(
                f"train.workers: snapshot step {step} was taken by {workers} in all, this run has {world_size}; "
                "a worker's reader position cannot pass to another worker count"
            )
    if DENSE in extras:
        try:
            dense = torch.load(io.BytesIO(extras[DENSE]), map_location="cpu", weights_only=True)
            state, optimizer = dense["model"], dense["optimizer"]
        except Exception as exc:  # torch's unpickler raises what its input makes it raise
            raise SnapshotCorruptError(f"snapshot step {step}: extra/{DENSE} does not load: {exc!r}") from None
        check_dense_state(job, step, state)
        check_dense_optimizer(job, step, optimizer)


def check_dense_optimizer(job: TrainingJob, step: int, state: object) -> None:
    """ValueError naming train.dense_optimizer when snapshot `step`'s dense optimizer state (its
    state_dict) is another kind's than the job's: torch's load_state_dict takes it (and its param
    groups' hyperparameters) into any optimizer, which then failed on its first step (SGD on Adam's
    groups: KeyError 'momentum'). A state whose kind it cannot tell is not judged."""
    groups = state.get("param_groups") if isinstance(state, Mapping) else None
    if not isinstance(groups, list) or not groups or not isinstance(groups[0], Mapping):
        return
    kinds = [kind for kind, key in _GROUP_KEY.items() if key in groups[0]]
    want = job.train.dense_optimizer
    if len(kinds) == 1 and kinds[0] != want:
        raise ValueError(
            f"train.dense_optimizer: {want} in the job, {kinds[0]} in snapshot step {step} (its dense optimizer's "
            "state): a resumed job keeps the optimizer it was trained with"
        )


def check_dense_state(job: TrainingJob, step: int, state: Mapping[str, torch.Tensor]) -> None:
    """ValueError naming the field whose change makes the dense tower of snapshot `step` (its
    state_dict) another shape than the job's, else that of the job's [model] when the two differ
    otherwise."""
    expected = _expected_shapes(job)
    shapes = {name: tuple(value.shape) for name, value in state.items()}
    if shapes == expected:
        return
    have, want = _widths(shapes), _widths(expected)
    if have is not None and want is not None:
        for field, job_value, snapshot_value in _fields(job, want, have):
            if job_value != snapshot_value:
                raise ValueError(
                    f"{field}: {job_value} in the job, {snapshot_value} in snapshot step {step} (its dense tower): "
                    "a resumed job keeps the model it was trained with"
                )
    raise ValueError(
        f"model: snapshot step {step}'s dense tower does not fit the job's [model] (parameters "
        f"{_describe(shapes)}, the job's {_describe(expected)}): a resumed job keeps the model it was trained with"
    )


def _expected_shapes(job: TrainingJob) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of the tower the workers build (worker/model.py), on the meta device: no memory."""
    with torch.device("meta"):
        model = DLRMDenseTower(job.model)
    return {name: tuple(value.shape) for name, value in model.state_dict().items()}


def _widths(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, list[int]] | None:
    """Each MLP's widths [in, hidden..., out] from a DLRMDenseTower's parameter shapes; None when
    they are not such a tower's."""
    layers: dict[str, list[tuple[int, tuple[int, ...]]]] = {"bottom": [], "top": []}
    for name, shape in shapes.items():
        if (match := _LINEAR.fullmatch(name)) and len(shape) == 2:
            layers[match[1]].append((int(match[2]), shape))
    if not all(layers.values()):
        return None
    widths = {}
    for mlp, found in layers.items():
        found.sort()
        widths[mlp] = [found[0][1][1], *(shape[0] for _, shape in found)]
    return widths


def _fields(job: TrainingJob, want: dict[str, list[int]], have: dict[str, list[int]]) -> list[tuple[str, str, str]]:
    """(field, the job's value, the snapshot's) for each field that sets a width of the tower, in
    the order a difference is blamed on: the dim and the data's widths before the layers they feed."""
    data = "data.synthetic" if job.data.source == DataSource.SYNTHETIC else "data"
    table = job.train.tables[0]
    dim = have["bottom"][-1]
    pairs = have["top"][0] - dim  # the top MLP takes [x (dim), (F + 1) F / 2 dot products]
    features = (math.isqrt(8 * pairs + 1) - 1) // 2 if pairs >= 0 else -1
    fits = features >= 0 and features * (features + 1) // 2 == pairs
    sparse = str(features) if fits else f"a top MLP of {pairs + dim} inputs"
    return [
        (f"tables.{table}.dim", str(want["bottom"][-1]), str(dim)),
        (f"{data}.num_dense", str(want["bottom"][0]), str(have["bottom"][0])),
        ("model.bottom_sizes", str(want["bottom"][1:-1]), str(have["bottom"][1:-1])),
        (f"{data}.num_sparse", str(job.num_sparse), sparse),
        ("model.top_sizes", str(want["top"][1:-1]), str(have["top"][1:-1])),
    ]


def _describe(shapes: Mapping[str, tuple[int, ...]]) -> str:
    return ", ".join(f"{name} {list(shape)}" for name, shape in shapes.items()) or "none"
