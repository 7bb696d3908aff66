"""A real training shard and real `embps serve` replicas on loopback: freshness, lookup semantics,
malformed requests, kill/restart of the shard, resync after a gap, several replicas, exports."""

from __future__ import annotations

import os
import signal
import threading
import time
import urllib.request

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from ps.client import PSClient
from ps.rpc import ps_pb2, serving_pb2
from ps.table.config import Initializer, TableConfig
from ps.table.embedding_table import EmbeddingTable
from serving.client import ReplicasUnavailableError, ServingClient
from serving.config import DefaultRow
from serving.server import SERVICE_NAME
from tests.helpers.processes import make_job
from tests.helpers.waiting import wait_until
from tests.serving.replicas import ServingReplica, ShedEverything, start_cluster_with_log

USER = TableConfig("user", dim=4, initializer=Initializer.UNIFORM, init_scale=0.1, seed=5)
ITEM = TableConfig("item", dim=2)
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
DEADLINE = 15.0  # seconds a pushed row may take to show in serving (it takes milliseconds)


def wait_rows(replica: ServingReplica, keys: np.ndarray, expected: np.ndarray, timeout: float = DEADLINE) -> None:
    end = time.monotonic() + timeout
    while True:
        values, found, _ = replica.lookup("user", keys)
        if found.all() and np.array_equal(values, expected):
            return
        if time.monotonic() > end:
            raise AssertionError(f"serving did not show the pushed rows within {timeout} s:\n{replica.log()[-3000:]}")
        time.sleep(0.01)


def lookup_keys(replica: ServingReplica) -> float:
    """The replica's count of keys looked up in table "user" (its /metrics)."""
    scrape = urllib.request.urlopen(f"http://127.0.0.1:{replica.config.metrics_port}/metrics", timeout=5).read()
    for line in scrape.decode().splitlines():
        if line.startswith('embps_serving_lookup_keys_total{table="user"}'):
            return float(line.split()[-1])
    raise AssertionError("embps_serving_lookup_keys_total of table user not in the scrape")


def grads(n: int, value: float = 1.0) -> np.ndarray:
    return np.full((n, 4), value, dtype=np.float32)


def test_acknowledged_pushes_show_up_in_every_replica(start_cluster, tmp_path):
    cluster = start_cluster(make_job([USER, ITEM], num_shards=2))
    with (
        ServingReplica.start(cluster, tmp_path, "a", default=DefaultRow.INIT) as a,
        ServingReplica.start(cluster, tmp_path, "b") as b,
        PSClient.from_job(cluster.job) as client,
    ):
        keys = np.arange(200, dtype=np.int64)
        for step in range(3):
            client.push("user", keys[step::2], grads(keys[step::2].shape[0], step + 1.0))
            expected = client.lookup("user", keys[step::2])
            wait_rows(a, keys[step::2], expected)
            wait_rows(b, keys[step::2], expected)
        # Unknown keys: per-key found flag, the default of each replica.
        unknown = np.array([10_000, -7], dtype=np.int64)
        values, found, reply = a.lookup("user", np.concatenate([keys[:2], unknown]))
        assert found.tolist() == [True, True, False, False]
        np.testing.assert_array_equal(values[2:], EmbeddingTable(USER).init_values(unknown))
        assert sorted(s.shard for s in reply.shards) == [0, 1] and all(s.version > 0 for s in reply.shards)
        values, found, _ = b.lookup("user", unknown)
        assert not found.any() and not values.any()
        # The client library: one RPC for several tables, keys deduplicated, replicas in turn.
        mixed = np.array([5, 10_000, 5, 3, 5], dtype=np.int64)
        with ServingClient([a.config.listen, b.config.listen], timeout_s=10) as reader:
            for _ in range(2):  # each replica answers once
                values, found = reader.lookup("user", mixed)
                assert found.tolist() == [True, False, True, True, True]
                np.testing.assert_array_equal(values[[0, 2, 3]], client.lookup("user", mixed[[0, 2, 3]]))
                rows = reader.lookup_many({"user": mixed, "item": keys[:3]})
                assert set(rows) == {"user", "item"} and rows["item"][0].shape == (3, 2)
                np.testing.assert_array_equal(rows["user"][0][[0, 2, 3]], values[[0, 2, 3]])
        with ServingClient([a.config.listen], dtype=np.float16) as reader:
            half, _ = reader.lookup("user", keys[:8])
            assert half.dtype == np.float16
            np.testing.assert_array_equal(half, client.lookup("user", keys[:8]).astype(np.float16))
            looked_up = lookup_keys(a)
            reader.lookup("user", mixed)
            assert lookup_keys(a) - looked_up == 3  # each of the 3 distinct keys sent once
        half, _, reply = a.lookup("user", keys[:8], dtype=ps_pb2.FLOAT16)
        assert reply.dtype == ps_pb2.FLOAT16
        np.testing.assert_array_equal(half, client.lookup("user", keys[:8]).astype(np.float16).astype(np.float32))
        # Replicas are independent: b gone, a keeps following.
        b.stop()
        client.push("user", keys[:5], grads(5, 7.0))
        wait_rows(a, keys[:5], client.lookup("user", keys[:5]))
        # The client fails over: b is down (UNAVAILABLE), another replica sheds (RESOURCE_EXHAUSTED).
        with (
            ShedEverything() as shedding,
            ServingClient([b.config.listen, shedding.address, a.config.listen], timeout_s=10) as reader,
        ):
            for _ in range(3):  # each replica first once
                np.testing.assert_array_equal(reader.lookup("user", keys[:5])[0], client.lookup("user", keys[:5]))
                assert reader.lookup_many({"user": keys[:5]})["user"][1].all()
            assert shedding.calls >= 3
        with ServingClient([b.config.listen], timeout_s=10) as reader, pytest.raises(ReplicasUnavailableError) as info:
            reader.lookup("user", keys[:5])
        assert info.value.answers[0][:2] == (b.config.listen, grpc.StatusCode.UNAVAILABLE)
        scrape = urllib.request.urlopen(f"http://127.0.0.1:{a.config.metrics_port}/metrics", timeout=5).read().decode()
        for name in (
            'embps_serving_staleness_seconds_bucket{le="1.0",shard="0"}',
            'embps_serving_version{shard="1",table="user"}',
            'embps_serving_shard_stale{shard="0"} 0.0',
            "embps_serving_lookup_duration_seconds_count",
        ):
            assert name in scrape, name


