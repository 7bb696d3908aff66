"""The one batch type every reader yields, and how a global batch is split across ranks."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch


@dataclass(frozen=True)
class Batch:
    """B samples with `num_dense` dense features and F single-valued categorical features.

    ```
                 dense (B, num_dense)        sparse (B, F)                   labels (B,)
                 float32 torch, transformed  int64 numpy keys                float32 torch
                 +------+------+-----+       +--------+--------+-----+       +-----+
      sample 0   | 0.69 | 2.30 | ... |       | k(0,a) | k(1,b) | ... |       | 1.0 |
      sample 1   | 0.00 | 1.10 | ... |       | k(0,c) | m(1)   | ... |       | 0.0 |
      ...        +------+------+-----+       +--------+--------+-----+       +-----+
    ```

    `sparse[i, f]` is the key of sample i's value of feature f (column f is feature f, one key
    per cell, `m(f)` the feature's missing key; see worker/features.py). Keys go to the PS as
    numpy, so `sparse` stays numpy; `dense` and `labels` feed the dense tower, so they are
    torch. A batch may be empty (B = 0): see `split_rows`.
    """

    dense: torch.Tensor
    sparse: np.ndarray
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if not isinstance(self.dense, torch.Tensor) or self.dense.dtype != torch.float32:
            raise TypeError(f"dense: expected a float32 torch tensor, got {_describe(self.dense)}")
        if not isinstance(self.labels, torch.Tensor) or self.labels.dtype != torch.float32:
            raise TypeError(f"labels: expected a float32 torch tensor, got {_describe(self.labels)}")
        if not isinstance(self.sparse, np.ndarray) or self.sparse.dtype != np.int64:
            raise TypeError(f"sparse: expected an int64 numpy array, got {_describe(self.sparse)}")
        if self.dense.ndim != 2 or self.sparse.ndim != 2 or self.labels.ndim != 1:
            raise ValueError(
                f"dense (B, num_dense), sparse (B, F), labels (B,): got shapes {tuple(self.dense.shape)}, "
                f"{self.sparse.shape}, {tuple(self.labels.shape)}"
            )
        sizes = {self.dense.shape[0], self.sparse.shape[0], self.labels.shape[0]}
        if len(sizes) != 1:
            raise ValueError(
                f"dense, sparse, labels: must have the same batch size B, got {self.dense.shape[0]}, "
                f"{self.sparse.shape[0]}, {self.labels.shape[0]}"
            )

    @property
    def batch_size(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_dense(self) -> int:
        return int(self.dense.shape[1])

    @property
    def num_sparse(self) -> int:
        return int(self.sparse.shape[1])

    def __len__(self) -> int:
        return self.batch_size

    @staticmethod
    def from_numpy(dense: np.ndarray, sparse: np.ndarray, labels: np.ndarray) -> Batch:
        """dense (B, num_dense), sparse (B, F) int64, labels (B,) -> Batch (dense/labels as float32)."""
        return Batch(
            dense=torch.from_numpy(np.ascontiguousarray(dense, dtype=np.float32)),
            sparse=np.ascontiguousarray(sparse, dtype=np.int64),
            labels=torch.from_numpy(np.ascontiguousarray(labels, dtype=np.float32)),
        )

    @staticmethod
    def cat(batches: Sequence[Batch]) -> Batch:
        """Concatenates batches along B, in order (e.g. the ranks' parts of one global batch)."""
        if not batches:
            raise ValueError("batches: need at least one batch to concatenate")
        return Batch(
            dense=torch.cat([b.dense for b in batches]),
            sparse=np.concatenate([b.sparse for b in batches]),
            labels=torch.cat([b.labels for b in batches]),
        )

    def slice(self, start: int, stop: int) -> Batch:
        """Rows [start, stop) as a new batch (copies, so the parent can be freed)."""
        return Batch(
            dense=self.dense[start:stop].clone(),
            sparse=self.sparse[start:stop].copy(),
            labels=self.labels[start:stop].clone(),
        )


class BatchReader(Protocol):
    """What the trainer needs from any reader: iterate, and save/restore the position.

    `state()` is the position after the last batch the iterator yielded; a new reader with the
    same arguments that calls `restore(state)` yields exactly the batches that would have come
    next. The dict holds only JSON-serialisable values.
    """

    def __iter__(self) -> object: ...

    def state(self) -> dict: ...

    def restore(self, state: dict) -> None: ...


def check_rank(rank: int, world_size: int) -> None:
    """Raises ValueError unless 0 <= rank < world_size."""
    if world_size < 1:
        raise ValueError(f"world_size: must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank: must be in [0, world_size={world_size}), got {rank}")


def split_rows(num_rows: int, rank: int, world_size: int) -> tuple[int, int]:
    """The rows [start, stop) of a global batch of `num_rows` that rank `rank` of `world_size` owns.

    start = rank * num_rows // world_size: for a full batch (num_rows divisible by world_size)
    every rank gets num_rows / world_size rows; concatenating ranks 0..W-1 gives the global batch
    back. A short last batch may leave a rank with an empty batch, so every rank still takes the
    same number of steps (collectives stay matched).
    """
    check_rank(rank, world_size)
    return rank * num_rows // world_size, (rank + 1) * num_rows // world_size


def _describe(value: object) -> str:
    dtype = getattr(value, "dtype", None)
    return f"{type(value).__name__} of {dtype}" if dtype is not None else type(value).__name__
