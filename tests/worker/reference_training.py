"""Single-process reference of a sync training job: plain torch, the same global batches, the
same math, embeddings in per-key reference rows (tests/ps/reference_optim.py)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ps.table.embedding_table import EmbeddingTable
from tests.ps.reference_optim import ReferenceTable
from worker.model import DLRMDenseTower
from worker.synthetic import SyntheticData
from worker.train_config import DenseOptimizer, TrainingJob


def train_reference(job: TrainingJob) -> tuple[nn.Module, dict[str, ReferenceTable], dict[str, set[int]]]:
    """Returns the trained dense tower, the reference table per name, and the keys each table saw."""
    model = DLRMDenseTower(job.model)
    lr = job.train.dense_lr
    optimizer = {
        DenseOptimizer.ADAM: torch.optim.Adam,
        DenseOptimizer.ADAGRAD: torch.optim.Adagrad,
        DenseOptimizer.SGD: torch.optim.SGD,
    }[job.train.dense_optimizer](model.parameters(), lr=lr)
    configs = {t.name: t for t in job.ps.tables}
    tables = {
        name: ReferenceTable(configs[name].optimizer, configs[name].dim, EmbeddingTable(configs[name]).init_values)
        for name in set(job.feature_tables())
    }
    seen: dict[str, set[int]] = {name: set() for name in tables}
    data = SyntheticData(job.data.synthetic)
    feature_tables = job.feature_tables()
    for t in range(job.train.steps):
        batch = data.global_batch(t)
        columns = []
        leaves = {}
        for f, name in enumerate(feature_tables):
            keys = batch.sparse[:, f]
            seen[name].update(keys.tolist())
            columns.append((name, keys))
        for name in tables:
            keys = np.unique(np.concatenate([k for n, k in columns if n == name]))
            rows = torch.stack([tables[name].lookup(int(k)) for k in keys]).detach().clone().requires_grad_(True)
            leaves[name] = (keys, rows)
        parts = []
        for name, keys in columns:
            all_keys, rows = leaves[name]
            parts.append(rows[torch.from_numpy(np.searchsorted(all_keys, keys))])
        embeddings = torch.stack(parts, dim=1)
        logits = model(batch.dense, embeddings)
        loss = nn.functional.binary_cross_entropy_with_logits(logits, batch.labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        for name, (keys, rows) in leaves.items():
            tables[name].step(keys, rows.grad.numpy())
    return model, tables, seen
