"""Subscribe on a real shard process: replay then live ranges, merged rows, gaps and restarts refused."""

from __future__ import annotations

import asyncio
import time

import grpc
import numpy as np
import pytest

from bench.ports import free_ports
from ps import wire
from ps.client import PSClient
from ps.rpc import ps_pb2, ps_pb2_grpc
from ps.sharding import ShardMap
from ps.table.config import EvictionConfig, EvictionPolicy, OptimizerConfig, OptimizerKind, TableConfig
from serving.config import StorageDType
from serving.follower import ShardFollower
from serving.metrics import ServingMetrics
from serving.store import TableReplica
from tests.helpers.in_process import InProcessShards, following, scripted_shard
from tests.helpers.processes import make_job
from tests.helpers.waiting import wait_until
from tests.serving.replicas import start_cluster_with_log


@pytest.fixture
def cluster(tmp_path):
    cluster = start_cluster_with_log(make_job([TableConfig("user", dim=4)], num_shards=1), tmp_path, 64)
    yield cluster
    cluster.stop()


def subscribe(cluster, **fields):
    channel = grpc.insecure_channel(cluster.job.shards[0].address)
    return channel, ps_pb2_grpc.ParameterServerStub(channel).Subscribe(
        ps_pb2.SubscribeRequest(table="user", **fields), timeout=30
    )


def read_range(stream) -> tuple[ps_pb2.UpdateBatch, np.ndarray, np.ndarray, np.ndarray, list]:
    """The next complete range: (its last message, reset if any message of it was, keys, values,
    deleted, acks); heartbeats skipped."""
    keys, values, deleted, acks = [], [], [], []
    reset = False
    for batch in stream:
        reset |= batch.reset
        k = wire.decode_keys(batch.keys)
        keys.append(k)
        values.append(wire.decode_values(batch.values, k.shape[0], batch.dim or 4))
        deleted.append(wire.decode_keys(batch.deleted_keys))
        acks += list(batch.acks)
        if batch.last and (batch.to_version > batch.from_version or reset):
            summary = ps_pb2.UpdateBatch()
            summary.CopyFrom(batch)
            summary.reset = reset
            return summary, np.concatenate(keys), np.concatenate(values), np.concatenate(deleted), acks
    raise AssertionError("stream ended")


def test_replay_then_live_ranges_carry_current_rows(cluster):
    with PSClient.from_job(cluster.job) as client:
        grads = np.ones((3, 4), dtype=np.float32)
        client.push("user", np.array([1, 2, 3], dtype=np.int64), grads)
        client.push("user", np.array([3, 4, 5], dtype=np.int64), grads)
        channel, stream = subscribe(cluster, from_version=0)
        with channel:
            batch, keys, values, deleted, acks = read_range(stream)
            assert (batch.from_version, batch.to_version) == (0, 2)
            assert keys.tolist() == [1, 2, 3, 4, 5] and deleted.shape == (0,)
            np.testing.assert_array_equal(values, client.lookup("user", keys))
            assert [a.version for a in acks] == [1, 2] and all(a.ack_time > 0 for a in acks)
            client.push("user", np.array([9], dtype=np.int64), grads[:1])
            batch, keys, values, _, acks = read_range(stream)
            assert (batch.from_version, batch.to_version, keys.tolist()) == (2, 3, [9])
            np.testing.assert_array_equal(values, client.lookup("user", keys))
            stream.cancel()


