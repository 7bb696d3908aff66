"""fbgemm's CPU kernels on the same workload, so `bench table` shows which kernel is faster here.

Measures fbgemm's TBE (SplitTableBatchedEmbeddingBagsCodegen, non-pooled, host memory) forward,
and forward plus its fused row-wise Adagrad backward. Returns None (with the reason) when the
fbgemm extra is not installed.
"""

from __future__ import annotations

import time

import numpy as np
import torch


def fbgemm_cpu_rates(rows: int, dim: int, batch: int, batches: int, seed: int = 0) -> dict[str, float] | str:
    try:
        from fbgemm_gpu.split_embedding_configs import EmbOptimType
        from fbgemm_gpu.split_table_batched_embeddings_ops_common import PoolingMode
        from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
            ComputeDevice,
            EmbeddingLocation,
            SplitTableBatchedEmbeddingBagsCodegen,
        )
    except ImportError as exc:
        return f"fbgemm_gpu not importable: {exc}"
    tbe = SplitTableBatchedEmbeddingBagsCodegen(
        [(rows, dim, EmbeddingLocation.HOST, ComputeDevice.CPU)],
        optimizer=EmbOptimType.EXACT_ROWWISE_ADAGRAD,
        learning_rate=0.01,
        pooling_mode=PoolingMode.NONE,
    )
    rng = np.random.default_rng(seed)
    offsets = torch.arange(batch + 1, dtype=torch.int64)
    index_batches = [torch.from_numpy(rng.integers(0, rows, batch)) for _ in range(batches + 1)]
    rates: dict[str, float] = {}
    for name, train in (("fbgemm_forward_rows_per_s", False), ("fbgemm_rowwise_adagrad_rows_per_s", True)):
        for i, indices in enumerate(index_batches):
            if i == 1:
                start = time.perf_counter()
            out = tbe(indices, offsets)
            if train:
                out.backward(torch.full_like(out, 1e-3))
        rates[name] = batch * batches / (time.perf_counter() - start)
    return rates
