"""A shard's calls through the one call wrapper (ps/process/calls.py), on a real server on port 0
in this process: every method, WriteSnapshot included, is counted with its status code and timed."""

from __future__ import annotations

import asyncio
import dataclasses
import json

import grpc
import numpy as np
import pytest

from ps import wire
from ps.job_config import SnapshotConfig
from ps.rpc import ps_pb2, ps_pb2_grpc, snapshot_pb2, snapshot_pb2_grpc
from ps.shard.metrics import ShardMetrics
from ps.shard.server import create_server
from ps.table.config import TableConfig
from tests.helpers.processes import make_job
from tests.helpers.waiting import wait_until

USER = TableConfig("user", dim=4)
DEADLINE = 10.0


def sample(metrics: ShardMetrics, name: str, **labels: str) -> float:
    """The sample's value, 0 where the series does not exist (yet)."""
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def with_shard(test, tmp_path, snapshots: bool = True) -> ShardMetrics:
    """Runs `await test(channel, servicer)` against a fresh one-shard server; returns its metrics.
    snapshots: the job's [snapshot] uri is tmp_path (write_request's); False: no [snapshot] section."""
    job = make_job([USER], job="calls")
    if snapshots:
        job = dataclasses.replace(job, snapshot=SnapshotConfig(tmp_path.as_uri()))
    metrics = ShardMetrics(0)
    server, port, servicer, _health = await create_server(job, 0, address="127.0.0.1:0", metrics=metrics)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await test(channel, servicer)
    finally:
        await server.stop(None)
        servicer.executor.shutdown()
    return metrics


def write_request(tmp_path, job: str = "calls", step: int = 1) -> snapshot_pb2.WriteSnapshotRequest:
    return snapshot_pb2.WriteSnapshotRequest(uri=tmp_path.as_uri(), job=job, step=step, kind="full", num_shards=1)


