"""A job whose tables changed since its snapshot: the shard's restore names the table's field and
`embps ps` exits 2 with it in its log (a config to fix, so no fallback to an older snapshot),
never a traceback: a table added since, another dim, another optimizer's state, a capacity below
the rows the snapshot holds."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from ps.job_config import SnapshotConfig, dump_job_config
from ps.shard.snapshot_service import restore_shard_states
from ps.shard.startup import EXIT_CONFIG_REFUSED
from ps.sharding import ShardMap
from ps.snapshot.files import SnapshotWriter
from ps.snapshot.ops import ShardSnapshotter
from ps.table.config import OptimizerConfig, OptimizerKind, TableConfig
from ps.table.embedding_table import EmbeddingTable
from tests.helpers.processes import make_job, start_shard

A = TableConfig("a", dim=4, optimizer=OptimizerConfig(kind=OptimizerKind.ADAGRAD, lr=0.1))


def _snapshot(uri: str) -> None:
    table = EmbeddingTable(A)
    table.apply_gradients(np.arange(10, dtype=np.int64), np.ones((10, 4), np.float32), step=1)
    ShardSnapshotter({"a": table}, 0).snapshot(uri, "test", 10)


@pytest.mark.parametrize(
    "tables, message",
    [
        ((A, TableConfig("b", dim=4)), r"tables\.b: not in snapshot step 10 \(it holds a\)"),
        ((replace(A, dim=8),), r"tables\.a\.dim: 8 in the job, 4 in snapshot step 10"),
        ((replace(A, optimizer=OptimizerConfig(kind=OptimizerKind.ADAM, lr=0.1)),),
         r"tables\.a\.optimizer: adam keeps 9 state words a row, the rows of snapshot step 10 have 4"),
    ],
    ids=["added-table", "dim", "optimizer"],
)
def test_restoring_into_changed_tables_names_the_field(tmp_path, tables, message):
    uri = (tmp_path / "snaps").as_uri()
    _snapshot(uri)
    with pytest.raises(ValueError, match=message):
        restore_shard_states(replace(make_job(list(tables)), snapshot=SnapshotConfig(uri)), 0, 10)


def test_a_shard_restoring_into_a_smaller_capacity_exits_as_refused_by_its_config_with_the_reason(tmp_path):
    """Exit EXIT_CONFIG_REFUSED (2), not 1: the launcher ends the job on it instead of restarting it."""
    uri = (tmp_path / "snaps").as_uri()
    _snapshot(uri)
    job = replace(make_job([replace(A, capacity=5)], job="test"), snapshot=SnapshotConfig(uri))
    config = tmp_path / "job.toml"
    config.write_text(dump_job_config(job))
    log = tmp_path / "shard.log"
    proc = start_shard(config, 0, log, args=("--restore-step", "10"))
    assert proc.wait(timeout=120) == EXIT_CONFIG_REFUSED == 2
    text = log.read_text()
    assert "the job's config refuses snapshot step 10" in text and "capacity" in text, text[-3000:]
    assert "Traceback" not in text, text[-3000:]



def test_restoring_under_another_bucket_map_names_the_field(tmp_path):
    """Only the number of shards was compared: a job whose [sharding] bucket_ranges moved buckets
    restored each shard's old rows, and the moved keys' trained rows were never read again (their
    lookups went to the shard that did not hold them, which made new rows)."""
    uri = (tmp_path / "snaps").as_uri()
    written = replace(make_job([A], num_shards=2), snapshot=SnapshotConfig(uri))
    keys = np.arange(1, 2001, dtype=np.int64)
    writer = SnapshotWriter(uri, "test", 10, "full", num_shards=2)
    for index in (0, 1):
        table = EmbeddingTable(A)
        mine = keys[written.shard_map.shard_of(keys) == index]
        table.apply_gradients(mine, np.ones((mine.shape[0], 4), np.float32), step=1)
        ShardSnapshotter({"a": table}, index).write(writer)
    writer.commit()
    assert restore_shard_states(written, 0, 10)["a"].keys.shape[0] > 0  # the map it was written with
    moved = replace(written, shard_map=ShardMap.from_ranges(2, [[0, 16384, 0], [16384, 65536, 1]]))
    message = r"^sharding\.bucket_ranges: [\d,]+ keys of table 'a' that snapshot step 10 holds on shard 0 belong to"
    with pytest.raises(ValueError, match=message):
        restore_shard_states(moved, 0, 10)
