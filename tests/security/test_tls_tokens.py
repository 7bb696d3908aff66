"""A real shard and a real serving replica with TLS and a token per role, on loopback: who gets in,
who gets which status, and that no secret reaches a log or a /metrics page."""

from __future__ import annotations

import dataclasses
import secrets
import urllib.request

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from prometheus_client.parser import text_string_to_metric_families

from ps import wire
from ps.client import PSClient, RPCError
from ps.job_config import SnapshotConfig
from ps.rpc import ps_pb2, ps_pb2_grpc, serving_pb2, serving_pb2_grpc, snapshot_pb2, snapshot_pb2_grpc
from ps.security import Role, open_channel
from ps.shard.server import SERVICE_NAME
from ps.table.config import OptimizerConfig, OptimizerKind, TableConfig
from serving.client import ServingClient
from tests.helpers.processes import ShardCluster, make_job
from tests.security.certs import secured
from tests.serving.replicas import ServingReplica

USER = TableConfig("user", dim=4, init_scale=0.1, seed=3, optimizer=OptimizerConfig(kind=OptimizerKind.SGD, lr=1.0))
CODE = grpc.StatusCode
KEYS = np.arange(10, 20, dtype=np.int64)


@pytest.fixture(scope="module")
def cluster(pki, token_files, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("secured")
    snapshots = SnapshotConfig((workdir / "snaps").as_uri())
    job = dataclasses.replace(make_job([USER]), security=secured(pki, token_files), snapshot=snapshots)
    with ShardCluster.start(job, workdir) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def replica(cluster, tmp_path_factory):
    with ServingReplica.start(cluster, tmp_path_factory.mktemp("secured-serve")) as replica:
        yield replica


def ps_address(cluster: ShardCluster) -> str:
    return cluster.job.shards[0].address


def tls_channel(cluster: ShardCluster, address: str) -> grpc.Channel:
    """TLS (trusting the test CA), no token."""
    return open_channel(address, cluster.job.security, role=None)


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def lookup_request() -> ps_pb2.LookupRequest:
    return ps_pb2.LookupRequest(table="user", keys=wire.encode_keys(KEYS), dim=4)


def push_request() -> ps_pb2.PushRequest:
    grads = np.ones((KEYS.shape[0], 4), np.float32)
    return ps_pb2.PushRequest(
        table="user", keys=wire.encode_keys(KEYS), grads=grads.tobytes(), dim=4, dtype=ps_pb2.FLOAT32
    )


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()


def test_plaintext_clients_cannot_talk_to_tls_ports(cluster, replica, tokens):
    with grpc.insecure_channel(ps_address(cluster)) as channel:
        stub = ps_pb2_grpc.ParameterServerStub(channel)
        call = lambda: stub.Stats(ps_pb2.StatsRequest(), timeout=3, metadata=bearer(tokens[Role.TRAINER]))  # noqa: E731
        assert code_of(call) == CODE.UNAVAILABLE
        health = health_pb2_grpc.HealthStub(channel)
        assert code_of(lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=3)) == CODE.UNAVAILABLE
    with grpc.insecure_channel(replica.config.listen) as channel:
        stub = serving_pb2_grpc.ServingStub(channel)
        call = lambda: stub.Status(serving_pb2.ServingStatusRequest(), timeout=3, metadata=bearer(tokens[Role.READER]))  # noqa: E731
        assert code_of(call) == CODE.UNAVAILABLE


def test_trainer_client_pushes_and_looks_up_over_tls(cluster):
    with PSClient.from_job(cluster.job) as client:  # TLS + the trainer's token, from the job's [security]
        before = client.lookup("user", KEYS)
        grads = np.random.default_rng(0).normal(size=(KEYS.shape[0], 4)).astype(np.float32)
        client.push("user", KEYS, grads)
        client.push("user", KEYS, grads)
        np.testing.assert_allclose(client.lookup("user", KEYS), before - 2 * grads, rtol=1e-6, atol=1e-6)