def test_gaps_and_other_incarnations_are_refused_and_full_sync_resyncs(cluster):
    with PSClient.from_job(cluster.job) as client:
        for i in range(5):  # 5 pushes of 20 keys: the 64-key log forgets the first ones
            client.push("user", np.arange(20 * i, 20 * i + 20, dtype=np.int64), np.ones((20, 4), np.float32))
        for fields, message in [
            ({"from_version": 0}, "update log starts after version"),
            ({"from_version": 9}, "ahead of this shard"),
            ({"from_version": 5, "incarnation": 12345}, "restarted"),
        ]:
            channel, stream = subscribe(cluster, **fields)
            with channel, pytest.raises(grpc.RpcError) as info:
                next(iter(stream))
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert message in info.value.details()
        channel, stream = subscribe(cluster, from_version=0, incarnation=12345, full_sync=True)
        with channel:
            batch, keys, values, _, _ = read_range(stream)
            assert batch.reset and batch.to_version == 5 and batch.incarnation not in (0, 12345)
            assert sorted(keys.tolist()) == list(range(100))  # a full copy streams rows in map order
            np.testing.assert_array_equal(values, client.lookup("user", keys))
            stream.cancel()


def test_a_full_copy_that_outlasts_the_update_log_still_converges():
    """A 40,000-row copy in 15 messages, read while pushes (with evictions) of 200 keys overflow a
    64-key log after each of the first 6 messages: the copy ends with what changed meanwhile; then
    live ranges follow pushes the log holds.

    Deterministic by construction, not by timing: flow control lets the shard run only a few
    messages ahead of this reader (a small receive window, no BDP probing), so the copy cannot
    have ended (its changes are read after its 15th message) while a 200-key push is made; a push
    after the copy must fit the log, since the live ranges come from it (a 200-key one then would
    rightly answer FAILED_PRECONDITION: the subscriber fell behind the log). The small pushes
    together fit it (3 x 20 keys, their evictions included), read or not."""
    table = TableConfig("user", dim=4, capacity=40_000, eviction=EvictionConfig(policy=EvictionPolicy.LRU))
    job = make_job([table], message_limit_bytes=1 << 16)
    with InProcessShards.start(job, log_max_keys=64) as shards, PSClient.from_job(shards.job) as client:
        rng = np.random.default_rng(0)
        client.push("user", np.arange(40_000, dtype=np.int64), np.ones((40_000, 4), np.float32))
        replica: dict[int, np.ndarray] = {}
        version = 0
        with grpc.insecure_channel(shards.job.shards[0].address, options=[("grpc.http2.bdp_probe", 0)]) as channel:
            stream = ps_pb2_grpc.ParameterServerStub(channel).Subscribe(
                ps_pb2.SubscribeRequest(table="user", full_sync=True), timeout=60
            )
            messages = big_pushes = small_pushes = 0
            copied = False
            for batch in stream:
                keys = wire.decode_keys(batch.keys)
                values = wire.decode_values(batch.values, keys.shape[0], 4)
                replica.update(zip(keys.tolist(), values, strict=True))
                for key in wire.decode_keys(batch.deleted_keys).tolist():
                    replica.pop(key, None)
                messages += 1
                if batch.last:
                    version, copied = batch.to_version, True
                if big_pushes < 6:  # beside the copy: updates, new rows, evictions
                    assert not copied, "the copy ended within 6 messages: flow control did not hold the shard"
                    keys = np.concatenate([rng.integers(0, 40_000, 100), rng.integers(10**6, 10**9, 100)])
                    client.push("user", keys.astype(np.int64), rng.standard_normal((200, 4)).astype(np.float32))
                    big_pushes += 1
                elif copied and small_pushes < 3:  # live ranges: 16 rows, 4 of them new (4 evicted)
                    keys = np.concatenate([rng.integers(0, 40_000, 12), rng.integers(10**9, 2 * 10**9, 4)])
                    client.push("user", keys.astype(np.int64), rng.standard_normal((16, 4)).astype(np.float32))
                    small_pushes += 1
                elif copied and small_pushes == 3 and version == shards.servicers[0].shard.tables["user"].version:
                    break
            stream.cancel()
        assert messages > 15 and big_pushes == 6 and small_pushes == 3
        live = shards.servicers[0].shard.tables["user"]
        keys = live.export().keys
        assert sorted(replica) == keys.tolist()
        np.testing.assert_array_equal(np.stack([replica[k] for k in keys.tolist()]), client.lookup("user", keys))


