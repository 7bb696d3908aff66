"""A replica's followers of one shard over one SubscribeTables call (serving/shard_streams.py):
one call a shard, a table's resync on that call while the others follow, and shards that only
serve Subscribe."""

from __future__ import annotations

import asyncio
import urllib.request

import grpc
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from ps import wire
from ps.client import PSClient
from ps.rpc import ps_pb2, ps_pb2_grpc
from ps.sharding import ShardMap
from ps.table.config import TableConfig
from serving.config import Consistency
from serving.follower import ShardFollower
from serving.metrics import ServingMetrics
from serving.shard_streams import ShardStreams
from serving.store import TableReplica
from tests.helpers.in_process import scripted_shard
from tests.helpers.processes import ShardCluster, make_job
from tests.helpers.waiting import wait_until
from tests.serving.replicas import ServingReplica


def subscribe_calls(job, shard: int) -> dict[str, float]:
    """The shard's Subscribe and SubscribeTables calls ended so far, by method (all codes; not the
    ends of a SubscribeTables call's table streams, which are counted under their tables)."""
    url = f"http://127.0.0.1:{job.shards[shard].metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as reply:
        text = reply.read().decode()
    calls: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            method = sample.labels.get("method", "")
            if sample.name == "embps_requests_total" and method.startswith("Subscribe") and (
                method == "Subscribe" or sample.labels.get("table") == ""
            ):
                calls[method] = calls.get(method, 0.0) + sample.value
    return calls


def test_a_replica_follows_each_shard_over_one_call(tmp_path):
    """Four tables on two shards: the replica serves the committed step through one call a shard
    (the shard records it when the replica leaves), and no Subscribe call of a table's own."""
    tables = [TableConfig(f"t{i}", dim=4) for i in range(4)]
    with ShardCluster.start(make_job(tables, num_shards=2), tmp_path / "ps") as cluster, \
            PSClient.from_job(cluster.job) as client:
        names = [t.name for t in tables]
        keys = np.tile(np.arange(1, 9, dtype=np.int64), 4)
        client.send_push(client.prepare_push_multi(
            names, keys, np.arange(0, 33, 8, dtype=np.int64), np.ones((32, 4), np.float32), step=1))
        client.commit(1)
        with ServingReplica.start(cluster, tmp_path / "serve", consistency=Consistency.STEP) as replica:
            wait_until(lambda: replica.status().model_version == 1, timeout=30, what="the replica serves step 1")
            for name in names:
                values, found, _ = replica.lookup(name, keys[:8])
                assert found.all()
                np.testing.assert_array_equal(values, client.lookup(name, keys[:8]))
        for shard in range(2):
            wait_until(lambda s=shard: subscribe_calls(cluster.job, s).get("SubscribeTables") == 1, timeout=10,
                       what=f"shard {shard} records the replica's one call")
            assert "Subscribe" not in subscribe_calls(cluster.job, shard)


def test_a_table_waiting_for_the_cut_holds_back_neither_the_call_nor_the_table_it_waits_for(tmp_path):
    """consistency "step" with a tiny max_waiting_bytes: step 2 changes 50,000 rows of table b (a
    range of many messages), steps 3-40 a few rows of table a, committed at once. a's follower gets
    ahead of the cut and waits there; a's stream then waits on the shard for credit, and b's range
    arrives, so the cut reaches step 40 (a review's repro: a's full queue blocked the call's reader,
    b's range never arrived, and the replica served step 1 for good, reporting nothing)."""
    job = make_job([TableConfig("a", dim=4), TableConfig("b", dim=32)], num_shards=1, message_limit_bytes=64 << 10)
    a_keys, b_keys = np.arange(1, 9, dtype=np.int64), np.arange(1, 50_001, dtype=np.int64)
    with ShardCluster.start(job, tmp_path / "ps") as cluster, PSClient.from_job(cluster.job) as client:
        client.push("a", a_keys, np.ones((8, 4), np.float32), step=1)
        client.commit(1)
        with ServingReplica.start(cluster, tmp_path / "serve", consistency=Consistency.STEP,
                                  max_waiting_bytes=2048) as replica:
            wait_until(lambda: replica.status().model_version == 1, timeout=30, what="the replica serves step 1")
            client.push("b", b_keys, np.ones((50_000, 32), np.float32), step=2)
            client.commit(2)
            for step in range(3, 41):
                client.push("a", a_keys, np.ones((8, 4), np.float32), step=step)
                client.commit(step)
            wait_until(lambda: replica.status().model_version == 40, timeout=30, what="the replica serves step 40")
            values, found, _ = replica.lookup("b", b_keys[:3])
            assert found.all()
            np.testing.assert_array_equal(values, client.lookup("b", b_keys[:3]))