def test_malformed_lookups_are_refused_and_the_replica_keeps_serving(start_cluster, tmp_path):
    cluster = start_cluster(make_job([USER], num_shards=1))
    with ServingReplica.start(cluster, tmp_path) as replica:
        stub = replica.stub
        bad = [
            (serving_pb2.ServingLookupRequest(table="user", keys=b"\0" * 7), grpc.StatusCode.INVALID_ARGUMENT),
            (serving_pb2.ServingLookupRequest(table="user", keys=b"\0" * 8, dim=5), grpc.StatusCode.INVALID_ARGUMENT),
            (serving_pb2.ServingLookupRequest(table="user", keys=b"\0" * 8, dtype=7), grpc.StatusCode.INVALID_ARGUMENT),
            (serving_pb2.ServingLookupRequest(table="nope", keys=b"\0" * 8), grpc.StatusCode.NOT_FOUND),
        ]
        for request, code in bad:
            with pytest.raises(grpc.RpcError) as info:
                stub.Lookup(request, timeout=5)
            assert info.value.code() == code, info.value.details()
            # The same lookup second in a LookupMany: the same status, and which lookup it was.
            good = serving_pb2.ServingLookupRequest(table="user", keys=b"\0" * 8)
            with pytest.raises(grpc.RpcError) as info:
                stub.LookupMany(serving_pb2.ServingLookupManyRequest(lookups=[good, request]), timeout=5)
            assert info.value.code() == code and info.value.details().startswith("lookups[1]: "), info.value.details()
        for method in ("Lookup", "LookupMany"):
            garbage = replica.channel.unary_unary(f"/embps.v1.Serving/{method}")
            with pytest.raises(grpc.RpcError) as info:
                garbage(b"\xff\xff\xff", timeout=5)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
        many = stub.LookupMany(serving_pb2.ServingLookupManyRequest(), timeout=5)
        assert list(many.results) == []
        values, found, _ = replica.lookup("user", np.arange(3, dtype=np.int64))
        assert values.shape == (3, 4) and not found.any()
        # The port offers no write method: only Lookup and Status, health and reflection.
        db = ProtoReflectionDescriptorDatabase(replica.channel)
        reflection = "grpc.reflection.v1alpha.ServerReflection"
        assert set(db.get_services()) == {SERVICE_NAME, "grpc.health.v1.Health", reflection}
        methods = {m.name for m in db.FindFileContainingSymbol(SERVICE_NAME).service[0].method}
        assert methods == {"Lookup", "LookupMany", "Status", "DenseModel"}
        assert replica.stop() == 0


