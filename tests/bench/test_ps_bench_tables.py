"""`embps bench ps --tables N`: its in-process yardstick does the shard's work of a LookupMulti and a
PushMulti round (the rows it leaves are those of per-table pushes), and bad sizes are refused."""

import numpy as np
import pytest

from bench.ps_bench import PSBenchConfig, _multi_rounds, _table_offsets, _tables
from ps.table.embedding_table import EmbeddingTable


def test_multi_rounds_leave_the_rows_of_per_table_pushes():
    config = PSBenchConfig(tables=3, batch=50, dim=4, rows=40)
    offsets = _table_offsets(config)
    assert offsets.tolist() == [0, 16, 32, 50]  # the last table takes the remainder
    keys = np.random.default_rng(0).integers(0, 40, 50).astype(np.int64)  # repeats inside a table
    grads = np.random.default_rng(1).standard_normal((50, 4)).astype(np.float32)
    batched = [EmbeddingTable(t) for t in _tables(config)]
    alone = [EmbeddingTable(t) for t in _tables(config)]
    lookup, push = _multi_rounds(config, batched, grads)
    for _ in range(2):
        push(keys)
        for i, table in enumerate(alone):
            table.apply_gradients(keys[offsets[i] : offsets[i + 1]], grads[offsets[i] : offsets[i + 1]])
    expected = np.concatenate(
        [table.lookup(keys[offsets[i] : offsets[i + 1]]).numpy().reshape(-1) for i, table in enumerate(alone)]
    )
    np.testing.assert_array_equal(lookup(keys), expected)


@pytest.mark.parametrize("tables", [0, 51])
def test_table_count_outside_one_to_batch_is_refused(tables):
    with pytest.raises(ValueError, match=r"tables: must be in \[1, batch = 50\]"):
        PSBenchConfig(tables=tables, batch=50)
