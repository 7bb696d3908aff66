"""eviction.ttl_steps decided where a row is read or pushed, not by when a sweep ran.

A row not pushed for more than ttl_steps before a step is expired at that step: a push of the
step starts it again from its init (admission included), and a lookup for the step reads its
init. Before, expiry was only the TTL sweep's, which runs after a push to the table on that shard:
a shard that got no push of the table kept the row, so a lookup read its trained value and the
next push trained on it, and a job gave other rows on 1 shard than on 2 (found by a review).
"""

from __future__ import annotations

import numpy as np
import pytest

from ps.client import PSClient
from ps.sharding import ShardMap
from ps.table import multi
from ps.table.config import AdmissionConfig, AdmissionKind, EvictionConfig, OptimizerConfig, OptimizerKind, TableConfig
from ps.table.embedding_table import EmbeddingTable
from tests.helpers.in_process import InProcessShards
from tests.helpers.processes import make_job
from worker.local_tables import LocalTables

TTL = 8
CONFIG = TableConfig(
    "t", dim=2, optimizer=OptimizerConfig(kind=OptimizerKind.SGD, lr=1.0), eviction=EvictionConfig(ttl_steps=TTL)
)


def _ones(n: int) -> np.ndarray:
    return np.ones((n, 2), np.float32)


@pytest.mark.parametrize("swept", [False, True], ids=["no sweep since", "swept every step"])
def test_a_row_past_its_ttl_reads_and_trains_from_its_init_whether_or_not_a_sweep_ran(swept):
    """Key 7 pushed at step 1; then, on one table, pushes of another key every step (the sweep runs
    each time), on the other none at all (a shard that owns no key of those steps)."""
    table = EmbeddingTable(CONFIG)
    key = np.array([7], np.int64)
    init = table.init_values(key)
    table.apply_gradients(key, _ones(1), step=1)

    def others(steps: range) -> None:
        for step in steps if swept else ():
            table.apply_gradients(np.array([100 + step], np.int64), _ones(1), step=step)

    others(range(2, 10))
    np.testing.assert_array_equal(table.read(key, 9), init - 1)  # 8 steps old: alive
    np.testing.assert_array_equal(table.read(key, 10), init)  # 9 steps old: expired
    np.testing.assert_array_equal(multi.lookup_tables([table], key, np.array([0, 1]), [10]), init.reshape(-1))
    np.testing.assert_array_equal(multi.lookup_tables([table], key, np.array([0, 1]), [9]), (init - 1).reshape(-1))
    others(range(10, 12))
    result = table.apply_gradients(key, _ones(1), step=12)
    assert result.evicted_keys.shape[0] == 0 or 7 not in result.evicted_keys  # trained again: touched
    np.testing.assert_array_equal(table.read(key, 12), init - 1)  # from its init, not from init - 1
    assert table.num_evicted >= 1


def test_a_pending_admission_count_past_its_ttl_counts_from_zero_whether_or_not_a_sweep_ran():
    config = TableConfig(
        "t", dim=2, optimizer=OptimizerConfig(kind=OptimizerKind.SGD, lr=1.0),
        admission=AdmissionConfig(kind=AdmissionKind.COUNT, min_count=2), eviction=EvictionConfig(ttl_steps=TTL),
    )
    swept, idle = EmbeddingTable(config), EmbeddingTable(config)
    key = np.array([7], np.int64)
    for table in (swept, idle):
        table.apply_gradients(key, _ones(1), step=1)  # seen once: pending
    for step in range(2, 13):
        swept.apply_gradients(np.array([100 + step] * 2, np.int64), _ones(2), step=step)
    for table in (swept, idle):
        init = table.init_values(key)
        table.apply_gradients(key, _ones(1), step=13)  # 12 steps later: the first sighting again
        np.testing.assert_array_equal(table.read(key, 13), init)  # not admitted (before: admitted, trained)
        table.apply_gradients(key, _ones(1), step=14)  # the second within the TTL: admitted, trained
        np.testing.assert_array_equal(table.read(key, 14), init - 1)