async def expect_code(call, code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == code, info.value.details()
    return info.value


def test_write_snapshot_is_counted_and_timed_with_its_code(tmp_path):
    async def test(channel, servicer):
        snapshots = snapshot_pb2_grpc.SnapshotControlStub(channel)
        reply = await snapshots.WriteSnapshot(write_request(tmp_path), timeout=DEADLINE)
        assert json.loads(reply.records_json), "a full snapshot of one table writes a file"
        error = await expect_code(
            snapshots.WriteSnapshot(write_request(tmp_path, job="other", step=2), timeout=DEADLINE),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert "this shard serves job 'calls'" in error.details()

    metrics = asyncio.run(with_shard(test, tmp_path))
    assert sample(metrics, "embps_requests_total", table="", method="WriteSnapshot", code="OK") == 1
    assert sample(metrics, "embps_requests_total", table="", method="WriteSnapshot", code="INVALID_ARGUMENT") == 1
    assert sample(metrics, "embps_request_duration_seconds_count", table="", method="WriteSnapshot") == 2
    assert sample(metrics, "embps_request_duration_seconds_sum", table="", method="WriteSnapshot") > 0


def test_unknown_table_and_undecodable_bytes_are_counted_with_their_codes(tmp_path):
    keys = np.arange(5, dtype="<i8").tobytes()

    async def test(channel, servicer):
        stub = ps_pb2_grpc.ParameterServerStub(channel)
        await stub.Lookup(ps_pb2.LookupRequest(table="user", keys=keys, dim=4), timeout=DEADLINE)
        await expect_code(
            stub.Lookup(ps_pb2.LookupRequest(table="nope", keys=keys, dim=4), timeout=DEADLINE),
            grpc.StatusCode.NOT_FOUND,
        )
        raw = channel.unary_unary("/embps.v1.ParameterServer/Lookup")  # bytes in, bytes out
        error = await expect_code(raw(b"\xff\xff\xff", timeout=DEADLINE), grpc.StatusCode.INVALID_ARGUMENT)
        assert "not a valid message for /embps.v1.ParameterServer/Lookup" in error.details()

    metrics = asyncio.run(with_shard(test, tmp_path))
    assert sample(metrics, "embps_requests_total", table="user", method="Lookup", code="OK") == 1
    assert sample(metrics, "embps_requests_total", table="unknown", method="Lookup", code="NOT_FOUND") == 1
    assert sample(metrics, "embps_requests_total", table="", method="Lookup", code="INVALID_ARGUMENT") == 1
    assert sample(metrics, "embps_request_duration_seconds_count", table="unknown", method="Lookup") == 1
    assert sample(metrics, "embps_request_keys_total", table="user", method="Lookup") == 5


def test_multi_table_calls_count_each_tables_keys_whatever_their_offsets(tmp_path):
    """Keys per table of LookupMulti / PushMulti, a table the shard lacks under one label, and
    offsets no check has read (a failed call, a repeated push id) counted without an error,
    within the keys the request carries."""
    keys = np.arange(5, dtype="<i8").tobytes()
    grads = np.zeros(5 * 4, dtype="<f4").tobytes()
    push_id = ps_pb2.PushId(client_id=b"c" * 16, sequence=1)

    async def test(channel, servicer):
        stub = ps_pb2_grpc.ParameterServerStub(channel)
        lookup = ps_pb2.MultiLookupRequest(tables=["user"], dims=[4], offsets=[0, 5], keys=keys)
        await stub.LookupMulti(lookup, timeout=DEADLINE)
        push = ps_pb2.MultiPushRequest(
            tables=["user"], dims=[4], offsets=[0, 5], keys=keys, grads=grads, dtype=ps_pb2.FLOAT32, push_id=push_id
        )
        await stub.PushMulti(push, timeout=DEADLINE)
        # The same push id again with nonsense offsets: answered from the push-id memory, unread
        # (its tables are checked first, as the first push's were).
        again = ps_pb2.MultiPushRequest(
            tables=["user"],
            dims=[4],
            offsets=[0, 2**64 - 1],
            keys=keys,
            grads=grads,
            dtype=ps_pb2.FLOAT32,
            push_id=push_id,
        )
        assert (await stub.PushMulti(again, timeout=DEADLINE)).duplicate
        missing = ps_pb2.MultiLookupRequest(tables=["user", "nope"], dims=[4, 4], offsets=[0, 3, 5], keys=keys)
        await expect_code(stub.LookupMulti(missing, timeout=DEADLINE), grpc.StatusCode.NOT_FOUND)

    metrics = asyncio.run(with_shard(test, tmp_path))
    assert sample(metrics, "embps_request_keys_total", table="user", method="LookupMulti") == 5 + 3
    assert sample(metrics, "embps_request_keys_total", table="unknown", method="LookupMulti") == 2
    # The repeat's offsets bounded by the 5 keys it carries (before: 2^64 - 1, and the counter
    # stayed there).
    assert sample(metrics, "embps_request_keys_total", table="user", method="PushMulti") == 5 + 5
    assert sample(metrics, "embps_requests_total", table="", method="PushMulti", code="OK") == 2
    assert sample(metrics, "embps_requests_total", table="", method="LookupMulti", code="NOT_FOUND") == 1


def test_a_job_without_a_snapshot_section_refuses_snapshot_calls_failed_precondition(tmp_path):
    """Such a job names no place for snapshots: its shards write none, wherever a request names."""

    async def test(channel, servicer):
        snapshots = snapshot_pb2_grpc.SnapshotControlStub(channel)
        error = await expect_code(
            snapshots.WriteSnapshot(write_request(tmp_path), timeout=DEADLINE), grpc.StatusCode.FAILED_PRECONDITION
        )
        assert "has no [snapshot] section" in error.details()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in snapshots.StageSnapshot(write_request(tmp_path), timeout=DEADLINE):
                pass
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION, info.value.details()

    asyncio.run(with_shard(test, tmp_path, snapshots=False))
    assert not list(tmp_path.iterdir()), "a refused snapshot call writes nothing"


def test_a_draining_shard_refuses_every_method_unavailable_and_counts_it(tmp_path):
    async def test(channel, servicer):
        servicer.begin_drain()
        stub = ps_pb2_grpc.ParameterServerStub(channel)
        error = await expect_code(stub.Stats(ps_pb2.StatsRequest(), timeout=DEADLINE), grpc.StatusCode.UNAVAILABLE)
        assert error.details() == "shard 0 is shutting down"
        snapshots = snapshot_pb2_grpc.SnapshotControlStub(channel)
        await expect_code(
            snapshots.WriteSnapshot(write_request(tmp_path), timeout=DEADLINE), grpc.StatusCode.UNAVAILABLE
        )

    metrics = asyncio.run(with_shard(test, tmp_path))
    assert sample(metrics, "embps_requests_total", table="", method="Stats", code="UNAVAILABLE") == 1
    assert sample(metrics, "embps_requests_total", table="", method="WriteSnapshot", code="UNAVAILABLE") == 1
    assert not list(tmp_path.iterdir()), "a refused WriteSnapshot writes nothing"


def test_a_call_refused_for_its_many_parts_or_tables_is_counted_as_one_call(tmp_path):
    """A LookupBatch of more than MAX_BATCH_PARTS parts is refused before they are read, and a
    LookupMulti naming more tables than a batch holds cannot be valid; their metrics visited every
    part or name all the same, on the event loop (250,000 parts: 0.5 s, every other call waiting).
    Now such a call is counted (code, bytes), not its parts."""
    parts = wire.MAX_BATCH_PARTS + 1
    keys = np.arange(1, dtype="<i8").tobytes()

    async def test(channel, servicer):
        stub = ps_pb2_grpc.ParameterServerStub(channel)
        batch = ps_pb2.LookupBatchRequest(requests=[ps_pb2.LookupRequest(table="user", keys=keys, dim=4)] * parts)
        await expect_code(stub.LookupBatch(batch, timeout=DEADLINE), grpc.StatusCode.INVALID_ARGUMENT)
        multi = ps_pb2.MultiLookupRequest(
            tables=["user"] * parts, dims=[4] * parts, offsets=list(range(parts + 1)), keys=keys * parts
        )
        await expect_code(stub.LookupMulti(multi, timeout=DEADLINE), grpc.StatusCode.INVALID_ARGUMENT)

    metrics = asyncio.run(with_shard(test, tmp_path))
    for method in ("LookupBatch", "LookupMulti"):
        assert sample(metrics, "embps_requests_total", table="", method=method, code="INVALID_ARGUMENT") == 1
        assert sample(metrics, "embps_request_keys_total", table="user", method=method) == 0, method
    assert sample(metrics, "embps_request_payload_bytes_total", table="", method="LookupMulti") == 8 * parts


def test_a_call_cancelled_at_its_deadline_is_counted_and_timed(tmp_path):
    """A push whose deadline passed while it waited for the tables (held here) was cancelled by
    grpc.aio and counted nowhere, though it is applied once the tables are free (found by a
    review: the slow calls were missing from every counter and histogram). Now it is counted
    (DEADLINE_EXCEEDED, or CANCELLED when the client's cancel reached it first) and timed."""
    keys = np.arange(5, dtype="<i8").tobytes()
    grads = np.zeros(5 * 4, dtype="<f4").tobytes()

    async def test(channel, servicer):
        stub = ps_pb2_grpc.ParameterServerStub(channel)
        servicer._tables_lock.acquire()
        try:
            push = ps_pb2.PushRequest(table="user", keys=keys, grads=grads, dim=4)
            await expect_code(stub.Push(push, timeout=0.3), grpc.StatusCode.DEADLINE_EXCEEDED)
            # The client's deadline passes first: released (or the server stopped) before the server
            # ended the call, the push ran (OK) or was cancelled by the stop (a fresh clone's run).
            # On a thread: the server this waits for runs on this loop.
            await asyncio.to_thread(wait_until, lambda: ended(servicer.metrics), "the server to end the push", 10.0)
        finally:
            servicer._tables_lock.release()

    def ended(metrics: ShardMetrics) -> float:
        # DEADLINE_EXCEEDED when the server's deadline fired first, CANCELLED when the client's
        # cancel came first: the timeout travels as a duration, so the server's deadline is later
        # than the client's by the request's way there, and either may come first.
        return sum(sample(metrics, "embps_requests_total", table="user", method="Push", code=code)
                   for code in ("DEADLINE_EXCEEDED", "CANCELLED"))

    metrics = asyncio.run(with_shard(test, tmp_path))
    assert ended(metrics) == 1
    assert sample(metrics, "embps_requests_total", table="user", method="Push", code="OK") == 0
    assert sample(metrics, "embps_request_duration_seconds_count", table="user", method="Push") == 1


def test_a_multi_table_request_of_the_wrong_shape_is_refused_before_its_fields_are_read(tmp_path, monkeypatch):
    """A LookupMulti / PushMulti of no tables and 64M offsets (61 MiB, under the message limit) held
    the shard's event loop 10-15 s and grew it by 2.6 GB: its offsets became arrays (the work
    estimate, the metrics, the decode) before their count was checked. The counts of tables, dims and
    offsets are checked first now, from the fields' lengths; nothing reads the offsets after that."""
    from ps.shard import server as server_module

    read: list[int] = []
    real_sizes, real_payload = server_module.table_sizes, server_module.payload_bytes

    def table_sizes(offsets, *args, **kwargs):
        read.append(len(offsets))
        return real_sizes(offsets, *args, **kwargs)

    def payload_bytes(request, *args, **kwargs):
        read.append(len(getattr(request, "offsets", ())))
        return real_payload(request, *args, **kwargs)

    monkeypatch.setattr(server_module, "table_sizes", table_sizes)
    monkeypatch.setattr(server_module, "payload_bytes", payload_bytes)
    many = [0] * 100_000
    keys = np.arange(5, dtype="<i8").tobytes()

    async def test(channel, servicer):
        stub = ps_pb2_grpc.ParameterServerStub(channel)
        for call, request, field in (
            (stub.LookupMulti, ps_pb2.MultiLookupRequest(offsets=many), "offsets: expected 1 offsets for 0 tables"),
            (stub.PushMulti, ps_pb2.MultiPushRequest(offsets=many, dtype=ps_pb2.FLOAT32), "offsets: expected 1"),
            (stub.PushMulti, ps_pb2.MultiPushRequest(tables=["user"], dims=many, offsets=[0, 5], keys=keys),
             "dims: 100000 dims for 1 tables"),
            (stub.LookupMulti, ps_pb2.MultiLookupRequest(tables=["user"] * 2000, dims=[4] * 2000, offsets=[0] * 2001),
             "tables: at most 1024 tables in one request, got 2000"),
        ):
            error = await expect_code(call(request, timeout=DEADLINE), grpc.StatusCode.INVALID_ARGUMENT)
            assert field in error.details(), error.details()
        assert max(read, default=0) <= 2001, read  # nothing read 100,000 of them
        await stub.LookupMulti(ps_pb2.MultiLookupRequest(tables=["user"], dims=[4], offsets=[0, 5], keys=keys),
                               timeout=DEADLINE)

    asyncio.run(with_shard(test, tmp_path))


def test_offsets_of_the_wrong_count_are_refused_unread():
    class Unreadable(list):
        def __iter__(self):
            raise AssertionError("read")

    with pytest.raises(ValueError, match=r"^offsets: expected 3 offsets for 2 tables, got 5$"):
        wire.decode_offsets(Unreadable([0] * 5), 2, 10)


def test_a_subscribe_range_of_many_pushes_is_merged_off_the_event_loop(tmp_path, monkeypatch):
    """A live range was merged on the event loop whenever it held few keys, but the merge's Python
    runs per log entry: 16,000 one-key pushes took 50 ms of the loop for each Subscribe from an
    old version, and 150 such calls held every other call of the shard for seconds (a trainer's
    Lookup failed its 10 s deadline). A range of more than a few pushes is merged on a thread."""
    import threading

    from ps.shard import server as server_module
    from ps.shard import update_log

    merged: list[tuple[bool, int]] = []  # (on the event loop's thread, pushes merged)
    real = update_log.merge_entries

    def merge_entries(from_version, to_version, entries):
        merged.append((threading.current_thread() is threading.main_thread(), to_version - from_version))
        return real(from_version, to_version, entries)

    monkeypatch.setattr(update_log, "merge_entries", merge_entries)
    monkeypatch.setattr(server_module, "merge_entries", merge_entries)
    pushes = 200  # more than a few (INLINE_MERGE_ENTRIES)

    async def test(channel, servicer):
        stub = ps_pb2_grpc.ParameterServerStub(channel)
        for i in range(pushes):
            await stub.Push(ps_pb2.PushRequest(table="user", dim=4, keys=np.array([i], "<i8").tobytes(),
                                               grads=np.ones(4, "<f4").tobytes(), dtype=ps_pb2.FLOAT32),
                            timeout=DEADLINE)
        call = stub.Subscribe(ps_pb2.SubscribeRequest(table="user", from_version=0), timeout=DEADLINE)
        async for batch in call:
            if batch.to_version == pushes:
                break
        call.cancel()
        # ... and a live follower's range of one push stays where it is read
        await stub.Push(ps_pb2.PushRequest(table="user", dim=4, keys=np.array([0], "<i8").tobytes(),
                                           grads=np.ones(4, "<f4").tobytes(), dtype=ps_pb2.FLOAT32), timeout=DEADLINE)
        call = stub.Subscribe(ps_pb2.SubscribeRequest(table="user", from_version=pushes), timeout=DEADLINE)
        async for batch in call:
            if batch.to_version == pushes + 1:
                break
        call.cancel()

    asyncio.run(with_shard(test, tmp_path))
    assert (False, pushes) in merged and (True, pushes) not in merged, merged
    assert (True, 1) in merged, merged
