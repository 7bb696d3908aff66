"""UpdateLog against a plain reference: the merged range of any suffix of pushes, bounds and gaps."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ps.shard.update_log import (
    DEFAULT_SHARD_LOG_BYTES,
    ENTRY_OVERHEAD_BYTES,
    MIN_TABLE_LOG_BYTES,
    LogGapError,
    UpdateLog,
    table_log_bytes,
)

pushes = st.lists(
    st.tuples(
        st.lists(st.integers(0, 30), unique=True, max_size=8),
        st.lists(st.integers(0, 30), unique=True, max_size=3),
    ),
    min_size=1,
    max_size=25,
)


def reference(entries: list[tuple[list[int], list[int]]], after: int, base: int) -> tuple[list[int], list[int]]:
    """Last event per key over pushes with version > after (deletions after updates in a push)."""
    state: dict[int, str] = {}
    for version, (touched, deleted) in enumerate(entries, start=base + 1):
        if version <= after:
            continue
        for k in touched:
            state[k] = "touched"
        for k in deleted:
            state[k] = "deleted"
    return sorted(k for k, v in state.items() if v == "touched"), sorted(k for k, v in state.items() if v == "deleted")


@settings(max_examples=60, deadline=None)
@given(pushes, st.integers(0, 40))
def test_range_after_merges_like_the_reference(entries, base):
    log = UpdateLog(base_version=base)
    for version, (touched, deleted) in enumerate(entries, start=base + 1):
        touched_keys, deleted_keys = np.array(sorted(touched), dtype=np.int64), np.array(deleted, dtype=np.int64)
        log.append(version, touched_keys, deleted_keys, 100.0 + version)
    head = base + len(entries)
    assert (log.base_version, log.head_version) == (base, head)
    for after in range(base, head + 1):
        changes = log.range_after(after)
        touched, deleted = reference(entries, after, base)
        assert changes.touched_keys.tolist() == touched
        assert changes.deleted_keys.tolist() == deleted
        assert (changes.from_version, changes.to_version) == (after, head)
        assert [a[0] for a in changes.acks] == list(range(after + 1, head + 1))
        assert all(a[1] == 100.0 + a[0] for a in changes.acks)


def test_bounds_drop_the_oldest_pushes_and_gaps_are_refused():
    log = UpdateLog(max_entries=100, max_keys=10)
    for version in range(1, 6):
        log.append(version, np.arange(4, dtype=np.int64) + 10 * version, np.empty(0, np.int64), 0.0)
    # 4 keys a push, at most 10 keys: the newest two pushes remain.
    assert (log.base_version, log.head_version, log.num_keys) == (3, 5, 8)
    assert log.range_after(3).touched_keys.tolist() == [40, 41, 42, 43, 50, 51, 52, 53]
    with pytest.raises(LogGapError, match="starts after version 3"):
        log.range_after(2)
    with pytest.raises(LogGapError, match="ahead"):
        log.range_after(6)


def test_one_push_larger_than_the_bound_is_kept_alone():
    log = UpdateLog(max_keys=3)
    log.append(1, np.arange(10, dtype=np.int64), np.empty(0, np.int64), 0.0)
    assert log.range_after(0).touched_keys.shape == (10,)


def test_a_version_jump_restarts_the_log():
    log = UpdateLog()
    log.append(1, np.array([1], dtype=np.int64), np.empty(0, np.int64), 0.0)
    log.append(7, np.array([2], dtype=np.int64), np.empty(0, np.int64), 0.0)
    assert (log.base_version, log.head_version) == (6, 7)
    with pytest.raises(LogGapError):
        log.range_after(1)


def test_update_log_memory_follows_its_entries():
    log = UpdateLog(0, max_entries=3)
    assert log.memory_bytes == 0
    for version in range(1, 6):
        log.append(version, np.arange(100, dtype=np.int64), np.arange(10, dtype=np.int64), 0.0)
    assert log.num_entries == 3
    assert log.memory_bytes == 3 * (110 * 8 + ENTRY_OVERHEAD_BYTES)


@settings(max_examples=60, deadline=None)
@given(pushes, st.integers(0, 40), st.integers(1, 6))
def test_keys_after_counts_the_keys_of_the_pushes_held_after_a_version(entries, base, max_entries):
    log = UpdateLog(base, max_entries=max_entries)
    for version, (touched, deleted) in enumerate(entries, start=base + 1):
        log.append(version, np.array(touched, dtype=np.int64), np.array(deleted, dtype=np.int64), 0.0)
    held = {v: len(t) + len(d) for v, (t, d) in enumerate(entries, start=base + 1) if v > log.base_version}
    for position in range(base - 1, log.head_version + 2):
        assert log.keys_after(position) == sum(n for v, n in held.items() if v > position)


def test_a_byte_bound_drops_the_oldest_pushes_and_a_shard_splits_its_budget_over_its_tables():
    """A shard's update logs hold at most DEFAULT_SHARD_LOG_BYTES together (each table its share, at
    least MIN_TABLE_LOG_BYTES): one table's log alone could reach ~34 MB under the key and entry
    bounds, 6.8 GB for a shard of 200 tables."""
    entry = 10 * 8 + ENTRY_OVERHEAD_BYTES
    log = UpdateLog(max_bytes=3 * entry)
    for version in range(1, 8):
        log.append(version, np.arange(10, dtype=np.int64) + 100 * version, np.empty(0, np.int64), 0.0)
    assert (log.base_version, log.head_version, log.memory_bytes) == (4, 7, 3 * entry)
    with pytest.raises(LogGapError, match=f"or {3 * entry} bytes of log"):
        log.range_after(3)
    with pytest.raises(ValueError, match="max_bytes: must be >= 1 or None"):
        UpdateLog(max_bytes=0)
    assert table_log_bytes(2) == DEFAULT_SHARD_LOG_BYTES // 2
    assert table_log_bytes(200) == DEFAULT_SHARD_LOG_BYTES // 200
    assert table_log_bytes(100_000) == MIN_TABLE_LOG_BYTES


def test_a_shards_update_logs_take_its_share_of_the_budget():
    from ps.shard.state import Shard
    from ps.table.config import TableConfig
    from tests.helpers.processes import make_job

    shard = Shard(make_job([TableConfig(f"t{i}", dim=4) for i in range(200)]), 0)
    assert {log.max_bytes for log in shard.logs.values()} == {DEFAULT_SHARD_LOG_BYTES // 200}