def _rows_after(num_shards: int) -> dict[str, list]:
    """Keys A (shard 0 of 2) and B (shard 1 of 2): both pushed at step 1, then only A for 11
    steps, then B again; what lookups of B read for step 12, and B after its push of step 13."""
    two = ShardMap.uniform(2)
    candidates = np.arange(1, 200, dtype=np.int64)
    owner = two.shard_of(candidates)
    a, b = int(candidates[owner == 0][0]), int(candidates[owner == 1][0])
    with InProcessShards.start(make_job([CONFIG], num_shards=num_shards)) as shards:
        with PSClient.from_job(shards.job) as client:
            client.push("t", np.array([a, b]), _ones(2), step=1)
            for step in range(2, 13):
                client.push("t", np.array([a]), _ones(1), step=step)
            out = {
                "lookup": client.lookup("t", np.array([b]), step=12).tolist(),
                "lookup_multi": client.lookup_multi(["t"], np.array([b]), np.array([0, 1]), step=12).tolist(),
            }
            client.push("t", np.array([b]), _ones(1), step=13)
            out["after push"] = client.lookup("t", np.array([b]), step=13).tolist()
            out["init"] = EmbeddingTable(CONFIG).init_values(np.array([b])).tolist()
    return out


def test_one_shard_and_two_shards_read_and_train_an_expired_row_alike():
    one, two = _rows_after(1), _rows_after(2)
    assert one == two
    init = np.array(one["init"], np.float32)
    np.testing.assert_array_equal(np.array(two["lookup"]), init)
    np.testing.assert_array_equal(np.array(two["lookup_multi"]), init.reshape(-1))
    np.testing.assert_array_equal(np.array(two["after push"]), init - 1)


def test_local_tables_read_for_the_step_as_a_shard_does():
    local = LocalTables([CONFIG])
    key = np.array([7], np.int64)
    init = local.tables["t"].init_values(key)
    local.push("t", key, _ones(1), step=1)
    np.testing.assert_array_equal(local.lookup("t", key, step=10), init)
    np.testing.assert_array_equal(local.lookup_multi(["t"], key, np.array([0, 1]), step=10), init.reshape(-1))
    np.testing.assert_array_equal(local.lookup("t", key), init - 1)  # the table's step (1): alive


def test_a_lookup_step_past_a_push_s_range_is_refused_by_name():
    with InProcessShards.start(make_job([CONFIG], num_shards=1)) as shards:
        with PSClient.from_job(shards.job) as client:
            with pytest.raises(Exception, match=r"step: must be in \[0, 2\^32 - 1\]"):
                client.lookup("t", np.array([1]), step=2**40)


@pytest.mark.parametrize("rows, num_trained", [(0, 3), (70_000, 2_000)], ids=["exact", "sampled"])
def test_a_full_lfu_table_evicts_rows_past_their_ttl_before_trained_ones(rows, num_trained):
    """A row past its TTL reads as absent, but until the sweep drops it, it kept its place: a full
    LFU table evicted the least pushed rows, trained ones among them, before an expired row of many
    pushes (a review's repro: keys 1-3 trained at step 16, a key pushed 50 times at step 1, TTL
    16; a new key at step 18 evicted key 1 unless a sweep ran first). Eviction now counts no push for
    an expired row, in the exact scan and in the sampled one (past EXACT_SCAN_ROWS rows) alike."""
    trained = np.arange(1, 1 + num_trained, dtype=np.int64)
    table = EmbeddingTable(TableConfig(
        name="t", dim=2, capacity=rows + 1 + num_trained, optimizer=OptimizerConfig(kind=OptimizerKind.SGD, lr=0.1),
        eviction=EvictionConfig(ttl_steps=16, policy="lfu"),
    ))
    ones = np.ones((1, 2), np.float32)
    if rows:  # expired too, many pushes each
        filler = np.arange(10_000, 10_000 + rows, dtype=np.int64)
        table.apply_gradients(filler, np.ones((rows, 2), np.float32), step=1, counts=np.full(rows, 50))
    table.apply_gradients(np.array([-100]), ones, step=1, counts=np.array([50]))
    table.apply_gradients(trained, np.ones((num_trained, 2), np.float32), step=16)
    assert table.size == table.config.capacity
    table.apply_gradients(np.array([-7]), ones, step=18)
    assert set(trained.tolist()) <= set(table.keys().tolist()), "a trained row was evicted"
    assert not (table.read(trained, 18) == table.init_values(trained)).all(axis=1).any()
