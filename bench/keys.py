"""Key streams for benchmarks: uniform or bounded Zipf over a fixed set of num_rows keys."""

from __future__ import annotations

import numpy as np

from ps import native


def key_of_rank(ranks: np.ndarray) -> np.ndarray:
    """Rank r (0 = most frequent) -> a 64-bit key spread over the whole int64 range."""
    return native.mix64(ranks.astype(np.int64)).view(np.int64)


class ZipfSampler:
    """Draws ranks in [0, num_rows) with P(r) proportional to 1 / (r + 1)^alpha (bounded Zipf).

    Inverse-CDF sampling on a precomputed table: (num_rows,) float64, 80 MB for 10M rows.
    """

    def __init__(self, num_rows: int, alpha: float, seed: int = 0) -> None:
        if num_rows <= 0:
            raise ValueError(f"num_rows: must be > 0, got {num_rows}")
        if alpha < 0:
            raise ValueError(f"alpha: must be >= 0, got {alpha}")
        weights = np.arange(1, num_rows + 1, dtype=np.float64) ** -alpha
        self._cdf = np.cumsum(weights)
        self._cdf /= self._cdf[-1]
        self._rng = np.random.default_rng(seed)

    def ranks(self, size: int) -> np.ndarray:
        return np.searchsorted(self._cdf, self._rng.random(size), side="right").astype(np.int64)

    def keys(self, size: int) -> np.ndarray:
        return key_of_rank(self.ranks(size))
