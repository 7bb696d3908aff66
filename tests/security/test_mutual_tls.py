"""A real shard with mutual TLS: a client must present a certificate signed by the client CA."""

from __future__ import annotations

import dataclasses

import grpc
import numpy as np
import pytest

from ps.client import PSClient
from ps.rpc import ps_pb2, ps_pb2_grpc
from ps.security import open_channel
from ps.table.config import TableConfig
from tests.helpers.processes import ShardCluster, make_job
from tests.security.certs import secured


@pytest.fixture(scope="module")
def cluster(pki, tmp_path_factory):
    job = dataclasses.replace(make_job([TableConfig("user", dim=4)]), security=secured(pki, mutual=True))
    with ShardCluster.start(job, tmp_path_factory.mktemp("mtls")) as cluster:  # health waits present the cert
        yield cluster


def stats_code(address: str, credentials: grpc.ChannelCredentials) -> grpc.StatusCode:
    with grpc.secure_channel(address, credentials) as channel:
        try:
            ps_pb2_grpc.ParameterServerStub(channel).Stats(ps_pb2.StatsRequest(), timeout=3)
        except grpc.RpcError as err:
            return err.code()
    return grpc.StatusCode.OK


def test_tls_client_without_a_trusted_client_certificate_is_refused(cluster, pki):
    address = cluster.job.shards[0].address
    ca = pki.ca.read_bytes()
    assert stats_code(address, grpc.ssl_channel_credentials(root_certificates=ca)) == grpc.StatusCode.UNAVAILABLE
    rogue = grpc.ssl_channel_credentials(ca, pki.rogue_key.read_bytes(), pki.rogue_cert.read_bytes())
    assert stats_code(address, rogue) == grpc.StatusCode.UNAVAILABLE
    trusted = grpc.ssl_channel_credentials(ca, pki.client_key.read_bytes(), pki.client_cert.read_bytes())
    assert stats_code(address, trusted) == grpc.StatusCode.OK


def test_job_clients_present_their_certificate(cluster):
    keys = np.arange(5, dtype=np.int64)
    with PSClient.from_job(cluster.job) as client:
        client.push("user", keys, np.ones((5, 4), np.float32))
        assert client.stats()[0].tables[0].version == 1
    with open_channel(cluster.job.shards[0].address, cluster.job.security, role=None) as channel:
        assert ps_pb2_grpc.ParameterServerStub(channel).Stats(ps_pb2.StatsRequest(), timeout=5).tables
