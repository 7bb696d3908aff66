"""A paired shard's primary that answers slowly but surely: a client told of the standby cuts each
attempt at max(2 s, deadline / 4) so that a primary cut off the network is failed over within the
deadline; a primary slower than that cut must still answer (ps/client.py PSClient._patient)."""

from __future__ import annotations

import dataclasses
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ps.client import PSClient, ShardUnavailableError
from ps.job_config import Deadlines
from tests.helpers.processes import ShardPair
from tests.helpers.slow_link import SlowLink
from tests.ps.test_standby import pair_job

DELAY_S = 2.5  # past the 2 s cut of an attempt at an 8 s deadline


def test_a_primary_slower_than_an_attempt_s_cut_still_answers_a_client_told_of_its_standby(etcd, tmp_path):
    """Every attempt was cut at the cap and the next went to the standby, which refused it, then to
    the primary again, cut again: a healthy primary whose answers took 3 s never answered a client
    told of its standby within an 8 s deadline (ShardUnavailableError after 7 attempts; a review's
    repro), while a client without the standby's address got them in 3 s. The cap also cut shards
    without a standby once any shard had one. Now the slow process is asked again with the whole
    time left while the standby is asked beside it."""
    job = pair_job(etcd.endpoint, "slow-primary")
    pair = ShardPair.start(job, tmp_path)
    try:
        with SlowLink(job.shards[0].address, delay=0.0) as link:
            shard = dataclasses.replace(job.shards[0], address=link.address)
            slow = dataclasses.replace(job, shards=(shard,), deadlines=Deadlines(lookup=8.0, push=8.0, stats=8.0))
            with PSClient.from_job(slow, client_id="trainer-slow") as client:
                client.stats()  # connected
                link.delay = DELAY_S
                keys = np.arange(50, dtype=np.int64)
                table = job.tables[0]
                client.push(table.name, keys, np.ones((50, table.dim), np.float32), step=1)
                rows = client.lookup(table.name, keys)
                assert rows.shape == (50, table.dim) and np.isfinite(rows).all()
                link.delay = 0.0
                assert client.stats()[0].tables[0].version == 1  # the push applied once
    finally:
        pair.stop()


def test_patient_attempts_queued_for_a_thread_still_end_by_their_deadline(etcd, tmp_path):
    """A patient attempt's answer is awaited on a thread of the client's own pool: one queued for a
    thread took its timeout when it was queued, not when it started, and the call waited for it
    past its deadline (a review's repro: 6 lookups at once, 4 threads, the last 2 ended after 12 s
    of an 8 s deadline). Each attempt takes the time left when it starts, and no call waits past
    its deadline: one whose attempt could not get a thread in time fails UNAVAILABLE at it."""
    job = pair_job(etcd.endpoint, "slow-primary-queued")
    pair = ShardPair.start(job, tmp_path)
    deadline = 7.5
    try:
        with SlowLink(job.shards[0].address, delay=0.0) as link:
            shard = dataclasses.replace(job.shards[0], address=link.address)
            slow = dataclasses.replace(job, shards=(shard,), deadlines=Deadlines(lookup=deadline, push=8.0, stats=8.0))
            with PSClient.from_job(slow, client_id="trainer-queued") as client:
                client.stats()  # connected
                client._waits.shutdown()
                client._waits = ThreadPoolExecutor(1)  # one patient attempt at a time
                # The first is answered at 6 s of 7.5 (cut at 2 s, asked again); the second's attempt
                # starts then, and took its timeout (5.5 s) when queued: it ended at 10 s.
                link.delay = 4.0
                keys = np.arange(20, dtype=np.int64)

                def lookup() -> tuple[float, BaseException | None]:
                    started = time.monotonic()
                    try:
                        client.lookup(job.tables[0].name, keys)
                    except ShardUnavailableError as exc:
                        return time.monotonic() - started, exc
                    return time.monotonic() - started, None

                with ThreadPoolExecutor(2) as callers:
                    ended = [f.result() for f in [callers.submit(lookup) for _ in range(2)]]
                link.delay = 0.0
                assert sum(error is None for _, error in ended) >= 1, ended
                assert all(took < deadline + 1.0 for took, _ in ended), ended
    finally:
        pair.stop()