def test_one_table_resyncs_on_the_shared_call_while_the_other_follows(tmp_path):
    """Table a's rows claim another incarnation of the shard: its stream ends FAILED_PRECONDITION,
    and it takes a full copy on the same call while table b follows from its version; both end
    equal to the shard's rows, with one call on the shard."""
    job = make_job([TableConfig("a", dim=4), TableConfig("b", dim=4)], num_shards=1)
    with ShardCluster.start(job, tmp_path / "ps") as cluster, PSClient.from_job(cluster.job) as client:
        client.push("a", np.array([1, 2, 3], np.int64), np.ones((3, 4), np.float32))
        client.push("b", np.array([4, 5], np.int64), np.ones((2, 4), np.float32))
        versions = {t.name: t.version for t in client.stats()[0].tables}
        replicas = {name: TableReplica(job.table(name), ShardMap.uniform(1)) for name in ("a", "b")}
        replicas["a"].shards[0].version, replicas["a"].shards[0].incarnation = versions["a"], 12345

        async def run() -> dict[str, ShardFollower]:
            async with grpc.aio.insecure_channel(job.shards[0].address) as channel:
                links: dict = {}
                followers = {name: ShardFollower(r, 0, channel, ServingMetrics(), links=links)
                             for name, r in replicas.items()}
                task = asyncio.create_task(ShardStreams(list(followers.values())).run())
                try:
                    await asyncio.to_thread(
                        wait_until, lambda: all(r.shards[0].version == versions[n] and r.shards[0].incarnation
                                                not in (0, 12345) for n, r in replicas.items()),
                        "both tables at the shard's versions, a from a full copy",
                    )
                    await asyncio.to_thread(client.push, "b", np.array([9], np.int64), np.ones((1, 4), np.float32))
                    await asyncio.to_thread(wait_until, lambda: replicas["b"].shards[0].version == versions["b"] + 1,
                                            "b follows a push after a's resync")
                finally:
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
                return followers

        followers = asyncio.run(run())
        assert followers["a"].status.num_resyncs == 1 and followers["b"].status.num_resyncs == 0
        assert "FAILED_PRECONDITION" in followers["a"].status.last_error
        for name, keys in (("a", [1, 2, 3]), ("b", [4, 5, 9])):
            k = np.array(keys, np.int64)
            values, found = replicas[name].lookup(k)
            assert found.all()
            np.testing.assert_array_equal(values, client.lookup(name, k))
        wait_until(lambda: subscribe_calls(cluster.job, 0).get("SubscribeTables") == 1, timeout=10,
                   what="the shard records the one call")
        assert "Subscribe" not in subscribe_calls(cluster.job, 0)


def test_a_shard_without_subscribe_tables_is_followed_table_by_table():
    """A shard that answers SubscribeTables UNIMPLEMENTED (one that predates it): each table is
    followed over a Subscribe call of its own."""
    asked: list[str] = []

    class SubscribeOnly(ps_pb2_grpc.ParameterServerServicer):
        async def Subscribe(self, request, context):
            asked.append(request.table)
            k = np.array([7], np.int64)
            value = 1.0 if request.table == "x" else 2.0
            yield ps_pb2.UpdateBatch(
                table=request.table, incarnation=5, from_version=0, to_version=1, keys=wire.encode_keys(k), dim=4,
                values=wire.encode_values(np.full((1, 4), value, np.float32), 4), last=True,
            )
            await asyncio.Event().wait()  # then idle, as a shard with nothing new

    replicas = {name: TableReplica(TableConfig(name, dim=4), ShardMap.uniform(1)) for name in ("x", "y")}

    async def run() -> None:
        async with scripted_shard(SubscribeOnly()) as channel:
            followers = [ShardFollower(r, 0, channel, ServingMetrics()) for r in replicas.values()]
            task = asyncio.create_task(ShardStreams(followers).run())
            try:
                followed = lambda: all(r.shards[0].version == 1 for r in replicas.values())  # noqa: E731
                await asyncio.to_thread(wait_until, followed, "both tables followed")
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    asyncio.run(run())
    assert sorted(asked) == ["x", "y"]
    for name, value in (("x", 1.0), ("y", 2.0)):
        values, found = replicas[name].lookup(np.array([7], np.int64))
        assert found.all() and values[0].tolist() == [value] * 4