def next_commit(stream, after_step: int) -> tuple[ps_pb2.UpdateBatch, np.ndarray, np.ndarray]:
    """The next committed range past `after_step`: (its last message, keys, values); heartbeats skipped."""
    keys, values = [], []
    for batch in stream:
        k = wire.decode_keys(batch.keys)
        keys.append(k)
        values.append(wire.decode_values(batch.values, k.shape[0], 4))
        if batch.last and batch.HasField("step") and batch.step > after_step:
            return batch, np.concatenate(keys), np.concatenate(values)
        if batch.last:
            keys, values = [], []
    raise AssertionError("stream ended")


def test_committed_streams_carry_the_rows_of_each_commit_never_later_ones(cluster):
    """Commit(s) seals each table's changes with their rows as of s: a subscriber that reads after
    the pushes of s + 1 still gets s's rows; a full copy between commits completes at the next one."""
    keys = np.array([1, 2, 3], dtype=np.int64)
    grads = np.ones((3, 4), dtype=np.float32)
    with PSClient.from_job(cluster.job) as client:
        client.push("user", keys, grads, step=1)
        assert [r.step for r in client.commit(1)] == [1]
        # No committed stream was there: step 1 was recorded without its rows (nothing sealed, no
        # memory), so a stream from before it must resync in full.
        channel, stream = subscribe(cluster, committed=True, from_version=0)
        with channel, pytest.raises(grpc.RpcError) as info:
            next(iter(stream))
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        client.push("user", keys[:2], grads[:2], step=2)  # not committed yet
        channel, stream = subscribe(cluster, committed=True, full_sync=True)
        with channel:
            copy, _, _, _, _ = read_range(stream)
            assert copy.reset and copy.to_version == 2 and not copy.HasField("step")  # between two commits
            client.commit(2)
            batch, got, _ = next_commit(stream, 1)
            assert (batch.from_version, batch.to_version, batch.step, got.shape[0]) == (2, 2, 2, 0)  # the copy's step
            client.push("user", keys, grads, step=3)
            at_step_3 = client.lookup("user", keys)
            client.commit(3)
            client.push("user", keys, grads, step=4)  # before the subscriber reads step 3's range
            batch, got, values = next_commit(stream, 2)
            assert (batch.from_version, batch.to_version, batch.step) == (2, 3, 3) and batch.commit_time > 0
            np.testing.assert_array_equal(got, keys)
            np.testing.assert_array_equal(values, at_step_3)
            assert not np.array_equal(values, client.lookup("user", keys)), "step 4 changed no row"
            assert [r.step for r in client.commit(3)] == [3]  # a repeat changes nothing
            client.commit(4)
            next_commit(stream, 3)
            # A trainer resumed from an older snapshot commits step 2 again: a new history of steps.
            assert [r.step for r in client.commit(2)] == [2]
            with pytest.raises(grpc.RpcError) as info:
                next_commit(stream, 4)
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "new history" in info.value.details()


