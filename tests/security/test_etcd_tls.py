"""The arbiter over TLS: an etcd that requires client certificates (`--client-cert-auth`), as a
shared etcd must be, since whoever writes the membership records chooses each shard's primary.
Before, the arbiter's client trusted only the system's CAs and had no client certificate, so the
shards of a pair could only use an etcd anyone could write to."""

from __future__ import annotations

import dataclasses

import pytest

from bench.etcd_server import EtcdServer, EtcdTls, etcd_missing
from bench.ports import free_ports
from ps.etcd import EtcdClient, EtcdUnavailableError
from ps.job_config import ArbiterConfig, Deadlines, JobConfig, ShardConfig, load_job_config, parse_job_config
from ps.table.config import TableConfig
from tests.helpers.processes import ShardPair
from tests.security.certs import EtcdPki


@pytest.fixture(scope="module")
def etcd_pki(tmp_path_factory) -> EtcdPki:
    return EtcdPki.create(tmp_path_factory.mktemp("etcd-pki"))


def _arbiter(endpoint: str, pki: EtcdPki, cert: bool = True) -> ArbiterConfig:
    files = {"client_cert": str(pki.client_cert), "client_key": str(pki.client_key)} if cert else {}
    return ArbiterConfig(endpoints=endpoint, lease_seconds=2, tls_ca=str(pki.ca), **files)


@pytest.fixture(scope="module")
def tls_etcd(etcd_pki, tmp_path_factory):
    if (missing := etcd_missing()) is not None:
        pytest.skip(missing)
    context = _arbiter("https://127.0.0.1:1", etcd_pki).tls_context()
    tls = EtcdTls(etcd_pki.server_cert, etcd_pki.server_key, etcd_pki.ca, context)
    with EtcdServer.start(tmp_path_factory.mktemp("tls-etcd"), tls=tls) as server:
        yield server


def test_only_a_client_with_a_certificate_of_etcd_s_ca_reads_or_writes(tls_etcd, etcd_pki):
    client = EtcdClient(tls_etcd.endpoint, tls=_arbiter(tls_etcd.endpoint, etcd_pki).tls_context())
    client.put("/embps/tls-probe", "yes")
    assert client.get("/embps/tls-probe").value == "yes"
    rogue = dataclasses.replace(
        _arbiter(tls_etcd.endpoint, etcd_pki), client_cert=str(etcd_pki.rogue_cert), client_key=str(etcd_pki.rogue_key)
    )
    refused = [
        EtcdClient(tls_etcd.endpoint, tls=_arbiter(tls_etcd.endpoint, etcd_pki, cert=False).tls_context()),
        EtcdClient(tls_etcd.endpoint, tls=rogue.tls_context()),
        EtcdClient(tls_etcd.endpoint.replace("https://", "http://")),
        EtcdClient(tls_etcd.endpoint),  # the system's CAs: etcd's certificate is not theirs
    ]
    for other in refused:
        with pytest.raises(EtcdUnavailableError):
            other.put("/embps/tls-probe", "no")
    assert client.get("/embps/tls-probe").value == "yes"


def test_a_pair_whose_arbiter_requires_client_certificates_fails_over(tls_etcd, etcd_pki, tmp_path):
    ports = free_ports(4)
    job = JobConfig(
        job="tls-arbiter",
        shards=(ShardConfig(f"127.0.0.1:{ports[0]}", metrics_port=ports[1], standby=f"127.0.0.1:{ports[2]}",
                            standby_metrics_port=ports[3]),),
        tables=(TableConfig("user", dim=4),),
        deadlines=Deadlines(lookup=20.0, push=20.0, stats=5.0),
        arbiter=_arbiter(tls_etcd.endpoint, etcd_pki),
    )
    pair = ShardPair.start(job, tmp_path)
    try:
        assert load_job_config(pair.config).arbiter == job.arbiter  # the files travel in the TOML
        pair.fail_over()  # etcd, over mutual TLS, records the standby as primary an epoch later
    finally:
        pair.stop()


def test_arbiter_tls_fields_are_checked_by_name(etcd_pki, tmp_path):
    def parse(arbiter: dict) -> JobConfig:
        shard = {"address": "127.0.0.1:1", "metrics_port": 2, "standby": "127.0.0.1:3", "standby_metrics_port": 4}
        data = {"job": "j", "shards": [shard], "tables": {"t": {"dim": 4}}, "arbiter": arbiter}
        return parse_job_config(data, tmp_path)

    https = "https://127.0.0.1:2379"
    with pytest.raises(ValueError, match=r"arbiter\.client_key: required with arbiter\.client_cert"):
        parse({"endpoints": https, "client_cert": str(etcd_pki.client_cert)})
    with pytest.raises(ValueError, match=r"arbiter\.tls_ca: TLS files need every endpoint https://"):
        parse({"endpoints": "http://127.0.0.1:2379", "tls_ca": str(etcd_pki.ca)})
    with pytest.raises(ValueError, match=r"arbiter\.endpoints: all http:// or all https://"):
        parse({"endpoints": f"{https},http://127.0.0.1:2380"})
    # A scheme in capitals is https too: its files were ignored, and the shard dialled etcd without them.
    capitals = parse({"endpoints": https.replace("https", "HTTPS"), "tls_ca": "certs/ca.pem"}).arbiter
    with pytest.raises(ValueError, match=r"arbiter\.tls_ca: cannot load"):
        capitals.tls_context()
    relative = parse({"endpoints": https, "tls_ca": "certs/ca.pem"}).arbiter
    assert relative.tls_ca == str(tmp_path / "certs" / "ca.pem")  # relative to the TOML's folder
    with pytest.raises(ValueError, match=r"arbiter\.tls_ca: cannot load"):
        relative.tls_context()
    swapped = parse({"endpoints": https, "client_cert": str(etcd_pki.client_key), "client_key": str(etcd_pki.ca)})
    with pytest.raises(ValueError, match=r"arbiter\.client_cert: cannot load"):
        swapped.arbiter.tls_context()