def test_killed_shard_keeps_last_weights_then_restart_resyncs(start_cluster, tmp_path):
    cluster = start_cluster(make_job([USER], num_shards=1))
    with ServingReplica.start(cluster, tmp_path) as replica, PSClient.from_job(cluster.job) as client:
        keys = np.arange(50, dtype=np.int64)
        client.push("user", keys, grads(50, 2.0))
        last = client.lookup("user", keys)
        wait_rows(replica, keys, last)
        # A range's rows come before its last message (its acks), which moves the served version:
        # killed in between, the shard would leave the rows at version 0.
        wait_until(lambda: replica.status().shards[0].version == 1, "the replica at version 1")
        errors, mismatches, reads = [], [], [0]
        stop = threading.Event()

        def hammer() -> None:
            while not stop.is_set():
                try:
                    values, found, _ = replica.lookup("user", keys)
                    reads[0] += 1
                    if not (found.all() and np.array_equal(values, last)):
                        mismatches.append(found.sum())
                except grpc.RpcError as err:
                    errors.append(err.code())
                time.sleep(0.002)

        thread = threading.Thread(target=hammer)
        thread.start()
        try:
            os.kill(cluster.procs[0].pid, signal.SIGKILL)
            cluster.procs[0].wait()
            replica.wait_health(f"{SERVICE_NAME}/shard-0", NOT_SERVING)
            status = replica.status().shards[0]
            assert status.stale and not status.connected and status.version == 1
            assert replica.health(SERVICE_NAME) == SERVING
            scrape = urllib.request.urlopen(f"http://127.0.0.1:{replica.config.metrics_port}/metrics", timeout=5)
            assert 'embps_serving_shard_stale{shard="0"} 1.0' in scrape.read().decode()
        finally:
            stop.set()
            thread.join()
        assert errors == [] and mismatches == [] and reads[0] > 0
        # The shard comes back empty (version 0 < 1): serving drops the old history, not mixes it.
        cluster.restart(0)
        client.push("user", keys[:3], grads(3, 5.0))
        fresh = client.lookup("user", keys[:3])
        # Row-wise adagrad's first step does not depend on the gradient's size, so the old rows of
        # keys[:3] equal the fresh ones: wait for the resync itself, then for the rows.
        end = time.monotonic() + DEADLINE
        while replica.status().shards[0].num_resyncs < 1:
            assert time.monotonic() < end, replica.log()[-3000:]
            time.sleep(0.02)
        wait_rows(replica, keys[:3], fresh)
        _, found, _ = replica.lookup("user", keys)
        assert found.tolist() == [True] * 3 + [False] * 47
        replica.wait_health(f"{SERVICE_NAME}/shard-0", SERVING)
        status = replica.status().shards[0]
        assert status.num_resyncs >= 1 and status.version == 1 and status.rows == 3


def test_a_silent_stream_makes_its_shard_stale_until_it_talks_again(start_cluster, tmp_path):
    """A shard that stops without closing its stream (SIGSTOP: the connection stays up) is stale
    once its stream is silent past stale_after_seconds; SIGCONT makes it fresh again.
    The replica's monitor has no short tick: it wakes at that deadline. /metrics reads the seconds
    since the last message at scrape time."""
    cluster = start_cluster(make_job([USER], num_shards=1))
    with ServingReplica.start(cluster, tmp_path) as replica:
        shard = f"{SERVICE_NAME}/shard-0"
        replica.wait_health(shard, SERVING)
        threshold = replica.config.stale_after_seconds
        pid = cluster.procs[0].pid
        os.kill(pid, signal.SIGSTOP)
        try:
            replica.wait_health(shard, NOT_SERVING)
            status = replica.status().shards[0]
            assert status.connected and status.stale and status.seconds_since_message > threshold
            scrape = urllib.request.urlopen(f"http://127.0.0.1:{replica.config.metrics_port}/metrics", timeout=5)
            text = scrape.read().decode()
            assert 'embps_serving_shard_stale{shard="0"} 1.0' in text
            since = next(
                float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                if line.startswith('embps_serving_seconds_since_message{shard="0",table="user"}')
            )
            assert since > threshold
            assert 'embps_serving_memory_bytes{table="user"}' in text
        finally:
            os.kill(pid, signal.SIGCONT)
        replica.wait_health(shard, SERVING)
        assert not replica.status().shards[0].stale


