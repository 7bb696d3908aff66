"""Single-process reference of a sync training job: plain torch, the same global batches, the
same math, embeddings in per-key reference rows (tests/ps/reference_optim.py; float16 and int8
tables: tests/ps/reference_codec.py, with the same rounding)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ps.table.config import Storage, TableConfig
from ps.table.embedding_table import EmbeddingTable
from tests.ps.reference_codec import LowPrecisionReference
from tests.ps.reference_optim import ReferenceTable
from worker.model import DLRMDenseTower
from worker.synthetic import SyntheticData
from worker.train_config import DenseOptimizer, TrainingJob


class LowPrecisionRows:
    """ReferenceTable's interface over a float16 or int8 table's reference: lookup(key) -> row,
    step(keys, grads) with the job's step numbers 1, 2, ... (the rounding streams), init(keys)."""

    def __init__(self, config: TableConfig) -> None:
        o = config.optimizer
        if str(o.kind) not in ("sgd", "rowwise_adagrad") or o.initial_accumulator:
            raise ValueError("the low-precision reference has sgd and row-wise Adagrad from a zero accumulator")
        self.init = EmbeddingTable(config).init_values
        self.rows = LowPrecisionReference(str(config.storage), str(o.kind), o.lr, o.eps, config.seed, self.init)
        self.steps = 0

    def lookup(self, key: int) -> torch.Tensor:
        return torch.from_numpy(self.rows.lookup(np.array([key], dtype=np.int64))[0])

    def step(self, keys: np.ndarray, grads: np.ndarray) -> None:
        self.steps += 1
        self.rows.step(keys, grads, self.steps)


def reference_table(config: TableConfig) -> ReferenceTable | LowPrecisionRows:
    if Storage(config.storage) != Storage.FLOAT32:
        return LowPrecisionRows(config)
    return ReferenceTable(config.optimizer, config.dim, EmbeddingTable(config).init_values)


def _expire(table: ReferenceTable, last: dict[int, int], keys: np.ndarray, step: int, ttl: int | None) -> None:
    """Rows of `keys` last stepped more than ttl steps before `step` start again from their init
    (eviction.ttl_steps as a lookup or push of that step finds them)."""
    if ttl is None:
        return
    for key in keys.tolist():
        if key in last and step - last[key] > ttl:
            del table.rows[key], last[key]


def train_reference(
    job: TrainingJob,
) -> tuple[nn.Module, dict[str, ReferenceTable | LowPrecisionRows], dict[str, set[int]]]:
    """Returns the trained dense tower, the reference table per name, and the keys each table saw;
    the rows as a lookup for the last step reads them (rows past a TTL then read as their init)."""
    model = DLRMDenseTower(job.model)
    lr = job.train.dense_lr
    optimizer = {
        DenseOptimizer.ADAM: torch.optim.Adam,
        DenseOptimizer.ADAGRAD: torch.optim.Adagrad,
        DenseOptimizer.SGD: torch.optim.SGD,
    }[job.train.dense_optimizer](model.parameters(), lr=lr)
    configs = {t.name: t for t in job.ps.tables}
    tables = {name: reference_table(configs[name]) for name in set(job.feature_tables())}
    seen: dict[str, set[int]] = {name: set() for name in tables}
    ttl = {name: configs[name].eviction.ttl_steps for name in tables}
    if any(v is not None for n, v in ttl.items() if not isinstance(tables[n], ReferenceTable)):
        raise ValueError("the reference expires rows of float32 tables only")
    last_step: dict[str, dict[int, int]] = {name: {} for name in tables}
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
            _expire(tables[name], last_step[name], keys, t + 1, ttl[name])  # the job's steps are 1, 2, ...
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
            last_step[name].update(dict.fromkeys(keys.tolist(), t + 1))
    for name, keys in seen.items():
        _expire(tables[name], last_step[name], np.array(sorted(keys), dtype=np.int64), job.train.steps, ttl[name])
    return model, tables, seen
