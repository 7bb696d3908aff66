"""Snapshots on a real S3 server (SeaweedFS on 127.0.0.1, credentials checked): write, restore
full + incrementals, export, gc, wrong credentials failing fast with a clear error, and a shard
whose files hang on a server that stopped answering refusing a snapshot of another step."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import threading
import time

import grpc
import numpy as np
import pyarrow.fs as pafs
import pytest

from ps import wire
from ps.client import PSClient
from ps.job_config import SnapshotConfig
from ps.rpc import snapshot_pb2, snapshot_pb2_grpc
from ps.snapshot.files import SnapshotWriter, latest, list_snapshots, open_snapshot, read_manifest_at, restore
from ps.snapshot.ops import ShardSnapshotter, collect_garbage, export_for_serving
from ps.snapshot.storage import StorageConfig, StorageUnavailableError, open_uri
from ps.table.config import OptimizerConfig, OptimizerKind, TableConfig
from tests.helpers.processes import free_ports, make_job
from tests.helpers.s3_server import S3Server, StopsAtTableWrite
from tests.helpers.waiting import wait_until
from tests.ps.test_snapshot import assert_same_state, evicting_table, push


def test_full_and_incrementals_restore_from_s3(s3):
    uri = s3.fresh_uri()
    rng = np.random.default_rng(11)
    tables = {"user": evicting_table("user", 1), "item": evicting_table("item", 2)}
    snapper = ShardSnapshotter(tables, 0)
    expected = {}
    for step, kind in ((10, "full"), (20, "incremental"), (30, "incremental")):
        for s in range(3):
            for table in tables.values():
                push(table, rng, step - 3 + s, n=120)
        snapper.snapshot(uri, "job", step, kind, extras={"dense.pt": f"dense{step}".encode()}, storage_config=s3.config)
        expected[step] = {name: t.export() for name, t in tables.items()}
    assert [m.kind for m in list_snapshots(uri, "job", s3.config)] == ["full", "incremental", "incremental"]
    assert latest(uri, "job", s3.config) == 30
    fs, base = open_uri(uri, s3.config)
    with fs.open_input_stream(f"{base}/job/LATEST") as f:
        assert f.read() == b"30\n"
    for step, want in expected.items():
        got = restore(uri, "job", step, s3.config)
        for name, state in want.items():
            assert_same_state(got[name][0], state)
    assert open_snapshot(uri, "job", 20, s3.config).read_extra("dense.pt") == b"dense20"


def test_incomplete_step_on_s3_is_invisible(s3):
    uri = s3.fresh_uri()
    table = evicting_table("t", 3)
    push(table, np.random.default_rng(0), 1)
    ShardSnapshotter({"t": table}, 0).snapshot(uri, "job", 1, storage_config=s3.config)
    writer = SnapshotWriter(uri, "job", 2, storage_config=s3.config)
    writer.write_table_shard("t", 0, table.export())  # never committed
    assert [m.step for m in list_snapshots(uri, "job", s3.config)] == [1]
    assert latest(uri, "job", s3.config) == 1
    assert collect_garbage(uri, "job", keep=1, storage_config=s3.config).deleted_incomplete == ()


def test_export_from_s3_to_s3_and_gc(s3):
    src, dst = s3.fresh_uri(), s3.fresh_uri()
    table = evicting_table("t", 4)
    rng = np.random.default_rng(1)
    snapper = ShardSnapshotter({"t": table}, 0)
    for step, kind in ((1, "full"), (2, "incremental"), (3, "full")):
        push(table, rng, step)
        snapper.snapshot(src, "job", step, kind, extras={"dense.pt": b"w"}, storage_config=s3.config)
    manifest = export_for_serving(src, "job", None, dst, "float16", s3.config, s3.config)
    assert manifest.kind == "export" and latest(dst, "job", s3.config) == 3
    exported = open_snapshot(dst, "job", None, s3.config)
    keys, values = exported.load_values("t", 0)
    want = table.export()
    assert np.array_equal(keys, want.keys) and values.dtype == np.float16
    np.testing.assert_allclose(values, want.values, rtol=1e-3, atol=1e-4)
    assert exported.read_extra("dense.pt") == b"w"
    result = collect_garbage(src, "job", keep=1, storage_config=s3.config)
    assert result.kept == (3,) and result.deleted == (1, 2)
    assert [m.step for m in list_snapshots(src, "job", s3.config)] == [3]
    fs, base = open_uri(src, s3.config)
    assert fs.get_file_info(f"{base}/job/1/manifest.json").type == pafs.FileType.NotFound


def test_wrong_credentials_fail_fast_with_a_clear_error(s3):
    uri = s3.fresh_uri()
    table = evicting_table("t", 5)
    push(table, np.random.default_rng(2), 1)
    ShardSnapshotter({"t": table}, 0).snapshot(uri, "job", 1, storage_config=s3.config)
    bad = StorageConfig(
        endpoint_override=s3.config.endpoint_override,
        scheme="http",
        access_key=s3.config.access_key,
        secret_key="not-the-secret",
        connect_timeout=2.0,
        request_timeout=5.0,
    )
    start = time.monotonic()
    with pytest.raises(OSError, match="ACCESS_DENIED|SIGNATURE_DOES_NOT_MATCH|AccessDenied"):
        restore(uri, "job", 1, bad)
    with pytest.raises(OSError, match="ACCESS_DENIED|SIGNATURE_DOES_NOT_MATCH|AccessDenied"):
        ShardSnapshotter({"t": table}, 0).snapshot(uri, "job", 2, storage_config=bad)
    assert time.monotonic() - start < 30
    assert latest(uri, "job", s3.config) == 1


def test_an_endpoint_out_of_reach_is_storage_unavailable_naming_the_path():
    """Listing and reading raised pyarrow's OSError, past every `except StorageError`: `embps launch
    --resume` and a launch's restart ended in a traceback instead of a line naming the snapshots."""
    (port,) = free_ports(1)  # nothing listens there
    nowhere = StorageConfig(
        endpoint_override=f"127.0.0.1:{port}", scheme="http", access_key="a", secret_key="b",
        connect_timeout=1.0, request_timeout=1.0, max_attempts=1,
    )
    uri = "s3://bucket/snaps"
    with pytest.raises(StorageUnavailableError, match=r"^listing bucket/snaps/job: .*"):
        latest(uri, "job", nowhere)
    with pytest.raises(StorageUnavailableError, match=r"^listing bucket/snaps/job: .*"):
        list_snapshots(uri, "job", nowhere)
    fs, base = open_uri(uri, nowhere)
    with pytest.raises(StorageUnavailableError, match=r"^reading bucket/snaps/job/1/manifest\.json: "):
        read_manifest_at(fs, base + "/job", 1)


def _job_whose_snapshots_wait_for(server: S3Server):
    """A one-table job whose snapshots go to bucket "snaps" of `server`, each storage call waiting
    for it up to 300 s (a server that stopped answering is a storage that hangs)."""
    server.create_bucket("snaps")
    storage = dataclasses.replace(server.storage_config(), request_timeout=300.0)
    table = TableConfig("t", dim=4, optimizer=OptimizerConfig(kind=OptimizerKind.SGD, lr=0.1))
    return dataclasses.replace(make_job([table], job="job"), snapshot=SnapshotConfig("s3://snaps/job", storage=storage))


def test_a_shard_whose_files_hang_refuses_a_snapshot_of_another_step_at_once_naming_it(
    tmp_path, start_shards, monkeypatch
):
    """A shard's files of step 1 hang on an S3 server that stopped answering. A StageSnapshot or a
    WriteSnapshot of step 2 is refused at once, FAILED_PRECONDITION naming step 1 (the coordinator
    reads the step from the trailing metadata); a retry of step 1 waits for its files. Once the
    server answers, step 1's files are written and step 2 is taken."""
    server = S3Server.start(tmp_path / "s3")
    hang = None
    try:
        job = _job_whose_snapshots_wait_for(server)
        shards = start_shards(job)
        client = PSClient.from_job(shards.job)
        client.push("t", np.arange(10, dtype=np.int64), np.ones((10, 4), np.float32))
        client.close()

        def request(step: int) -> snapshot_pb2.WriteSnapshotRequest:
            return snapshot_pb2.WriteSnapshotRequest(uri="s3://snaps/job", job="job", step=step, kind="full")

        hang = StopsAtTableWrite(server, 1, monkeypatch)
        with grpc.insecure_channel(shards.job.shards[0].address) as channel:
            stub = snapshot_pb2_grpc.SnapshotControlStub(channel)
            first = stub.StageSnapshot(request(1), timeout=120)
            assert next(first).staged
            wait_until(hang.stopped.is_set, "the write of step 1 to reach the stopped server")
            for call in (lambda: next(stub.StageSnapshot(request(2), timeout=60)),
                         lambda: stub.WriteSnapshot(request(2), timeout=60)):
                with pytest.raises(grpc.RpcError) as refused:
                    call()
                assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION, refused.value.details()
                assert re.search(
                    r"of step 2: shard 0 is still writing its files of snapshot step 1 \(\d+ s so far",
                    refused.value.details(),
                ), refused.value.details()
                assert (wire.WRITING_STEP_METADATA_KEY, "1") in refused.value.trailing_metadata()
            with pytest.raises(grpc.RpcError) as waited:
                list(stub.StageSnapshot(request(1), timeout=1.0))
            assert waited.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            hang.resume()
            assert json.loads(next(first).records_json)
            assert shards.servicers[0].snapshots.writing() is None
            replies = list(stub.StageSnapshot(request(2), timeout=60))
            assert replies[0].staged and json.loads(replies[1].records_json)
    finally:
        if hang is not None:
            hang.resume()
        server.kill()


@pytest.mark.parametrize("kind", ["full", "incremental"])
def test_a_round_whose_storage_hangs_before_the_copy_holds_no_push_or_lookup(
    tmp_path, start_shards, monkeypatch, kind
):
    """A round's storage calls before the tables are copied (the step's manifest looked for, an
    incremental's parent read) ran where pushes are serialised: with the S3 server stopped, every
    push and lookup of the shard waited for them (request_timeout x max_attempts, or for ever on a
    hard NFS mount). They run before that section now: the shard answers while the round waits."""
    from ps.job_config import Deadlines
    from ps.snapshot import storage as storage_module
    from ps.snapshot.manifest import ShardRecord

    server = S3Server.start(tmp_path / "s3")
    stopped = False
    try:
        job = _job_whose_snapshots_wait_for(server)
        storage = job.snapshot.storage
        shards = start_shards(job)
        client = PSClient.from_job(shards.job, deadlines=Deadlines(lookup=5.0, push=5.0))
        keys = np.arange(10, dtype=np.int64)
        client.push("t", keys, np.ones((10, 4), np.float32))

        def request(step: int, parent: int | None = None) -> snapshot_pb2.WriteSnapshotRequest:
            message = snapshot_pb2.WriteSnapshotRequest(uri="s3://snaps/job", job="job", step=step, kind="full")
            if parent is not None:
                message.kind, message.parent = "incremental", parent
            return message

        with grpc.insecure_channel(shards.job.shards[0].address) as channel:
            stub = snapshot_pb2_grpc.SnapshotControlStub(channel)
            if kind == "incremental":  # a committed parent, step 1
                records = json.loads(list(stub.StageSnapshot(request(1), timeout=60))[1].records_json)
                writer = SnapshotWriter("s3://snaps/job", "job", 1, num_shards=1, storage_config=storage)
                for record in records:
                    writer.add_shard_record(ShardRecord.from_dict(record))
                writer.commit()
            asked = threading.Event()
            exists = storage_module.exists

            def stop_then_exists(fs, path):
                if "/2/" in path and not asked.is_set():
                    os.kill(server.proc.pid, signal.SIGSTOP)
                    asked.set()
                return exists(fs, path)

            monkeypatch.setattr(storage_module, "exists", stop_then_exists)
            replies: list = []
            staging = threading.Thread(
                target=lambda: replies.extend(stub.StageSnapshot(request(2, 1 if kind == "incremental" else None),
                                                                 timeout=120)),
                daemon=True,
            )
            staging.start()
            wait_until(asked.is_set, "the round's first storage call")
            stopped = True
            started = time.monotonic()
            assert client.lookup("t", keys).shape == (10, 4)
            client.push("t", keys, np.ones((10, 4), np.float32))
            assert time.monotonic() - started < 5.0
            # ... and a round of another step is refused at once, as while files are written
            with pytest.raises(grpc.RpcError) as refused:
                next(stub.StageSnapshot(request(3), timeout=60))
            assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION, refused.value.details()
            assert "is still opening snapshot step 2" in refused.value.details(), refused.value.details()
            os.kill(server.proc.pid, signal.SIGCONT)
            stopped = False
            staging.join(120)
            assert replies and replies[0].staged and json.loads(replies[1].records_json), replies
        client.close()
    finally:
        if stopped:
            os.kill(server.proc.pid, signal.SIGCONT)
        server.kill()
