"""Eviction order (ps/table/victims.py): the victims a full table picks are exactly the first ones of
the lexsort order the design names (LRU: last step, pushes, key; LFU: pushes, last step, key), so
a primary, its standby and a resumed job evict the same rows in the same order."""

from __future__ import annotations

import numpy as np
import pytest

from ps.errors import CapacityError
from ps.table.config import EvictionConfig, EvictionPolicy, OptimizerConfig, OptimizerKind, TableConfig
from ps.table.embedding_table import EmbeddingTable
from ps.table.victims import first_in_order

POLICIES = (EvictionPolicy.LRU, EvictionPolicy.LFU)


def reference(keys: np.ndarray, pushes: np.ndarray, last: np.ndarray, count: int, policy) -> np.ndarray:
    columns = (keys, last, pushes) if policy == EvictionPolicy.LFU else (keys, pushes, last)
    return keys[np.lexsort(columns)[: max(count, 0)]]


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("spread", [2, 50, 2**32 - 1])  # few distinct ranks (many ties) .. all distinct
def test_the_victims_are_the_lexsort_orders_first_keys_in_its_order(policy, spread):
    rng = np.random.default_rng(spread)
    for n in (1, 2, 7, 300, 5000):
        keys = rng.choice(np.arange(-(2**40), 2**40, 2**20, dtype=np.int64), n, replace=False)
        pushes = rng.integers(0, spread, n, dtype=np.uint64).astype(np.uint32)
        last = rng.integers(0, spread, n, dtype=np.uint64).astype(np.uint32)
        for count in sorted({0, 1, n // 3, n - 1, n, n + 5}):
            got = first_in_order(keys, pushes, last, count, policy)
            expected = reference(keys, pushes, last, count, policy)
            assert got.dtype == np.int64
            np.testing.assert_array_equal(got, expected, err_msg=f"n={n} count={count}")


def test_the_first_column_decides_before_the_second_even_at_its_largest_values():
    keys = np.array([5, 6, 7, 8], dtype=np.int64)
    pushes = np.array([2**32 - 1, 0, 2**32 - 1, 1], dtype=np.uint32)
    last = np.array([0, 2**32 - 1, 1, 2**32 - 1], dtype=np.uint32)
    assert first_in_order(keys, pushes, last, 4, EvictionPolicy.LRU).tolist() == [5, 7, 6, 8]
    assert first_in_order(keys, pushes, last, 4, EvictionPolicy.LFU).tolist() == [6, 8, 5, 7]


@pytest.mark.parametrize("policy", POLICIES)
def test_a_full_tables_pushes_evict_what_the_order_names_and_never_their_own_keys(policy):
    """A small table (every row a candidate, read from its row index): each push's victims, from
    the state just before it; halfway, the table is reloaded from its export (a resumed job), which
    rebuilds the row index the candidates come from."""
    capacity = 200
    config = TableConfig(
        "t", dim=4, capacity=capacity, optimizer=OptimizerConfig(kind=OptimizerKind.SGD, lr=0.1),
        eviction=EvictionConfig(policy=policy),
    )
    table = EmbeddingTable(config)
    rng = np.random.default_rng(7)
    evictions = 0
    for step in range(1, 120):
        if step == 60:
            resumed = EmbeddingTable(config)
            resumed.load(table.export())
            table = resumed
        keys = np.unique(rng.integers(0, 600, 40))
        before = table.export()
        own = np.isin(before.keys, keys)
        new = np.count_nonzero(~np.isin(keys, before.keys))
        need = before.keys.shape[0] + new - capacity
        result = table.apply_gradients(keys, np.ones((keys.shape[0], 4), np.float32), step=step)
        if need <= 0:
            assert result.evicted_keys.shape[0] == 0
            continue
        count = need + capacity // 64  # the slack a small table frees at once
        expected = reference(before.keys[~own], before.freq[~own], before.last_step[~own], count, policy)
        np.testing.assert_array_equal(result.evicted_keys, expected, err_msg=f"step {step}")
        assert not np.isin(result.evicted_keys, keys).any()
        assert table.size <= capacity
        evictions += 1
    assert evictions > 50


@pytest.mark.parametrize("ttl_steps", (None, 3))
@pytest.mark.parametrize("policy", (EvictionPolicy.NONE, *POLICIES))
def test_check_room_refuses_exactly_the_pushes_apply_gradients_refuses(policy, ttl_steps):
    """push_tables asks check_room before any table changes; it must agree with apply_gradients,
    including where it answers without a dedupe (a table of at least twice the push's keys), and
    where rows past their TTL make room (filled at steps 1 and 2, pushed at a step in [3, 7])."""
    rng = np.random.default_rng(11)
    refused = allowed = 0
    for trial in range(300):
        capacity = int(rng.integers(1, 40))
        config = TableConfig(
            "t", dim=2, capacity=capacity, optimizer=OptimizerConfig(kind=OptimizerKind.SGD, lr=0.1),
            eviction=EvictionConfig(policy=policy, ttl_steps=ttl_steps),
        )
        table = EmbeddingTable(config)
        fill = np.unique(rng.integers(0, 60, int(rng.integers(0, capacity + 1))))[:capacity]
        for step, part in ((1, fill[::2]), (2, fill[1::2])):
            if part.shape[0]:
                table.apply_gradients(part, np.ones((part.shape[0], 2), np.float32), step=step)
        keys = rng.integers(0, 90, int(rng.integers(1, 50)))
        step = int(rng.integers(3, 8))
        try:
            table.check_room(keys, None, step)
            expected_refusal = False
        except CapacityError:
            expected_refusal = True
        try:
            table.apply_gradients(keys, np.ones((keys.shape[0], 2), np.float32), step=step)
            refused_here = False
        except CapacityError:
            refused_here = True
        where = f"trial {trial}: capacity {capacity}, {fill.shape[0]} rows, {keys.shape[0]} keys"
        assert refused_here == expected_refusal, where
        refused += refused_here
        allowed += not refused_here
    assert refused > 10 and allowed > 10
