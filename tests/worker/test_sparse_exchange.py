"""The send rows of the sparse exchange: [lead | grads / divisor | trail], in the order asked."""

from __future__ import annotations

import numpy as np
import torch

from worker.sparse_exchange import _rows, exchange_to_owners


def _expected(order, grads, divisor, lead, trail):
    parts = [torch.from_numpy(lead)[:, None], grads / divisor, torch.from_numpy(trail)[:, None]]
    return torch.cat(parts, dim=1).numpy()[order]


def test_rows_in_owner_order_equal_the_concatenated_payload_gathered_bit_for_bit():
    rng = np.random.default_rng(5)
    grads = torch.from_numpy(rng.standard_normal((50, 8)).astype(np.float32))
    lead = rng.integers(0, 7, 50).astype(np.float32)
    trail = rng.integers(1, 9, 50).astype(np.float32)
    order = rng.permutation(50)
    out = torch.empty((50, 10), dtype=torch.float32)
    got = _rows(order, grads, 3, lead, trail, 10, out)
    np.testing.assert_array_equal(got, _expected(order, grads, 3, lead, trail))


def test_one_rank_keeps_the_keys_and_returns_every_row_in_order():
    rng = np.random.default_rng(6)
    keys = rng.integers(-(1 << 62), 1 << 62, 20)
    grads = torch.from_numpy(rng.standard_normal((20, 4)).astype(np.float32)).requires_grad_(True)
    lead = np.arange(20, dtype=np.float32)
    trail = np.ones(20, dtype=np.float32)
    got_keys, rows = exchange_to_owners(keys, grads, np.zeros(20, np.int64), 1, divisor=1, lead=lead, trail=trail)
    np.testing.assert_array_equal(got_keys, keys)
    np.testing.assert_array_equal(rows, _expected(np.arange(20), grads.detach(), 1, lead, trail))
    _, bare = exchange_to_owners(keys, grads, np.zeros(20, np.int64), 1)
    np.testing.assert_array_equal(bare, grads.detach().numpy())
