"""LogHistogram: percentiles within the documented relative error of numpy's nearest-rank
percentiles, merging = recording everything in one histogram, and JSON round trips."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from bench.histogram import LogHistogram

QUANTILES = (1, 10, 50, 90, 99, 99.9)


def _samples(seed: int, n: int = 50_000) -> np.ndarray:
    """Latency-like seconds: lognormal around 1 ms with a heavy tail, plus a few slow outliers."""
    rng = np.random.default_rng(seed)
    base = rng.lognormal(mean=np.log(1e-3), sigma=0.8, size=n)
    outliers = rng.uniform(0.05, 2.0, size=n // 500)
    return np.concatenate([base, outliers])


@pytest.mark.parametrize("relative_error", [0.01, 0.05])
@pytest.mark.parametrize("seed", [0, 1])
def test_percentiles_within_relative_error_of_numpy(relative_error: float, seed: int) -> None:
    values = _samples(seed)
    hist = LogHistogram(relative_error=relative_error)
    hist.record(values)
    for q in QUANTILES:
        reference = np.percentile(values, q, method="inverted_cdf")
        estimate = hist.percentile(q)
        assert abs(estimate - reference) <= relative_error * reference * (1 + 1e-9), (q, estimate, reference)
    assert hist.percentile(100) == values.max()
    assert hist.count == values.size
    assert hist.min == values.min() and hist.max == values.max()
    assert math.isclose(hist.mean, values.mean(), rel_tol=1e-12)


def test_percentiles_on_known_small_samples() -> None:
    values = np.array([1e-3, 2e-3, 3e-3, 4e-3, 100e-3])
    hist = LogHistogram()
    hist.record(values)
    # nearest rank: p50 of 5 values is the 3rd, p80 the 4th, p81 the 5th
    for q, expected in ((50, 3e-3), (80, 4e-3), (81, 100e-3), (0, 1e-3)):
        assert abs(hist.percentile(q) - expected) <= 0.01 * expected, q
    assert hist.percentiles()["max"] == 100e-3


def test_merge_equals_one_histogram_of_all_values() -> None:
    values = _samples(2)
    parts = np.array_split(values, 3)
    merged = LogHistogram()
    for part in parts:
        h = LogHistogram()
        h.record(part)
        merged.merge(h)
    whole = LogHistogram()
    whole.record(values)
    np.testing.assert_array_equal(merged.counts, whole.counts)
    assert (merged.count, merged.min, merged.max) == (whole.count, whole.min, whole.max)
    assert math.isclose(merged.sum, whole.sum, rel_tol=1e-12)
    for q in QUANTILES:
        assert merged.percentile(q) == whole.percentile(q)
        reference = np.percentile(values, q, method="inverted_cdf")
        assert abs(merged.percentile(q) - reference) <= 0.01 * reference * (1 + 1e-9)


def test_json_round_trip_keeps_every_count() -> None:
    hist = LogHistogram()
    hist.record(_samples(3, n=2_000))
    back = LogHistogram.from_dict(json.loads(json.dumps(hist.to_dict())))
    np.testing.assert_array_equal(back.counts, hist.counts)
    assert back.to_dict() == hist.to_dict()
    assert back.percentiles() == hist.percentiles()


def test_values_outside_the_range_are_bounded_by_exact_min_and_max() -> None:
    hist = LogHistogram(floor=1e-6, ceiling=1.0)
    hist.record(np.array([1e-9, 5.0, 50.0]))
    assert hist.percentile(0) == 1e-9
    assert hist.percentile(100) == 50.0
    assert hist.percentile(99) <= 50.0


def test_empty_histogram_and_bad_input() -> None:
    hist = LogHistogram()
    assert math.isnan(hist.percentile(50))
    assert hist.to_dict()["min"] is None
    with pytest.raises(ValueError, match="values"):
        hist.record(np.array([1e-3, -1e-3]))
    with pytest.raises(ValueError, match="values"):
        hist.record(np.array([np.nan]))
    with pytest.raises(ValueError, match="q: must be in"):
        hist.percentile(101)
    with pytest.raises(ValueError, match="relative_error"):
        LogHistogram(relative_error=0)
    with pytest.raises(ValueError, match="other: histograms merge only"):
        hist.merge(LogHistogram(relative_error=0.02))
    broken = hist.to_dict() | {"count": 3}
    with pytest.raises(ValueError, match="count"):
        LogHistogram.from_dict(broken)