def test_missing_malformed_and_wrong_tokens_are_unauthenticated(cluster, tokens):
    with tls_channel(cluster, ps_address(cluster)) as channel:
        stub = ps_pb2_grpc.ParameterServerStub(channel)
        trainer = tokens[Role.TRAINER]
        for metadata in [
            (),
            bearer(secrets.token_urlsafe(32)),
            bearer(trainer[:-1]),
            (("authorization", f"Basic {trainer}"),),
            (("authorization", trainer),),
        ]:
            assert code_of(lambda m=metadata: stub.Lookup(lookup_request(), timeout=5, metadata=m)) == (
                CODE.UNAUTHENTICATED
            )
            assert code_of(lambda m=metadata: stub.Push(push_request(), timeout=5, metadata=m)) == CODE.UNAUTHENTICATED
        stream = stub.Subscribe(ps_pb2.SubscribeRequest(table="user", full_sync=True), timeout=5)
        assert code_of(lambda: next(iter(stream))) == CODE.UNAUTHENTICATED
        # The scheme is case-insensitive (RFC 6750); the token is not.
        stub.Stats(ps_pb2.StatsRequest(), timeout=5, metadata=(("authorization", f"bearer {trainer}"),))


def test_replica_token_reads_but_may_not_write(cluster, tokens):
    replica_token = bearer(tokens[Role.REPLICA])
    with tls_channel(cluster, ps_address(cluster)) as channel:
        stub = ps_pb2_grpc.ParameterServerStub(channel)
        assert stub.Lookup(lookup_request(), timeout=5, metadata=replica_token).dim == 4
        assert stub.Stats(ps_pb2.StatsRequest(), timeout=5, metadata=replica_token).tables
        subscribe = ps_pb2.SubscribeRequest(table="user", full_sync=True)
        stream = stub.Subscribe(subscribe, timeout=5, metadata=replica_token)
        assert next(iter(stream)).table == "user"
        stream.cancel()
        assert code_of(lambda: stub.Push(push_request(), timeout=5, metadata=replica_token)) == CODE.PERMISSION_DENIED
        batch = ps_pb2.PushBatchRequest(requests=[push_request()])
        call = lambda: stub.PushBatch(batch, timeout=5, metadata=replica_token)  # noqa: E731
        assert code_of(call) == CODE.PERMISSION_DENIED
        snapshots = snapshot_pb2_grpc.SnapshotControlStub(channel)
        write = snapshot_pb2.WriteSnapshotRequest(uri=cluster.job.snapshot.uri, job="test", step=1, kind="full")
        call = lambda: snapshots.WriteSnapshot(write, timeout=5, metadata=replica_token)  # noqa: E731
        assert code_of(call) == CODE.PERMISSION_DENIED
    # The same through PSClient with role=replica: reads work, a push is refused and not retried.
    with PSClient.from_job(cluster.job, role=Role.REPLICA) as client:
        assert client.lookup("user", KEYS).shape == (KEYS.shape[0], 4)
        with pytest.raises(RPCError) as info:
            client.push("user", KEYS, np.ones((KEYS.shape[0], 4), np.float32))
        assert info.value.code == CODE.PERMISSION_DENIED


def test_trainer_token_writes_snapshots_only_under_the_jobs_uri(cluster, tokens, tmp_path):
    """The trainer role may call SnapshotControl, not have the shard write wherever it names."""
    trainer_token = bearer(tokens[Role.TRAINER])
    with tls_channel(cluster, ps_address(cluster)) as channel:
        snapshots = snapshot_pb2_grpc.SnapshotControlStub(channel)
        elsewhere = snapshot_pb2.WriteSnapshotRequest(uri=tmp_path.as_uri(), job="test", step=1, kind="full")
        call = lambda: snapshots.WriteSnapshot(elsewhere, timeout=5, metadata=trainer_token)  # noqa: E731
        assert code_of(call) == CODE.INVALID_ARGUMENT
        assert not list(tmp_path.iterdir())
        placed = snapshot_pb2.WriteSnapshotRequest(uri=cluster.job.snapshot.uri, job="test", step=1, kind="full")
        assert snapshots.WriteSnapshot(placed, timeout=5, metadata=trainer_token).records_json


def test_reader_token_is_refused_on_the_ps_port(cluster, tokens):
    # The shard holds only the tokens of the roles its port accepts: the reader's is unknown there.
    with tls_channel(cluster, ps_address(cluster)) as channel:
        stub = ps_pb2_grpc.ParameterServerStub(channel)
        call = lambda: stub.Lookup(lookup_request(), timeout=5, metadata=bearer(tokens[Role.READER]))  # noqa: E731
        assert code_of(call) == CODE.UNAUTHENTICATED


def test_health_is_open_and_reflection_needs_a_token(cluster, tokens):
    with tls_channel(cluster, ps_address(cluster)) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as info:
            ProtoReflectionDescriptorDatabase(channel).get_services()
        assert info.value.code() == CODE.UNAUTHENTICATED
    with open_channel(ps_address(cluster), cluster.job.security, Role.REPLICA) as channel:
        assert SERVICE_NAME in ProtoReflectionDescriptorDatabase(channel).get_services()