def test_a_gap_in_the_stream_forces_a_resync(tmp_path):
    cluster = start_cluster_with_log(make_job([USER], num_shards=1), tmp_path, 100)
    try:
        with PSClient.from_job(cluster.job) as client:
            for i in range(4):  # 4 x 60 keys > the 100-key log: a replica starting now must resync
                client.push("user", np.arange(60 * i, 60 * i + 60, dtype=np.int64), grads(60))
            with ServingReplica.start(cluster, tmp_path) as replica:
                keys = np.arange(240, dtype=np.int64)
                wait_rows(replica, keys, client.lookup("user", keys))
                assert replica.status().shards[0].num_resyncs == 1
                # A stopped replica falls behind while pushes go on: it catches up, through ranges
                # merged by the shard, or through another resync if the log moved past it.
                os.kill(replica.proc.pid, signal.SIGSTOP)
                try:
                    big = np.arange(1000, 3000, dtype=np.int64)
                    for i in range(3):
                        client.push("user", big, grads(2000, float(i)))
                finally:
                    os.kill(replica.proc.pid, signal.SIGCONT)
                wait_rows(replica, big, client.lookup("user", big))
                status = replica.status().shards[0]
                assert status.version == 7 and status.num_resyncs >= 1, status
    finally:
        cluster.stop()


def test_starts_from_the_latest_export_while_the_shard_is_down(start_cluster, tmp_path):
    """consistency = "step": the export's step is served, also once the shard comes back empty
    (an older state: the cut never goes back), until the shard commits a later step."""
    snapshot_ops = pytest.importorskip("ps.snapshot.ops")
    job = make_job([USER], num_shards=1)
    table = EmbeddingTable(USER)
    keys = np.arange(30, dtype=np.int64)
    table.apply_gradients(keys, grads(30, 3.0))
    snapper = snapshot_ops.ShardSnapshotter({"user": table}, shard=0)
    snapper.snapshot(f"file://{tmp_path}/snap", job.job, step=1)
    snapshot_ops.export_for_serving(f"file://{tmp_path}/snap", job.job, None, f"file://{tmp_path}/export")
    cluster = start_cluster(job)
    cluster.stop()  # the PS is gone: serving must come up from the export alone
    from serving.config import Consistency, ExportSource

    export = ExportSource(f"file://{tmp_path}/export", job.job)
    with ServingReplica.start(cluster, tmp_path, export=export, consistency=Consistency.STEP) as replica:
        values, found, reply = replica.lookup("user", keys)
        assert found.all()
        np.testing.assert_array_equal(values, table.lookup(keys).numpy())
        assert reply.shards[0].version == 1 and reply.shards[0].stale and reply.model_version == 1
        cluster.restart(0)  # empty: step 0, older than the export
        wait_until(lambda: replica.status().shards[0].connected, "the replica's stream to the restarted shard")
        _, found, reply = replica.lookup("user", keys)
        assert found.all() and reply.model_version == 1
        new_keys = np.arange(1000, 1010, dtype=np.int64)
        with PSClient.from_job(cluster.job) as client:
            client.push("user", new_keys, grads(10, 1.0), step=2)
            client.commit(2)
            wait_until(lambda: replica.lookup("user", new_keys)[2].model_version == 2, "the cut at step 2")
            values, found, _ = replica.lookup("user", new_keys)
            assert found.all()
            np.testing.assert_array_equal(values, client.lookup("user", new_keys))
        assert not replica.lookup("user", keys)[1].any(), "the export's rows outlived the shard's newer step"


def test_export_rows_never_mix_with_a_shard_that_reached_their_version_with_other_rows(start_cluster, tmp_path):
    """The export is at version 1 of one history; the live shard, started empty, reaches version 1
    with other keys. Serving must end up with exactly the shard's rows, not a union."""
    from ps.snapshot import ops as snapshot_ops
    from serving.config import ExportSource

    job = make_job([USER], num_shards=1)
    table = EmbeddingTable(USER)
    old_keys = np.arange(30, dtype=np.int64)
    table.apply_gradients(old_keys, grads(30, 3.0))
    snapshot_ops.ShardSnapshotter({"user": table}, shard=0).snapshot(f"file://{tmp_path}/snap", job.job, step=1)
    snapshot_ops.export_for_serving(f"file://{tmp_path}/snap", job.job, None, f"file://{tmp_path}/export")
    cluster = start_cluster(job)
    new_keys = np.arange(1000, 1010, dtype=np.int64)
    with PSClient.from_job(cluster.job) as client:
        assert client.push("user", new_keys, grads(10, 1.0)).versions[0] == 1  # same version, other rows
        expected_new = client.lookup("user", new_keys)
    export = ExportSource(f"file://{tmp_path}/export", job.job)
    with ServingReplica.start(cluster, tmp_path, export=export) as replica:
        wait_rows(replica, new_keys, expected_new)
        _, found, _ = replica.lookup("user", old_keys)
        assert not found.any(), "rows of the export's history are mixed into the shard's"
