"""A shard writes snapshots only under its job's [snapshot] uri, whatever folder a request names.

It wrote under the request's uri: any client that may call SnapshotControl (the trainer role with
tokens, anyone who reaches the port without) could have the shard write parquet files into any
folder or bucket its credentials reach: another job's snapshots, /tmp, its own config folder."""

from __future__ import annotations

import dataclasses
import json

import grpc
import pytest

from ps.job_config import SnapshotConfig
from ps.rpc import snapshot_pb2, snapshot_pb2_grpc
from ps.table.config import TableConfig
from tests.helpers.processes import ShardCluster, make_job

USER = TableConfig("user", dim=4)


def write_request(uri: str, step: int, num_shards: int = 1) -> snapshot_pb2.WriteSnapshotRequest:
    return snapshot_pb2.WriteSnapshotRequest(uri=uri, job="placed", step=step, kind="full", num_shards=num_shards)


def test_a_snapshot_outside_the_jobs_uri_is_refused_and_writes_nothing(tmp_path):
    snaps, elsewhere = tmp_path / "snaps", tmp_path / "elsewhere"
    job = dataclasses.replace(make_job([USER], job="placed"), snapshot=SnapshotConfig(snaps.as_uri()))
    with ShardCluster.start(job, tmp_path / "run") as cluster, grpc.insecure_channel(job.shards[0].address) as channel:
        stub = snapshot_pb2_grpc.SnapshotControlStub(channel)
        for uri in (str(elsewhere), elsewhere.as_uri(), str(cluster.config_path.parent), f"{snaps}/../elsewhere"):
            with pytest.raises(grpc.RpcError) as info:
                stub.WriteSnapshot(write_request(uri, 1), timeout=30)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
            assert info.value.details().startswith("uri: ") and snaps.as_uri() in info.value.details()
            with pytest.raises(grpc.RpcError) as info:
                list(stub.StageSnapshot(write_request(uri, 2), timeout=30))
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
        with pytest.raises(grpc.RpcError) as info:
            stub.WriteSnapshot(write_request(snaps.as_uri(), 3, num_shards=2), timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details().startswith("num_shards: the job has 1 shards")
        assert not elsewhere.exists(), sorted(elsewhere.rglob("*"))
        assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["placed-shard-0.log", "placed.toml"]
        assert not snaps.exists(), "a refused request writes nothing in the job's folder either"
        # The job's folder, as a file:// uri or a plain path (the spelling is the caller's).
        reply = stub.WriteSnapshot(write_request(str(snaps), 4), timeout=30)
        assert [r["table"] for r in json.loads(reply.records_json)] == ["user"]
        replies = list(stub.StageSnapshot(write_request(snaps.as_uri() + "/", 5), timeout=30))
        assert [r.staged for r in replies] == [True, False]
    assert sorted(p.name for p in (snaps / "placed").iterdir()) == ["4", "5"]
