"""A new standby joins whatever the job's message limit: every part of the state copy travels in
pieces of at most the limit, the push-id memory too (one JSON message before, which a job with a
small `message_limit_bytes` and many remembered pushes could not send: the pair never joined)."""

from __future__ import annotations

import dataclasses
import os
import re
import signal

import numpy as np

from ps.client import PSClient
from ps.process.children import stop as stop_pid
from ps.table.config import OptimizerConfig, OptimizerKind, TableConfig
from tests.helpers.processes import ShardPair, start_shard
from tests.helpers.waiting import wait_until
from tests.ps.test_standby import pair_job

LIMIT = 64 << 10
TABLES = tuple(
    TableConfig(name=f"t{i}", dim=4, optimizer=OptimizerConfig(kind=OptimizerKind.SGD, lr=0.1)) for i in range(400)
)


def test_a_push_id_memory_larger_than_the_message_limit_reaches_the_new_standby(etcd, tmp_path):
    job = dataclasses.replace(pair_job(etcd.endpoint, "copylimit", TABLES), message_limit_bytes=LIMIT)
    pair = ShardPair.start(job, tmp_path)
    new_standby = None
    try:
        names = [t.name for t in TABLES]
        offsets = np.arange(len(TABLES) + 1, dtype=np.int64)
        grads = np.ones(len(TABLES) * 4, dtype=np.float32)
        with PSClient.from_job(job, client_id="trainer-0") as client:
            # Each remembered PushMulti answer names every table's version: ~750 bytes of JSON, 150 KB in all.
            for step in range(1, 200):
                keys = np.full(len(TABLES), step, dtype=np.int64)
                client.send_push(client.prepare_push_multi(names, keys, offsets, grads, step=step))
            os.kill(pair.standby.pid, signal.SIGKILL)
            pair.standby.wait()
            wait_until(lambda: "going on ALONE" in pair.log(0), "the primary going on alone", 30)
            new_standby = start_shard(pair.config, 0, tmp_path / "new-standby.log", args=("--standby",))
            wait_until(lambda: pair.log(0).count("joined") == 2, "the new standby joining", 60)
            prepared = client.prepare_push_multi(names, np.zeros(len(TABLES), np.int64), offsets, grads, step=3000)
            client.send_push(prepared)
        assert "RESOURCE_EXHAUSTED" not in pair.log(0)
        sent = re.search(r"([0-9.]+) KiB of push ids", pair.log(0))
        # Past what one message may hold (the limit and its framing slack).
        assert sent is not None and float(sent.group(1)) * 1024 > 2 * LIMIT, pair.log(0)[-2000:]
    finally:
        pair.stop()
        if new_standby is not None:
            stop_pid(new_standby)