def test_replicas_keep_the_ps_int8_and_float16_rows_bit_for_bit():
    """With stored_rows the stream carries int8 and float16 rows as the PS table keeps them: a
    replica of the same storage holds them bit for bit, through a full copy (a 64-key log forces
    one) split into many messages and through live ranges after it; a float32 replica decodes
    them to the PS's lookups; a subscriber that does not ask for them gets float32 as before.
    (Re-encoding decoded int8 rows, as replicas did, changes about one row in 2,000: hence the
    20,000 rows.)"""
    optimizer = OptimizerConfig(kind=OptimizerKind.ROWWISE_ADAGRAD, lr=0.05)
    tables = [TableConfig("q8", dim=4, storage="int8", optimizer=optimizer),
              TableConfig("h16", dim=5, storage="float16", optimizer=optimizer)]
    job = make_job(tables, message_limit_bytes=1 << 14)  # about 800 int8 rows a message
    rng = np.random.default_rng(3)
    with InProcessShards.start(job, log_max_keys=64) as shards, PSClient.from_job(shards.job) as client:

        def push(keys: np.ndarray) -> None:
            for t in tables:
                client.push(t.name, keys, rng.normal(size=(keys.shape[0], t.dim)).astype(np.float32))

        push(np.arange(20_000, dtype=np.int64))
        push(rng.integers(0, 20_000, 400).astype(np.int64))
        replicas = [TableReplica(tables[0], job.shard_map, dtype=StorageDType.INT8),
                    TableReplica(tables[1], job.shard_map, dtype=StorageDType.FLOAT16),
                    TableReplica(tables[0], job.shard_map)]

        live = shards.servicers[0].shard.tables
        with following(shards, lambda channel: [ShardFollower(r, 0, channel, ServingMetrics()) for r in replicas]):
            for _ in range(3):  # live ranges once the copies are in
                push(rng.integers(0, 30_000, 20).astype(np.int64))
                wait_until(lambda: all(r.shards[0].version == live[r.name].version for r in replicas), "the replicas")
        assert all(r.shards[0].incarnation for r in replicas)  # they followed the shard, not an export
        for replica in replicas[:2]:
            state = live[replica.name].export()
            rows = replica.shards[0]
            words = np.zeros((state.keys.shape[0], rows.width), dtype=np.float32)
            assert rows.size == state.keys.shape[0] and rows.gather(state.keys, words).all()
            np.testing.assert_array_equal(words.view(np.uint8), state.encoded)
        keys = live["q8"].export().keys
        np.testing.assert_array_equal(replicas[2].lookup(keys)[0], client.lookup("q8", keys))

        with grpc.insecure_channel(shards.job.shards[0].address) as plain:
            stub = ps_pb2_grpc.ParameterServerStub(plain)
            for stored, dtype in [(False, ps_pb2.FLOAT32), (True, ps_pb2.INT8_ROWWISE)]:
                stream = stub.Subscribe(ps_pb2.SubscribeRequest(table="q8", full_sync=True, stored_rows=stored))
                first = next(iter(stream))
                stream.cancel()
                assert first.dtype == dtype and first.keys


