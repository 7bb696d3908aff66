"""The messages of one Subscribe range (ps/shard/range_messages.py): together they carry the range
exactly, each within the budget, the last one marked; and they are made as they are taken, so a
stream suspended after its first message holds one message's copy of the rows, not the range's."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from ps import wire
from ps.shard.range_messages import range_parts
from ps.shard.update_log import LogRange


def _range(touched: int, deleted: int, acks: int, row_bytes: int, seed: int = 0) -> tuple[LogRange, np.ndarray]:
    rng = np.random.default_rng(seed)
    keys = rng.choice(1 << 40, touched + deleted, replace=False).astype(np.int64)
    ack_list = tuple((v, 1_700_000_000.0 + v, v % 7) for v in range(1, acks + 1))
    changes = LogRange(3, 3 + acks, np.sort(keys[:touched]), np.sort(keys[touched:]), ack_list)
    return changes, rng.integers(0, 256, (touched, row_bytes), dtype=np.uint8)


@pytest.mark.parametrize(
    ("touched", "deleted", "acks", "budget"),
    [(1000, 300, 50, 4096), (7, 0, 0, 100), (0, 5, 0, 16), (0, 0, 3, 64), (3, 0, 0, 10), (0, 0, 0, 4096),
     (3, 2, 2, 4096)],
)
def test_the_parts_carry_the_range_exactly_within_the_budget(touched, deleted, acks, budget):
    row_bytes = 64
    changes, rows = _range(touched, deleted, acks, row_bytes)
    parts = list(range_parts(changes, rows, budget))
    assert [p.last for p in parts] == [False] * (len(parts) - 1) + [True]
    keys = [wire.decode_keys(p.fields["keys"]) for p in parts if "keys" in p.fields]
    values = [np.frombuffer(p.fields["values"], np.uint8).reshape(-1, row_bytes) for p in parts if "values" in p.fields]
    gone = [wire.decode_keys(p.fields["deleted_keys"]) for p in parts if "deleted_keys" in p.fields]
    sent_acks = [(a.version, a.ack_time, a.num_keys) for p in parts for a in p.fields.get("acks", [])]
    np.testing.assert_array_equal(np.concatenate(keys) if keys else np.empty(0, np.int64), changes.touched_keys)
    np.testing.assert_array_equal(np.concatenate(values) if values else rows, rows)
    np.testing.assert_array_equal(np.concatenate(gone) if gone else np.empty(0, np.int64), changes.deleted_keys)
    assert tuple(sent_acks) == changes.acks
    for p in parts:
        if "values" in p.fields:  # one row at least, else within the budget
            assert len(p.fields["values"]) + len(p.fields["keys"]) <= max(budget, 8 + row_bytes)
        if "deleted_keys" in p.fields:
            assert len(p.fields["deleted_keys"]) <= max(budget, 8)
    if touched == deleted == acks == 0:
        assert [p.fields for p in parts] == [{}]


def test_a_range_that_fits_the_budget_is_one_message():
    """A push's range (a few rows and its ack) was two messages, rows then acks: now one, whose
    size is what the budget counts; one byte less of budget and it is split as before."""
    changes, rows = _range(3, 2, 1, 64)
    exact = 3 * (8 + 64) + 2 * 8 + 32
    (part,) = range_parts(changes, rows, exact)
    assert part.last and set(part.fields) == {"keys", "values", "deleted_keys", "acks"}
    assert len(list(range_parts(changes, rows, exact - 1))) == 3


def test_the_parts_are_made_as_they_are_taken():
    budget = 1 << 20
    changes, rows = _range(100_000, 1000, 10, 320)  # 32 MB of rows
    tracemalloc.start()
    try:
        parts = range_parts(changes, rows, budget)
        first = next(parts)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert not first.last and len(first.fields["values"]) <= budget
    assert peak < 3 * budget, f"taking the first message allocated {peak / 2**20:.1f} MiB"


def test_rows_that_do_not_match_the_keys_are_refused():
    changes, rows = _range(10, 0, 0, 8)
    with pytest.raises(ValueError, match="9 rows for 10 keys"):
        list(range_parts(changes, rows[:9], 4096))