def test_serving_port_takes_the_reader_token_only(cluster, replica, tokens):
    with PSClient.from_job(cluster.job) as client:
        client.push("user", KEYS, np.full((KEYS.shape[0], 4), 0.5, np.float32))
        expected = client.lookup("user", KEYS)
        version = client.stats()[0].tables[0].version
    # The replica follows the shard through TLS with the replica's token ...
    replica.wait_version("user", 0, version)
    # ... and answers the reader (the helper's channel carries the reader token).
    values, found, _ = replica.lookup("user", KEYS)
    assert found.all()
    np.testing.assert_array_equal(values, expected)
    assert replica.status().shards[0].version >= version
    request = serving_pb2.ServingLookupRequest(table="user", keys=wire.encode_keys(KEYS))
    with tls_channel(cluster, replica.config.listen) as channel:
        stub = serving_pb2_grpc.ServingStub(channel)
        # Neither the trainer's nor the replica's token opens the serving port: it holds only the reader's.
        wrong = [bearer(secrets.token_urlsafe(32)), bearer(tokens[Role.TRAINER]), bearer(tokens[Role.REPLICA])]
        for metadata in [(), *wrong]:
            assert code_of(lambda m=metadata: stub.Lookup(request, timeout=5, metadata=m)) == CODE.UNAUTHENTICATED
        assert stub.Lookup(request, timeout=5, metadata=bearer(tokens[Role.READER])).dim == 4
        many = serving_pb2.ServingLookupManyRequest(lookups=[request])
        assert code_of(lambda: stub.LookupMany(many, timeout=5)) == CODE.UNAUTHENTICATED
        wrong = bearer(tokens[Role.TRAINER])
        assert code_of(lambda: stub.LookupMany(many, timeout=5, metadata=wrong)) == CODE.UNAUTHENTICATED
    # The client library takes TLS and the reader's token from the job's [security].
    with ServingClient.from_job(cluster.job, [replica.config.listen], timeout_s=10) as reader:
        np.testing.assert_array_equal(reader.lookup("user", KEYS)[0], expected)
        np.testing.assert_array_equal(reader.lookup_many({"user": KEYS})["user"][0], expected)
    with tls_channel(cluster, replica.config.listen) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING


def metrics_text(host: str, port: int) -> str:
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as reply:
        return reply.read().decode()


def refusals(text: str, family: str, method: str, code: str) -> float:
    """The count of `family` for calls refused before reaching a table (label table="")."""
    for metric in text_string_to_metric_families(text):
        if metric.name == family:
            return sum(
                s.value
                for s in metric.samples
                if s.name.endswith("_total") and s.labels == {"table": "", "method": method, "code": code}
            )
    return 0.0


def test_no_secret_in_logs_or_metrics(cluster, replica, tokens, pki):
    # Refused calls of every kind first, with every token on the wrong port, so that a leak would show.
    with tls_channel(cluster, ps_address(cluster)) as channel:
        stub = ps_pb2_grpc.ParameterServerStub(channel)
        for token in tokens.values():
            for call in (stub.Push, stub.Lookup):
                request = push_request() if call is stub.Push else lookup_request()
                try:
                    call(request, timeout=5, metadata=bearer(token))
                except grpc.RpcError:
                    pass
    shard = cluster.job.shards[0]
    texts = {
        "shard log": cluster.log(0),
        "serving log": replica.log(),
        "shard /metrics": metrics_text(shard.host, shard.metrics_port),
        "serving /metrics": metrics_text(replica.config.host, replica.config.metrics_port),
    }
    # What was checked is the real thing: the logs describe the security, the metrics count refusals.
    assert "TLS, tokens for trainer, replica, reader" in texts["shard log"]
    assert "TLS, tokens for trainer, replica, reader" in texts["serving log"]
    assert refusals(texts["shard /metrics"], "embps_requests", "Push", "PERMISSION_DENIED") >= 1
    assert refusals(texts["serving /metrics"], "embps_serving_requests", "Lookup", "UNAUTHENTICATED") >= 1
    for where, text in texts.items():
        for role, token in tokens.items():
            assert token not in text, f"the {role} token is in the {where}"
        for line in pki.private_key_bodies():
            assert line not in text, f"a private key line is in the {where}"

