"""A replica's followers of one shard are one heartbeat group (serving/follower.py ConnectionLink,
ps/shard/heartbeats.py): on an idle shard one of their streams carries the heartbeats, and every
follower of the link stays fresh on them. Before, each (table, shard) stream sent its own: a replica
of 200 tables on 2 idle shards took 800 heartbeats a second."""

from __future__ import annotations

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from ps.table.config import TableConfig
from serving.follower import ShardFollower
from serving.metrics import ServingMetrics
from serving.store import TableReplica
from tests.helpers.in_process import InProcessShards, following
from tests.helpers.processes import make_job
from tests.helpers.waiting import wait_until

TABLES = 12
STALE_AFTER_SECONDS = 1.0  # two heartbeat intervals


def _heartbeats(shards: InProcessShards) -> dict[str, float]:
    """embps_subscribe_heartbeats_total of each table (from the shard's registry)."""
    text = generate_latest(shards.servicers[0].metrics.registry).decode()
    return {
        s.labels["table"]: s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "embps_subscribe_heartbeats_total"
    }


def test_the_followers_of_a_shard_stay_fresh_on_one_streams_heartbeats():
    job = make_job([TableConfig(f"t{i}", dim=4) for i in range(TABLES)], num_shards=1)
    with InProcessShards.start(job) as shards:
        replicas = [TableReplica(table, shards.job.shard_map) for table in shards.job.tables]

        links = {}  # one ConnectionLink for the channel, as serving/server.py builds them

        def make(channel):
            return [ShardFollower(r, 0, channel, ServingMetrics(), links=links) for r in replicas]

        with following(shards, make) as followers:
            wait_until(lambda: all(f.status.connected for f in followers), "every follower's first heartbeat")
            start = _heartbeats(shards)
            assert set(start) == {f"t{i}" for i in range(TABLES)} and all(n >= 1 for n in start.values()), start
            stale_seen = []

            def heard_long_enough() -> bool:
                stale_seen.extend(f.replica.name for f in followers if f.stale(STALE_AFTER_SECONDS))
                now = _heartbeats(shards)
                return sum(now.values()) - sum(start.values()) >= 8  # 4 s of one stream's heartbeats

            wait_until(heard_long_enough, "the shard's heartbeats over 4 s")
            assert not stale_seen, f"stale while the shard was idle: {sorted(set(stale_seen))}"
            grew = {t: n - start[t] for t, n in _heartbeats(shards).items() if n > start[t]}
            assert len(grew) == 1, f"heartbeats came on more than one stream: {grew}"
