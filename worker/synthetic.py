"""Synthetic click data: Zipf-distributed keys and labels with a planted, learnable signal.

Global batch t of split s is a pure function of (seed, s, t): its rows come from
`np.random.default_rng([seed, s, t])`, and rank r of W yields rows
[r * B / W, (r + 1) * B / W) of it (`split_rows`), so W ranks together see exactly the global
batches of one process. Every rank draws the whole global batch and keeps its slice.

Per row, for each feature f: a rank k in [0, num_keys) drawn with P(k) ~ (k + 1)^-zipf_alpha,
and key = `keys_from_values(k, f)` (so keys look like hashed Criteo keys and differ across
features). The planted model:

    w(key)  = key_scale * (2 u(key) - 1),  u(key) = mix64(key XOR mix64(seed)) / 2^64 in [0, 1)
    logit   = bias + sum_f w(sparse[:, f]) + (dense - 1) @ v,   v ~ N(0, dense_scale^2 / num_dense)
    label   ~ Bernoulli(sigmoid(logit))

key_scale = signal_std * sqrt(3 / num_sparse), so the sparse part of the logit has std
signal_std. Dense features are log1p of exponential counts (mean about 1), like Criteo's.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from enum import StrEnum

import numpy as np

from worker.batch import Batch, check_rank, split_rows
from worker.data_options import SyntheticConfig
from worker.features import keys_from_values, mix64
from worker.prefetch import prefetched


class Split(StrEnum):
    """Which stream of batches: training, or a held-out set drawn from disjoint random streams."""

    TRAIN = "train"
    EVAL = "eval"


_SPLIT_STREAM = {Split.TRAIN: 0, Split.EVAL: 1}


class SyntheticData:
    """The planted model and global batches of one `SyntheticConfig` (no rank, no position)."""

    def __init__(self, config: SyntheticConfig) -> None:
        if not isinstance(config, SyntheticConfig):
            raise TypeError(f"config: expected SyntheticConfig, got {type(config).__name__}")
        self.config = config
        weights = np.arange(1, config.num_keys + 1, dtype=np.float64) ** -config.zipf_alpha
        self._cdf = np.cumsum(weights / weights.sum())
        self._cdf[-1] = 1.0
        self._weight_salt = mix64(np.array([config.seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))[0]
        self._key_scale = config.signal_std * math.sqrt(3.0 / config.num_sparse)
        rng = np.random.default_rng([config.seed, 2**32 - 1])
        self.dense_weights = rng.normal(
            0.0, config.dense_scale / math.sqrt(max(config.num_dense, 1)), size=config.num_dense
        )

    def num_batches(self, split: Split) -> int:
        return self.config.num_batches if Split(split) is Split.TRAIN else self.config.num_eval_batches

    def key_weights(self, keys: np.ndarray) -> np.ndarray:
        """The hidden weight of each key: keys (...) int64 -> (...) float64."""
        keys = np.asarray(keys, dtype=np.int64)
        u = (mix64(keys.view(np.uint64) ^ self._weight_salt) >> np.uint64(11)).astype(np.float64) * 2.0**-53
        return self._key_scale * (2.0 * u - 1.0)

    def true_logits(self, dense: np.ndarray, sparse: np.ndarray) -> np.ndarray:
        """The planted logit: dense (B, num_dense), sparse (B, num_sparse) int64 -> (B,) float64."""
        dense = np.asarray(dense, dtype=np.float64)
        return self.config.bias + self.key_weights(sparse).sum(axis=1) + (dense - 1.0) @ self.dense_weights

    def global_batch(self, index: int, split: Split = Split.TRAIN, start: int = 0, stop: int | None = None) -> Batch:
        """Rows [start, stop) of global batch `index` of `split` (default: all `global_batch_size`).

        The random draws are made for the whole batch (they are cheap), the work per row (keys,
        labels) only for the rows asked for, so a rank's slice costs its share and has the same
        rows as a slice of the whole batch.
        """
        cfg = self.config
        split = Split(split)
        if not 0 <= index < self.num_batches(split):
            raise ValueError(f"index: must be in [0, {self.num_batches(split)}) for split {split}, got {index}")
        size = cfg.global_batch_size
        stop = size if stop is None else stop
        if not 0 <= start <= stop <= size:
            raise ValueError(f"rows: must satisfy 0 <= start <= stop <= {size}, got [{start}, {stop})")
        rng = np.random.default_rng([cfg.seed & 0xFFFFFFFFFFFFFFFF, _SPLIT_STREAM[split], index])
        ranks = np.searchsorted(self._cdf, rng.random((size, cfg.num_sparse))[start:stop], side="right")
        ranks = np.minimum(ranks, cfg.num_keys - 1).astype(np.uint64)
        sparse = np.empty((stop - start, cfg.num_sparse), dtype=np.int64)
        for f in range(cfg.num_sparse):
            sparse[:, f] = keys_from_values(ranks[:, f], f)
        dense = np.log1p(rng.exponential(2.0, size=(size, cfg.num_dense))[start:stop])
        logits = self.true_logits(dense, sparse)
        labels = (rng.random(size)[start:stop] < 1.0 / (1.0 + np.exp(-logits))).astype(np.float32)
        return Batch.from_numpy(dense, sparse, labels)


class SyntheticReader:
    """Rank `rank` of `world_size`'s batches of one split, with a resumable position.

    >>> reader = SyntheticReader(SyntheticConfig(global_batch_size=512), rank=0, world_size=2)
    >>> [len(batch) for batch in reader][:2]
    [256, 256]
    """

    def __init__(
        self,
        config: SyntheticConfig,
        rank: int = 0,
        world_size: int = 1,
        split: Split = Split.TRAIN,
        prefetch_batches: int = 0,
    ) -> None:
        check_rank(rank, world_size)
        if isinstance(prefetch_batches, bool) or not isinstance(prefetch_batches, int) or prefetch_batches < 0:
            raise ValueError(f"prefetch_batches: must be an int >= 0, got {prefetch_batches!r}")
        if config.global_batch_size % world_size:
            raise ValueError(
                f"global_batch_size: must be divisible by world_size={world_size} so every rank gets "
                f"the same local batch size, got {config.global_batch_size}"
            )
        try:
            self.split = Split(split)
        except ValueError:
            raise ValueError(f"split: must be one of {[s.value for s in Split]}, got {split!r}") from None
        self.data = SyntheticData(config)
        self.config = config
        self.rank = rank
        self.world_size = world_size
        self.prefetch_batches = prefetch_batches
        self._next = 0

    def __len__(self) -> int:
        return self.data.num_batches(self.split)

    def batch(self, index: int) -> Batch:
        """This rank's rows of global batch `index`, independent of the position."""
        start, stop = split_rows(self.config.global_batch_size, self.rank, self.world_size)
        return self.data.global_batch(index, self.split, start, stop)

    def __iter__(self) -> Iterator[Batch]:
        """Yields the batches from the position on; with `prefetch_batches` > 0 they are made ahead
        in a background thread (as the file readers' are), so a trainer that waits on the PS or a
        collective makes its next batch meanwhile. The position moves as batches are yielded."""
        stream = (self.batch(index) for index in range(self._next, len(self)))
        if self.prefetch_batches:
            stream = prefetched(stream, self.prefetch_batches, name="synthetic")
        try:
            for batch in stream:
                self._next += 1
                yield batch
        finally:
            stream.close()

    def state(self) -> dict:
        """{"split", "num_batches"}: batches yielded so far."""
        return {"split": self.split.value, "num_batches": self._next}

    def restore(self, state: dict) -> None:
        if state.get("split") != self.split.value:
            raise ValueError(f"state.split: reader is {self.split.value!r}, state is {state.get('split')!r}")
        position = state.get("num_batches")
        if not isinstance(position, int) or not 0 <= position <= len(self):
            raise ValueError(f"state.num_batches: must be an int in [0, {len(self)}], got {position!r}")
        self._next = position