def test_a_dense_tower_that_does_not_fit_beside_the_rows_ends_the_range_in_a_message_of_its_own():
    """A committed range of ~6 MB of rows (4 MB messages) with a dense tower of almost the whole
    message limit: the tower cannot ride on the range's last message (the stream used to fail with
    RESOURCE_EXHAUSTED and the replica reconnected into the same failure), so a message of no
    rows ends the range with it; the rows, the step and the tower all arrive."""
    limit = 8 << 20
    job = make_job([TableConfig("user", dim=8)], num_shards=1, message_limit_bytes=limit)
    keys = np.arange(150_000, dtype=np.int64)
    dense = bytes(range(256)) * ((limit - 2000) // 256)
    with InProcessShards.start(job) as shards, PSClient.from_job(shards.job) as client:
        with grpc.insecure_channel(shards.job.shards[0].address, options=[
            ("grpc.max_receive_message_length", limit + (1 << 16))
        ]) as channel:
            stream = ps_pb2_grpc.ParameterServerStub(channel).Subscribe(
                ps_pb2.SubscribeRequest(table="user", committed=True, full_sync=True, with_dense=True), timeout=60
            )
            messages = iter(stream)
            while not next(messages).last:  # the (empty) copy
                pass
            client.push("user", keys, np.ones((keys.shape[0], 8), np.float32), step=1)
            client.commit(1, dense, "bytes")
            got, sizes = [], []
            for batch in messages:
                sizes.append(batch.ByteSize())
                got.append(wire.decode_keys(batch.keys))
                if batch.last and batch.HasField("step") and batch.step >= 1:
                    break
                if batch.last:  # a heartbeat while the push and the commit ran
                    got, sizes = [], []
            assert batch.step == 1 and batch.dense_step == 1 and bytes(batch.dense_state) == dense
            assert not batch.keys and len(sizes) >= 3, sizes  # the tower alone, after the rows
            np.testing.assert_array_equal(np.sort(np.concatenate(got)), keys)
            assert max(sizes) <= limit, sizes


def test_a_follower_whose_shard_and_standby_are_both_down_backs_off(monkeypatch):
    """Both addresses of a pair refuse (nothing listens): after the first second, while the
    follower still hopes for a failover, its retries back off to one a second, as for a lone
    shard (before: each UNAVAILABLE swapped to the other address and retried 50 ms later, forever:
    20 calls a second per (table, shard) on the replica's event loop)."""
    attempts: list[float] = []
    follow = ShardFollower._follow

    async def counted(self, subscribe) -> None:
        attempts.append(time.monotonic())
        await follow(self, subscribe)

    monkeypatch.setattr(ShardFollower, "_follow", counted)
    replica = TableReplica(TableConfig("t", dim=4), ShardMap.uniform(1))
    (primary, standby) = (f"127.0.0.1:{port}" for port in free_ports(2))  # nothing listens there

    async def run() -> None:
        async with grpc.aio.insecure_channel(primary) as first, grpc.aio.insecure_channel(standby) as second:
            follower = ShardFollower(replica, 0, first, ServingMetrics(), standby_channel=second)
            task = asyncio.ensure_future(follower.run())
            started = time.monotonic()
            await asyncio.wait({task}, timeout=4.0)  # run() never returns: it follows until cancelled
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            late = [t for t in attempts if t - started > 2.0]
            assert len(attempts) >= 3 and follower.status.last_error.startswith("UNAVAILABLE")
            assert len(late) <= 4, f"{len(late)} attempts in the last 2 s of 4 (one a second when backed off)"

    asyncio.run(run())


def test_a_range_cut_off_before_the_rows_have_a_known_history_takes_a_full_copy_next():
    """A new replica (version 0, incarnation 0) writes a range into its rows message by message
    and learns the shard's incarnation at the range's end. Cut off before that end, it asked next
    from version 0 with incarnation 0, which the shard does not check: a shard restarted meanwhile
    (another incarnation, other rows) went on over the first one's rows, which stayed served."""
    requests: list[ps_pb2.SubscribeRequest] = []

    def batch(keys: list[int], value: float, incarnation: int, **fields) -> ps_pb2.UpdateBatch:
        k = np.array(keys, np.int64)
        return ps_pb2.UpdateBatch(table="t", incarnation=incarnation, keys=wire.encode_keys(k), dim=4,
                                  values=wire.encode_values(np.full((k.shape[0], 4), value, np.float32), 4), **fields)

    class Restarting(ps_pb2_grpc.ParameterServerServicer):
        async def Subscribe(self, request, context):
            requests.append(request)
            if len(requests) == 1:  # incarnation 11: the range's first message, then the process goes
                yield batch([1, 2], 1.0, 11, from_version=0, to_version=5)
                await context.abort(grpc.StatusCode.UNAVAILABLE, "restarting")
            else:  # incarnation 12, restarted empty: asked for a copy, it sends one
                yield batch([3], 2.0, 12, from_version=0, to_version=1, reset=request.full_sync, last=True)

    replica = TableReplica(TableConfig("t", dim=4), ShardMap.uniform(1))

    async def run() -> None:
        async with scripted_shard(Restarting()) as channel:
            follower = ShardFollower(replica, 0, channel, ServingMetrics())
            with pytest.raises(grpc.aio.AioRpcError):
                await follower._follow(follower.stub.Subscribe)
            await follower._follow(follower.stub.Subscribe)

    asyncio.run(run())
    assert [r.full_sync for r in requests] == [False, True]
    values, found = replica.lookup(np.array([1, 2, 3], np.int64))
    assert found.tolist() == [False, False, True] and values[2].tolist() == [2.0] * 4
    assert (replica.shards[0].version, replica.shards[0].incarnation) == (1, 12)
