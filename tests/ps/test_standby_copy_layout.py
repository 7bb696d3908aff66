"""A standby that joined by a state copy goes on exactly as its primary on large tables.

Above EXACT_SCAN_ROWS rows a table's TTL sweep reads a window of rows per push, in row order, and
capacity eviction picks victims from a random sample of row indices (ps/table/embedding_table.py);
keys waiting for admission are dropped first seen first. Which keys a push evicts then depends on
where each key's row lies, on the sweep's cursor, on the sampler's state and on the order keys
were first seen, not only on the keys and values. A standby loaded from a copy must continue
from all of it, or it evicts other keys than its primary and holds other tables from then on. The
copy is taken while pushes go on (rows, then the rows written since, then the rest at one point).
"""

from __future__ import annotations

import os
import signal
import time

import numpy as np

from ps.client import PSClient
from ps.process.children import stop as stop_pid
from ps.rpc import ps_pb2
from ps.shard.arbiter import Arbiter
from ps.shard.state import Shard
from ps.table.config import (
    AdmissionConfig,
    AdmissionKind,
    EvictionConfig,
    EvictionPolicy,
    OptimizerConfig,
    OptimizerKind,
    TableConfig,
)
from ps.table.embedding_table import EXACT_SCAN_ROWS
from tests.helpers.processes import ShardPair, start_shard
from tests.helpers.waiting import wait_until
from tests.ps.test_standby import assert_bit_equal, pair_job, shard_state

ROWS = EXACT_SCAN_ROWS + 30_000
TABLES = (
    TableConfig(name="ttl", dim=4, optimizer=OptimizerConfig(kind=OptimizerKind.ADAGRAD, lr=0.1),
                eviction=EvictionConfig(ttl_steps=2)),
    TableConfig(name="lru", dim=4, optimizer=OptimizerConfig(kind=OptimizerKind.SGD, lr=0.1), capacity=ROWS,
                eviction=EvictionConfig(policy=EvictionPolicy.LRU)),
    # Keys wait for a second sighting; past max_pending the first seen go first, and the TTL sweep
    # reads windows of pending rows too.
    TableConfig(name="admit", dim=4, optimizer=OptimizerConfig(kind=OptimizerKind.ADAM, lr=0.1),
                admission=AdmissionConfig(kind=AdmissionKind.COUNT, min_count=2, max_pending=ROWS),
                eviction=EvictionConfig(ttl_steps=3)),
)


def _push(client: PSClient, reference: Shard, rng: np.random.Generator, step: int, keys_per_table: int) -> None:
    keys = [np.unique(rng.integers(0, 4 * ROWS, keys_per_table)).astype(np.int64) for _ in TABLES]
    offsets = np.cumsum([0, *(k.shape[0] for k in keys)])
    grads = np.concatenate([rng.standard_normal((k.shape[0], t.dim)).astype(np.float32).ravel()
                            for k, t in zip(keys, TABLES, strict=True)])
    prepared = client.prepare_push_multi([t.name for t in TABLES], np.concatenate(keys), offsets, grads, step=step)
    client.send_push(prepared)
    for _, request in prepared.calls:
        reference.push_multi(ps_pb2.MultiPushRequest.FromString(request))


def test_a_standby_loaded_from_a_copy_evicts_what_its_primary_evicts(etcd, tmp_path):
    job = pair_job(etcd.endpoint, "copylayout", TABLES, snapshot_uri=(tmp_path / "snaps").as_uri())
    pair = ShardPair.start(job, tmp_path)
    reference = Shard(job, 0)
    rng = np.random.default_rng(7)
    new_standby = None
    try:
        with PSClient.from_job(job, client_id="trainer-0") as client:
            for step in range(1, 4):
                _push(client, reference, rng, step, ROWS // 2)
            os.kill(pair.standby.pid, signal.SIGKILL)
            pair.standby.wait()
            wait_until(lambda: "going on ALONE" in pair.log(0), "the primary going on alone", 30)
            new_log = tmp_path / "new-standby.log"
            new_standby = start_shard(pair.config, 0, new_log, args=("--standby",))
            # Pushes go on while the new standby starts, while the primary copies its rows to it (a
            # live copy: rows written after their copy are sent again) and while it catches up.
            step, deadline = 3, time.monotonic() + 120
            while pair.log(0).count("joined") < 2:
                assert new_standby.poll() is None, new_log.read_text()[-3000:]
                assert time.monotonic() < deadline, "the new standby did not join within 120 s"
                step += 1
                _push(client, reference, rng, step, ROWS // 16)
            assert "copying its state to the standby" in pair.log(0)
            # Steps whose pushes sweep windows of rows and evict sampled rows, on both processes.
            for later in range(step + 1, step + 9):
                _push(client, reference, rng, later, ROWS // 4)
            assert "diverged" not in pair.log(0), pair.log(0)[-3000:]
            arbiter = Arbiter(job.arbiter, job.job, 0, "test")
            epoch = arbiter.read()[0].epoch
            os.kill(pair.primary.pid, signal.SIGKILL)
            wait_until(lambda: arbiter.read()[0].epoch == epoch + 1, "the new standby's promotion", 30)
            client.stats()  # retried until the promoted standby answers
        got = shard_state(job, job.shards[0].standby, 1)
        assert_bit_equal(got, reference)
    finally:
        pair.stop()
        if new_standby is not None:
            stop_pid(new_standby)
