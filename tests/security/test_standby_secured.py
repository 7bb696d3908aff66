"""A shard pair under mutual TLS and tokens: the primary streams its pushes to its standby with the
job's client certificate and the shard role's token, the standby's port refuses a stream without
them (the trainer's token included), and after the primary is SIGKILLed the promoted standby
answers with every acknowledged push."""

from __future__ import annotations

import itertools

import grpc
import numpy as np
import pytest

from bench.ports import free_ports
from ps.client import PSClient
from ps.job_config import ArbiterConfig, Deadlines, JobConfig, ShardConfig
from ps.rpc import replication_pb2
from ps.security import Role, open_channel
from ps.table.config import OptimizerConfig, OptimizerKind, TableConfig
from tests.helpers.processes import ShardPair
from tests.security.certs import secured

TABLE = TableConfig("user", dim=4, optimizer=OptimizerConfig(kind=OptimizerKind.ADAGRAD, lr=0.1))
_JOBS = itertools.count()  # one arbiter record per test (etcd lives as long as the module)
REPLICATE = "/{}/Replicate".format(replication_pb2.DESCRIPTOR.services_by_name["Replication"].full_name)


@pytest.fixture
def pair(etcd, pki, token_files, tmp_path):
    """One shard's pair, joined over mutual TLS."""
    ports = free_ports(4)
    job = JobConfig(
        job=f"secured-pair-{next(_JOBS)}",
        shards=(ShardConfig(f"127.0.0.1:{ports[0]}", metrics_port=ports[1], standby=f"127.0.0.1:{ports[2]}",
                            standby_metrics_port=ports[3]),),
        tables=(TABLE,),
        deadlines=Deadlines(lookup=20.0, push=20.0, stats=5.0),
        arbiter=ArbiterConfig(endpoints=etcd.endpoint, lease_seconds=2),  # 1 s could lapse on a loaded machine
        security=secured(pki, token_files, mutual=True),
    )
    pair = ShardPair.start(job, tmp_path)
    try:
        yield pair
    finally:
        pair.stop()


def replicate_code(address: str, job: JobConfig, role: Role | None) -> grpc.StatusCode:
    """The status of a Replicate stream opened on `address` with the job's TLS and `role`'s token."""
    hello = replication_pb2.ReplicateRequest(epoch=1 << 40, shard=0).SerializeToString()
    with open_channel(address, job.security, role) as channel:
        stream = channel.stream_stream(REPLICATE, request_serializer=None, response_deserializer=None)
        try:
            for _ in stream(iter([hello]), timeout=5):
                pass
        except grpc.RpcError as err:
            return err.code()
    return grpc.StatusCode.OK


def test_the_standby_port_refuses_a_replication_stream_without_the_shard_token(pair):
    """A worker holds the trainer's token and may push, but may not replace the primary's stream
    to the standby (which would leave the pair without failover cover until the primary rejoins)."""
    job = pair.job
    standby = job.shards[0].standby
    assert replicate_code(standby, job, role=None) == grpc.StatusCode.UNAUTHENTICATED
    for role in (Role.TRAINER, Role.REPLICA):
        assert replicate_code(standby, job, role=role) == grpc.StatusCode.PERMISSION_DENIED, role


def test_pushes_acknowledged_over_tls_survive_a_sigkill_of_the_primary(pair):
    keys = np.arange(50, dtype=np.int64)
    grads = np.random.default_rng(7).standard_normal((5, keys.shape[0], TABLE.dim)).astype(np.float32)
    with PSClient.from_job(pair.job, max_attempts=200) as client:
        for step, step_grads in enumerate(grads, start=1):
            client.push(TABLE.name, keys, step_grads, step=step)
        before = client.lookup(TABLE.name, keys)
        pair.fail_over()  # etcd records the standby as primary, epoch 2
        after = client.lookup(TABLE.name, keys)  # fails over to the promoted standby, over TLS with a token
    np.testing.assert_array_equal(after, before)
