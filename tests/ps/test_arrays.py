"""ps/arrays.py: the sort-based answers equal numpy's own."""

import numpy as np
import pytest

from ps.arrays import sorted_unique


@pytest.mark.parametrize("n", [0, 1, 2, 4096])
def test_sorted_unique_is_numpys_unique(n):
    values = np.random.default_rng(n).integers(0, max(n // 2, 1), n)
    got = sorted_unique(values)
    np.testing.assert_array_equal(got, np.unique(values))
    assert got.dtype == values.dtype
