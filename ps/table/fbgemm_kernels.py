"""fbgemm's table-batched kernels on the table path: one fused-optimizer call for a group of tables.

    rows of T tables, gathered: words_t (u_t, width)  --copy in-->  TBE weights / optimizer state
    one SplitTableBatchedEmbeddingBagsCodegen forward + backward over all T tables (offsets per
    table, one bag each, non-pooled): fbgemm's fused optimizer moves each row once
    --copy out-->  words_t, scattered back by the caller

Rows stay in the tables' own row stores (their key->row maps, growth, snapshots and change feeds
are untouched); the TBE is a scratch of `capacity` rows per table that fbgemm updates in place.
Tables of one call share the optimizer, its hyper-parameters, dim and device (TBE takes one
optimizer and, non-pooled, one dim). fbgemm fuses three of our optimizers with the same math:

    sgd -> EXACT_SGD, adagrad -> EXACT_ADAGRAD, rowwise_adagrad -> EXACT_ROWWISE_ADAGRAD

(adam's bias correction counts steps per TBE in fbgemm and per row here; ftrl it has not).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ps.table.config import OptimizerConfig, OptimizerKind

if TYPE_CHECKING:  # torch comes with fbgemm_gpu, imported by the calls that need them
    import torch

FUSED_KINDS = (OptimizerKind.SGD, OptimizerKind.ADAGRAD, OptimizerKind.ROWWISE_ADAGRAD)
_MIN_CAPACITY = 1024  # scratch rows per table; grows by doubling


def unavailable_reason() -> str | None:
    """None when fbgemm_gpu's training TBE imports, else why not."""
    try:
        import fbgemm_gpu.split_table_batched_embeddings_ops_training  # noqa: F401
    except ImportError as exc:  # pragma: no cover - the fbgemm extra is installed with the tests
        return f"fbgemm_gpu is not importable ({exc}); install embps[cpu] or embps[cuda]"
    return None


@dataclass(frozen=True)
class GroupKey:
    """What tables of one fbgemm call must share."""

    optimizer: OptimizerConfig
    dim: int
    device: str


class _Scratch:
    """One TBE of `num_tables` tables of `capacity` rows each, on `key.device`."""

    def __init__(self, key: GroupKey, num_tables: int, capacity: int) -> None:
        import torch
        from fbgemm_gpu.split_embedding_configs import EmbOptimType
        from fbgemm_gpu.split_table_batched_embeddings_ops_common import PoolingMode
        from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
            ComputeDevice,
            EmbeddingLocation,
            SplitTableBatchedEmbeddingBagsCodegen,
        )

        optim = {
            OptimizerKind.SGD: EmbOptimType.EXACT_SGD,
            OptimizerKind.ADAGRAD: EmbOptimType.EXACT_ADAGRAD,
            OptimizerKind.ROWWISE_ADAGRAD: EmbOptimType.EXACT_ROWWISE_ADAGRAD,
        }[key.optimizer.kind]
        cuda = key.device.startswith("cuda")
        location = EmbeddingLocation.DEVICE if cuda else EmbeddingLocation.HOST
        compute = ComputeDevice.CUDA if cuda else ComputeDevice.CPU
        self.capacity = capacity
        self.num_tables = num_tables
        self.tbe = SplitTableBatchedEmbeddingBagsCodegen(
            [(capacity, key.dim, location, compute)] * num_tables,
            optimizer=optim,
            learning_rate=key.optimizer.lr,
            eps=key.optimizer.eps,
            pooling_mode=PoolingMode.NONE,
            device=torch.device(key.device) if cuda else None,
        )
        self.weights = self.tbe.split_embedding_weights()  # T views (capacity, dim) into the TBE
        states = self.tbe.split_optimizer_states() if key.optimizer.kind != OptimizerKind.SGD else []
        self.states = [s[0].view(capacity, -1) for s in states]  # T views (capacity, state words)
        self.lock = threading.Lock()


class FbgemmKernels:
    """Runs the optimizer step of a group of tables as one fbgemm call (see the module docstring).

    Holds one scratch TBE per GroupKey, of as many tables as its largest call (a call of fewer
    gives the rest empty bags), grown (doubling) when a push has more rows for one table than it
    holds: T x capacity x (dim + state words) float32, e.g. 26 tables x 16,384 rows x 65 words =
    111 MB for pushes of up to 16,384 keys a table. (One per number of tables, as before, kept
    about T / 2 times that when the tables of a push varied.)
    """

    def __init__(self) -> None:
        self._scratch: dict[GroupKey, _Scratch] = {}
        self._lock = threading.Lock()

    def apply(self, key: GroupKey, words: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> None:
        """One optimizer step in place on the gathered rows of T tables.

        words[t] (u_t, >= dim + state words) float32: [value | state] of table t's u_t unique rows
        (columns past them untouched); grads[t] (u_t, dim) float32: each row's summed gradient.
        Every tensor on key.device.
        """
        import torch

        sizes = [int(w.shape[0]) for w in words]
        total = sum(sizes)
        if total == 0:
            return
        scratch = self._get(key, len(words), max(sizes))
        dim = key.dim
        device = words[0].device
        with scratch.lock:
            for t, w in enumerate(words):
                scratch.weights[t][: sizes[t]].copy_(w[:, :dim])
                if scratch.states:
                    width = scratch.states[t].shape[1]
                    scratch.states[t][: sizes[t]].copy_(w[:, dim : dim + width])
            # Table t's rows are scratch rows 0..u_t - 1: one bag per table, non-pooled.
            indices = torch.cat([torch.arange(n, dtype=torch.int64, device=device) for n in sizes])
            bags = sizes + [0] * (scratch.num_tables - len(sizes))  # the scratch's other tables: empty bags
            offsets = torch.tensor([0, *torch.tensor(bags).cumsum(0).tolist()], dtype=torch.int64, device=device)
            out = scratch.tbe(indices, offsets)
            out.backward(torch.cat(list(grads)).to(out.dtype))
            for t, w in enumerate(words):
                w[:, :dim].copy_(scratch.weights[t][: sizes[t]])
                if scratch.states:
                    width = scratch.states[t].shape[1]
                    w[:, dim : dim + width].copy_(scratch.states[t][: sizes[t]])

    def _get(self, key: GroupKey, num_tables: int, rows: int) -> _Scratch:
        with self._lock:
            scratch = self._scratch.get(key)
            if scratch is None or scratch.capacity < rows or scratch.num_tables < num_tables:
                capacity = max(_MIN_CAPACITY, 1 << (rows - 1).bit_length())
                if scratch is not None:
                    capacity, num_tables = max(capacity, scratch.capacity), max(num_tables, scratch.num_tables)
                scratch = _Scratch(key, num_tables, capacity)
                self._scratch[key] = scratch
            return scratch


KERNELS = FbgemmKernels()  # shared by the tables of a process: one scratch per group shape
