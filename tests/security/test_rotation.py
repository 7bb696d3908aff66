"""Rotating a running shard's certificate and tokens, and running clients' certificates, by
rewriting their files, as cert-manager or a Kubernetes Secret update does: no restart,
connections already open keep working, new ones get the new certificate, the old token stops
working within about a second, clients (blocking and grpc.aio) dial with their new certificate,
and a rotation that does not load is logged (never its content) while the current certificate or
token stays in use."""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import shutil
import socket
import ssl
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ps.rpc import ps_pb2, ps_pb2_grpc
from ps.security import RELOAD_CHECK_S, Role, SecurityConfig, Tokens, TokenSource, open_channel
from ps.table.config import TableConfig
from serving.server import SERVICE_NAME as SERVING_SERVICE
from tests.helpers.processes import ShardCluster, make_job, stop_pid
from tests.helpers.waiting import eventually
from tests.security.certs import Pki
from tests.serving.replicas import ServingReplica


def replace_file(path: Path, data: bytes) -> None:
    """Atomically, as an update of a mounted Secret is: readers see the old file or the new one."""
    staged = path.with_name(f".{path.name}.new")
    staged.write_bytes(data)
    os.replace(staged, path)


def served_certificate(address: str, ca: Path) -> bytes:
    """The DER certificate a new TLS connection to `address` is given."""
    host, port = address.rsplit(":", 1)
    context = ssl.create_default_context(cafile=str(ca))
    context.set_alpn_protocols(["h2"])
    with socket.create_connection((host, int(port)), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            return tls.getpeercert(binary_form=True)


def der(pem_path: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(pem_path.read_text())


def stats_code(address: str, security: SecurityConfig, token: str) -> grpc.StatusCode:
    """Stats over a fresh TLS channel carrying `token` as it is, not read from any file."""
    with grpc.secure_channel(address, security.channel_credentials()) as channel:
        try:
            ps_pb2_grpc.ParameterServerStub(channel).Stats(
                ps_pb2.StatsRequest(), metadata=[("authorization", f"Bearer {token}")], timeout=5
            )
        except grpc.RpcError as err:
            return err.code()
    return grpc.StatusCode.OK


@pytest.fixture
def rotating(pki: Pki, tmp_path: Path):
    """A shard whose certificate, key and trainer token are files in tmp_path/secret."""
    secret = tmp_path / "secret"
    secret.mkdir()
    shutil.copy(pki.server_cert, secret / "tls.crt")
    shutil.copy(pki.server_key, secret / "tls.key")
    first_token = secrets.token_urlsafe(32)
    (secret / "trainer.token").write_text(first_token + "\n")
    for role in ("replica", "reader"):  # for a serving replica of the shard
        (secret / f"{role}.token").write_text(secrets.token_urlsafe(32) + "\n")
    security = SecurityConfig(
        tls_cert=str(secret / "tls.crt"),
        tls_key=str(secret / "tls.key"),
        tls_ca=str(pki.ca),
        tokens=Tokens(
            trainer=TokenSource(file=str(secret / "trainer.token")),
            replica=TokenSource(file=str(secret / "replica.token")),
            reader=TokenSource(file=str(secret / "reader.token")),
        ),
    )
    job = dataclasses.replace(make_job([TableConfig("user", dim=4)]), security=security)
    with ShardCluster.start(job, tmp_path / "cluster") as cluster:
        yield cluster, secret, first_token


def test_a_new_certificate_is_served_to_new_connections_without_a_restart(rotating, pki):
    cluster, secret, _ = rotating
    address, security = cluster.job.shards[0].address, cluster.job.security
    assert served_certificate(address, pki.ca) == der(pki.server_cert)
    with open_channel(address, security, Role.TRAINER) as channel:
        stub = ps_pb2_grpc.ParameterServerStub(channel)
        stub.Stats(ps_pb2.StatsRequest(), timeout=5)  # a connection opened before the rotation

        replace_file(secret / "tls.key", pki.next_server_key.read_bytes())  # a moment with a mismatched pair
        replace_file(secret / "tls.crt", pki.next_server_cert.read_bytes())
        assert eventually(lambda: served_certificate(address, pki.ca) == der(pki.next_server_cert))
        stub.Stats(ps_pb2.StatsRequest(), timeout=5)  # the open connection still works

        replace_file(secret / "tls.crt", b"not a certificate\n")  # a broken rotation
        # Each check is a new connection: the server looks at its files before each handshake.
        assert eventually(
            lambda: served_certificate(address, pki.ca) == der(pki.next_server_cert) and "do not load" in cluster.log(0)
        )
        with open_channel(address, security, Role.TRAINER) as fresh:
            ps_pb2_grpc.ParameterServerStub(fresh).Stats(ps_pb2.StatsRequest(), timeout=5)
    assert cluster.procs[0].poll() is None  # never restarted
    for line in pki.private_key_bodies():
        assert line not in cluster.log(0)


def test_a_new_token_replaces_the_old_one_within_a_second_on_both_sides(rotating, caplog):
    cluster, secret, first_token = rotating
    caplog.set_level(logging.INFO, logger="embps.security")
    address, security = cluster.job.shards[0].address, cluster.job.security
    with open_channel(address, security, Role.TRAINER) as channel:  # reads the same token file as the shard
        stub = ps_pb2_grpc.ParameterServerStub(channel)
        stub.Stats(ps_pb2.StatsRequest(), timeout=5)
        assert stats_code(address, security, first_token) == grpc.StatusCode.OK

        second_token = secrets.token_urlsafe(32)
        replace_file(secret / "trainer.token", (second_token + "\n").encode())
        rotated = time.monotonic()
        assert eventually(lambda: stats_code(address, security, first_token) == grpc.StatusCode.UNAUTHENTICATED)
        assert time.monotonic() - rotated < 3 * RELOAD_CHECK_S + 2
        assert stats_code(address, security, second_token) == grpc.StatusCode.OK
        assert eventually(lambda: stats_ok(stub), timeout=3 * RELOAD_CHECK_S + 2)  # the client sends the new token too
        assert "using the new token" in caplog.text

        replace_file(secret / "trainer.token", b"short\n")  # not a valid token: both sides keep the second

        def client_keeps_its_token() -> bool:
            stub.Stats(ps_pb2.StatsRequest(), timeout=5)  # raises unless the client still sends the second
            return "keeping the current token" in caplog.text

        assert eventually(client_keeps_its_token, timeout=3 * RELOAD_CHECK_S + 2)
        assert eventually(lambda: "keeping the current token" in cluster.log(0), timeout=3 * RELOAD_CHECK_S + 2)
        assert stats_code(address, security, second_token) == grpc.StatusCode.OK
    assert "keeping the current token" in cluster.log(0)
    assert first_token not in cluster.log(0) and second_token not in cluster.log(0)


@pytest.fixture
def mutual(pki: Pki, tmp_path: Path):
    """A mutual-TLS shard whose client CA, and the clients' certificate and key, are files in
    tmp_path/secret (one Secret for the shard and its clients)."""
    secret = tmp_path / "secret"
    secret.mkdir()
    shutil.copy(pki.client_ca, secret / "client-ca.crt")
    shutil.copy(pki.client_cert, secret / "client.crt")
    shutil.copy(pki.client_key, secret / "client.key")
    security = SecurityConfig(
        tls_cert=str(pki.server_cert),
        tls_key=str(pki.server_key),
        tls_ca=str(pki.ca),
        client_ca=str(secret / "client-ca.crt"),
        client_cert=str(secret / "client.crt"),
        client_key=str(secret / "client.key"),
    )
    job = dataclasses.replace(make_job([TableConfig("user", dim=4)]), security=security)
    with ShardCluster.start(job, tmp_path / "cluster") as cluster:
        yield cluster, secret


def stats_ok(stub: ps_pb2_grpc.ParameterServerStub) -> bool:
    try:
        stub.Stats(ps_pb2.StatsRequest(), timeout=5)
        return True
    except grpc.RpcError:
        return False


def test_running_clients_dial_with_their_new_certificate(mutual, pki, tmp_path, caplog):
    """The client CA and the clients' certificate move to another CA, then the shard restarts, so
    every client must handshake again: a client still holding the old certificate is refused; a
    blocking client and a replica's grpc.aio followers, both opened before, get back in."""
    cluster, secret = mutual
    address, security = cluster.job.shards[0].address, cluster.job.security
    before = security.channel_credentials()  # what a client that never re-reads its files keeps
    caplog.set_level(logging.INFO, logger="embps.security")
    with (
        ServingReplica.start(cluster, tmp_path / "replica") as replica,
        open_channel(address, security, role=None) as channel,
    ):
        stub = ps_pb2_grpc.ParameterServerStub(channel)
        assert stats_ok(stub)
        assert eventually(lambda: replica.status().shards[0].connected), replica.log()[-3000:]
        (shard,) = replica.status().shards

        replace_file(secret / "client.key", pki.rogue_key.read_bytes())  # a moment with a mismatched pair

        def client_keeps_its_channel() -> bool:
            assert stats_ok(stub)  # the current channel stays
            return "do not load" in caplog.text

        assert eventually(client_keeps_its_channel, timeout=3 * RELOAD_CHECK_S + 2)
        replace_file(secret / "client.crt", pki.rogue_cert.read_bytes())
        replace_file(secret / "client-ca.crt", pki.rogue_ca.read_bytes())
        stop_pid(cluster.procs[0])
        cluster.restart(0)  # every connection is new now

        with grpc.secure_channel(address, before) as stale:
            assert not stats_ok(ps_pb2_grpc.ParameterServerStub(stale))  # the shard trusts the new CA only
        assert eventually(lambda: stats_ok(stub), timeout=3 * RELOAD_CHECK_S + 5)
        assert "TLS client certificate and CA reloaded" in caplog.text

        def replica_follows_the_restarted_shard() -> bool:
            try:
                shards = replica.status().shards
            except grpc.RpcError:
                # This client takes the rotated files at its next call; the replica's port up to
                # two seconds after they changed (serving/gate.py checks them, then the gate loads
                # the checked copy). A handshake between the two moments is refused.
                return False
            return any(s.connected and s.incarnation != shard.incarnation for s in shards)

        assert eventually(replica_follows_the_restarted_shard, timeout=30), replica.log()[-3000:]
        replica.wait_health(f"{SERVING_SERVICE}/shard-0", health_pb2.HealthCheckResponse.SERVING, timeout=10)
        assert "reloaded" in replica.log()
    for line in pki.private_key_bodies():
        assert line not in caplog.text and line not in cluster.log(0)


def test_the_serving_ports_certificate_rotates_without_a_restart(rotating, pki, tmp_path):
    """A replica's public port (the serving gate's, serving/gate.py, where it runs) reads the same
    files: new connections get the new certificate, the open one keeps working, and a file that
    does not load is logged and leaves the current certificate in use."""
    cluster, secret, _ = rotating
    serving = health_pb2.HealthCheckResponse.SERVING
    with ServingReplica.start(cluster, tmp_path / "replica") as replica:
        address = replica.config.listen
        assert served_certificate(address, pki.ca) == der(pki.server_cert)
        assert replica.health(SERVING_SERVICE) == serving  # replica.channel: opened before the rotation

        replace_file(secret / "tls.key", pki.next_server_key.read_bytes())  # a moment with a mismatched pair
        replace_file(secret / "tls.crt", pki.next_server_cert.read_bytes())
        assert eventually(lambda: served_certificate(address, pki.ca) == der(pki.next_server_cert))
        assert replica.health(SERVING_SERVICE) == serving

        replace_file(secret / "tls.crt", b"not a certificate\n")  # a broken rotation
        # The gate reads the files on its own; without it (not built, EMBPS_SERVING_GATE=0) gRPC's
        # core reads them when a connection arrives, so each try connects.
        assert eventually(
            lambda: served_certificate(address, pki.ca) == der(pki.next_server_cert) and "do not load" in replica.log()
        )
        time.sleep(2)  # two more of the gate's reads of its copies
        assert served_certificate(address, pki.ca) == der(pki.next_server_cert)
        with open_channel(address, cluster.job.security, role=None) as fresh:
            assert health_pb2_grpc.HealthStub(fresh).Check(health_pb2.HealthCheckRequest(), timeout=5).status == serving
        assert replica.proc.poll() is None  # never restarted
        log = replica.log()
    for line in pki.private_key_bodies():
        assert line not in log
