"""A log-bucketed latency histogram with a fixed relative error, mergeable across processes.

Bucket i holds the values v with gamma^(i-1) < v / floor <= gamma^i, gamma = (1 + a) / (1 - a),
a = `relative_error` (default 1%). A bucket is reported as 2 gamma^i / (gamma + 1) * floor, which
is within a relative `a` of every value in it (the DDSketch construction). Hence:

    percentile(q) is within a relative `relative_error` of the nearest-rank q-th percentile
    (numpy's `method="inverted_cdf"`) of the recorded values, for values in [floor, ceiling];
    values below `floor` read as `floor`, values above `ceiling` land in the last bucket and are
    bounded by the exact maximum, which is kept beside the buckets (as are min, count and sum);
    percentile(0) and percentile(100) are the exact min and max.

Two histograms with the same (relative_error, floor, ceiling) merge by adding bucket counts, so
client processes each keep one and the parent adds them up. `to_dict` / `from_dict` carry one
through JSON or a multiprocessing queue (sparse: only non-empty buckets).
"""

from __future__ import annotations

import math

import numpy as np

DEFAULT_RELATIVE_ERROR = 0.01
DEFAULT_FLOOR = 1e-6  # seconds: 1 us, below any loopback round trip
DEFAULT_CEILING = 1e3  # seconds: far above any deadline the load generator sets


class LogHistogram:
    """Counts of values (seconds, > 0) in log-spaced buckets; see the module docstring."""

    def __init__(
        self,
        relative_error: float = DEFAULT_RELATIVE_ERROR,
        floor: float = DEFAULT_FLOOR,
        ceiling: float = DEFAULT_CEILING,
    ) -> None:
        if not 0 < relative_error < 1:
            raise ValueError(f"relative_error: must be in (0, 1), got {relative_error}")
        if not 0 < floor < ceiling:
            raise ValueError(f"floor, ceiling: must satisfy 0 < floor < ceiling, got {floor}, {ceiling}")
        self.relative_error = float(relative_error)
        self.floor = float(floor)
        self.ceiling = float(ceiling)
        self._log_gamma = math.log((1 + relative_error) / (1 - relative_error))
        num_buckets = math.ceil(math.log(ceiling / floor) / self._log_gamma) + 1
        self.counts = np.zeros(num_buckets, dtype=np.int64)
        self.count = 0
        self.sum = 0.0
        self.min = math.inf
        self.max = -math.inf

    def _index(self, values: np.ndarray) -> np.ndarray:
        ratio = np.maximum(values, self.floor) / self.floor
        index = np.ceil(np.log(ratio) / self._log_gamma - 1e-12).astype(np.int64)
        return np.clip(index, 0, self.counts.shape[0] - 1)

    def _value(self, index: np.ndarray | int) -> np.ndarray | float:
        gamma = math.exp(self._log_gamma)
        return 2.0 * np.exp(np.asarray(index) * self._log_gamma) / (gamma + 1.0) * self.floor

    def record(self, values: np.ndarray | float) -> None:
        """Adds values (n,) float seconds; NaN or negative values are a ValueError."""
        values = np.atleast_1d(np.asarray(values, dtype=np.float64))
        if values.size == 0:
            return
        if not np.all(values >= 0):
            raise ValueError("values: latencies must be >= 0 and not NaN")
        self.counts += np.bincount(self._index(values), minlength=self.counts.shape[0])
        self.count += int(values.size)
        self.sum += float(values.sum())
        self.min = min(self.min, float(values.min()))
        self.max = max(self.max, float(values.max()))

    def _check_compatible(self, other: LogHistogram) -> None:
        mine = (self.relative_error, self.floor, self.ceiling)
        theirs = (other.relative_error, other.floor, other.ceiling)
        if mine != theirs:
            raise ValueError(
                f"other: histograms merge only with equal (relative_error, floor, ceiling): {mine} != {theirs}"
            )

    def merge(self, other: LogHistogram) -> LogHistogram:
        """Adds other's counts into this histogram (in place); returns self."""
        self._check_compatible(other)
        self.counts += other.counts
        self.count += other.count
        self.sum += other.sum
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)
        return self

    def percentile(self, q: float) -> float:
        """The nearest-rank q-th percentile (q in [0, 100]) within `relative_error`; NaN if empty."""
        if not 0 <= q <= 100:
            raise ValueError(f"q: must be in [0, 100], got {q}")
        if self.count == 0:
            return math.nan
        if q == 0:
            return self.min
        if q == 100:
            return self.max
        rank = max(1, math.ceil(q / 100 * self.count))
        index = int(np.searchsorted(np.cumsum(self.counts), rank))
        return float(min(max(self._value(index), self.min), self.max))

    def percentiles(self, qs: tuple[float, ...] = (50, 90, 99, 99.9)) -> dict[str, float]:
        """{"p50": ..., "p99.9": ..., "max": ...} in seconds."""
        out = {f"p{q:g}": self.percentile(q) for q in qs}
        out["max"] = self.max if self.count else math.nan
        return out

    @property
    def mean(self) -> float:
        return self.sum / self.count if self.count else math.nan

    def to_dict(self) -> dict[str, object]:
        """A JSON-able form; only non-empty buckets are listed ({index: count})."""
        nonzero = np.flatnonzero(self.counts)
        return {
            "relative_error": self.relative_error,
            "floor": self.floor,
            "ceiling": self.ceiling,
            "buckets": {str(int(i)): int(self.counts[i]) for i in nonzero},
            "count": self.count,
            "sum": self.sum,
            "min": self.min if self.count else None,
            "max": self.max if self.count else None,
        }

    @classmethod
    def from_dict(cls, data: dict) -> LogHistogram:
        hist = cls(data["relative_error"], data["floor"], data["ceiling"])
        for index, count in data["buckets"].items():
            i = int(index)
            if not 0 <= i < hist.counts.shape[0]:
                raise ValueError(f"buckets: index {i} outside [0, {hist.counts.shape[0]})")
            hist.counts[i] = int(count)
        hist.count = int(data["count"])
        if int(hist.counts.sum()) != hist.count:
            raise ValueError(f"count: {hist.count} but the buckets hold {int(hist.counts.sum())}")
        hist.sum = float(data["sum"])
        hist.min = math.inf if data["min"] is None else float(data["min"])
        hist.max = -math.inf if data["max"] is None else float(data["max"])
        return hist
