"""The TorchRec peer of `embps bench train --peer torchrec`: the same model on the same data, the
way a TorchRec user would train it on this machine.

One process per rank (`python -m bench.torchrec_peer --config JOB.toml --out RESULT.json`, with
RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set): an EmbeddingBagCollection of one table per
feature (sum pooling over one key per sample, so each pooled vector is the key's row), sharded
table-wise by DistributedModelParallel over gloo, with fbgemm's fused row-wise Adagrad applied
in the backward (`apply_optimizer_in_backward`, the table's lr and eps); the same DLRMDenseTower
under DDP with the job's dense optimizer. Batches are the job's synthetic ones (this rank's
slice), made inside the timed loop as embps's trainer makes them; TorchRec tables are arrays, so
a key is hashed into its table's rows as key % rows (rows = the synthetic vocabulary per feature),
as TorchRec users hash raw ids. The processes get the glibc malloc settings of embps's workers
(ps/process/malloc.py), as the in-process run does: all three train the same dense tower.

TorchRec is not a dependency of embps: its wheel requires fbgemm-gpu (the CUDA build) where we
install fbgemm-gpu-cpu, so it is installed with --no-deps into a folder of its own
(`make torchrec`), which the bench puts on PYTHONPATH for these processes only.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ps.process.malloc import tune_malloc_here


def feature_rows(job) -> np.ndarray:
    """(F,) int64: the rows of each sparse feature's TorchRec table, which its keys fold into (key
    mod rows). A table shared by k features holds k x num_keys rows in embps (each feature's keys
    are its own); TorchRec's gets as many, else the shared shape trained a table k times smaller."""
    features = job.feature_tables()
    return np.array([job.data.synthetic.num_keys * features.count(t) for t in features], dtype=np.int64)


def _model(job, device: torch.device) -> tuple[nn.Module, list[str]]:
    from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    from worker.model import DLRMDenseTower

    tables = {t.name: t for t in job.ps.tables}
    features = job.feature_tables()
    rows = feature_rows(job)
    configs = [
        EmbeddingBagConfig(
            name=name,
            embedding_dim=tables[name].dim,
            num_embeddings=int(rows[features.index(name)]),
            feature_names=[f"f{i}" for i, t in enumerate(features) if t == name],
            pooling=PoolingType.SUM,
        )
        for name in dict.fromkeys(features)
    ]

    class PeerModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ebc = EmbeddingBagCollection(tables=configs, device=torch.device("meta"))
            self.tower = DLRMDenseTower(job.model)

        def forward(self, dense: torch.Tensor, sparse) -> torch.Tensor:
            pooled = self.ebc(sparse).to_dict()
            embeddings = torch.stack([pooled[f"f{i}"] for i in range(len(features))], dim=1)
            return self.tower(dense, embeddings)

    return PeerModel(), [f"f{i}" for i in range(len(features))]


def run(config_path: Path, out: Path) -> None:
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
    from torchrec.distributed.types import ShardingType
    from torchrec.optim import RowWiseAdagrad
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
    from torchrec.optim.optimizers import in_backward_optimizer_filter
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from worker.data_sources import train_reader
    from worker.train_config import load_training_job
    from worker.trainer import make_dense_optimizer

    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    dist.init_process_group("gloo")
    job = load_training_job(config_path)
    device = torch.device("cpu")
    model, feature_names = _model(job, device)
    optimizer = job.ps.tables[0].optimizer
    apply_optimizer_in_backward(RowWiseAdagrad, model.ebc.parameters(), {"lr": optimizer.lr, "eps": optimizer.eps})
    constraints = {t.name: ParameterConstraints(sharding_types=[ShardingType.TABLE_WISE.value]) for t in job.ps.tables}
    planner = EmbeddingShardingPlanner(
        topology=Topology(world_size=world_size, compute_device="cpu"), constraints=constraints
    )
    sharders = [EmbeddingBagCollectionSharder()]
    plan = planner.collective_plan(model, sharders, dist.GroupMember.WORLD)
    dmp = DistributedModelParallel(module=model, device=device, plan=plan, sharders=sharders)
    dense = make_dense_optimizer(job, dict(in_backward_optimizer_filter(dmp.named_parameters())).values())

    rows = feature_rows(job)
    reader = iter(train_reader(job, rank, world_size))

    def inputs(batch):
        values = torch.from_numpy(np.ascontiguousarray((batch.sparse % rows).T).reshape(-1))
        lengths = torch.ones(values.shape[0], dtype=torch.int32)
        return batch.dense, KeyedJaggedTensor(keys=feature_names, values=values, lengths=lengths), batch.labels

    steps = job.train.steps
    dist.barrier()
    start = time.perf_counter()
    losses = []
    for _ in range(steps):
        dense_x, sparse, labels = inputs(next(reader))
        logits = dmp(dense_x, sparse)
        loss = nn.functional.binary_cross_entropy_with_logits(logits, labels)
        dense.zero_grad(set_to_none=True)
        loss.backward()
        dense.step()
        losses.append(float(loss.detach()))
    dist.barrier()
    elapsed = time.perf_counter() - start
    if rank == 0:
        result = {
            "samples_per_s": steps * job.train.batch_size / elapsed,
            "seconds": elapsed,
            "final_loss": float(np.mean(losses[-10:])),
            "sharding": {name: f"{p.sharding_type}/{p.compute_kernel}" for name, p in plan.plan["ebc"].items()},
        }
        out.write_text(json.dumps(result))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench.torchrec_peer", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, type=Path, help="the bench's job TOML")
    parser.add_argument("--out", required=True, type=Path, help="rank 0 writes its result here (JSON)")
    args = parser.parse_args()
    # The same glibc malloc settings as embps's workers (ps/process/malloc.py): the dense tower is
    # the same, and so should its page faults be; the comparison is of the embedding paths.
    tune_malloc_here()
    run(args.config, args.out)


if __name__ == "__main__":
    main()
