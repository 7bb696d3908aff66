"""The one block row store (PS tables and serving replicas) against a plain (rows, width) array."""

import numpy as np
import pytest
import torch

from ps.table.row_store import RowStore

DEVICES = ["cpu", pytest.param("cuda", marks=[
    pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")])]


def host(words) -> np.ndarray:
    return words if isinstance(words, np.ndarray) else words.cpu().numpy()


@pytest.mark.parametrize("device", DEVICES)
def test_scatter_then_gather_match_a_plain_array_across_blocks(device):
    width, num_rows = 5, 37
    store = RowStore(width, device, block_shift=3)  # 8 rows a block: batches cross blocks
    reference = np.zeros((num_rows, width), dtype=np.float32)
    rng = np.random.default_rng(0)
    store.ensure_rows(num_rows)
    assert store.num_allocated_rows == 40 and len(store.blocks) == 5
    for _ in range(20):
        rows = rng.integers(-3, num_rows, size=int(rng.integers(0, 30))).astype(np.int64)
        rows = np.unique(rows)  # scatter writes each row once per call
        col = int(rng.integers(0, width))
        values = rng.standard_normal((rows.shape[0], width - col)).astype(np.float32)
        store.scatter(rows, col, values)
        reference[rows[rows >= 0], col:] = values[rows >= 0]  # negative rows are skipped
    probe = np.array([-1, 0, 7, 8, 36, -5, 15], dtype=np.int64)
    out = np.full((probe.shape[0], 3), 9.0, dtype=np.float32)
    got = host(store.gather(probe, 1, 3, out if device == "cpu" else torch.from_numpy(out).to(device)))
    expected = reference[probe, 1:4]
    expected[probe < 0] = 9.0  # negative rows leave `out` as it was
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(store.gather_host(np.arange(num_rows, dtype=np.int64), 0, width), reference)
    assert store.memory_bytes == 5 * 8 * width * 4


def test_cpu_blocks_are_numpy_and_growth_never_moves_them():
    store = RowStore(4, "cpu", block_shift=4)
    store.ensure_rows(1)
    first = store.blocks[0]
    assert isinstance(first, np.ndarray) and first.dtype == np.float32 and first.shape == (16, 4)
    store.scatter(np.array([3], dtype=np.int64), 0, np.ones((1, 4), np.float32))
    store.ensure_rows(100)
    assert len(store.blocks) == 7 and store.blocks[0] is first
    assert store.block_addresses.tolist() == [b.ctypes.data for b in store.blocks]
    np.testing.assert_array_equal(store.gather(np.array([3, 99], dtype=np.int64), 0, 4), [[1] * 4, [0] * 4])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [(dict(width=0), "width: must be > 0"), (dict(width=4, block_shift=31), r"block_shift: must be in \[0, 30\]")],
)
def test_bad_settings_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RowStore(**kwargs)
