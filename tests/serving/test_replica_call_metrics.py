"""A real `embps serve` replica's calls through the one call wrapper (ps/process/calls.py): every
method is counted with its status code and timed in embps_serving_request_duration_seconds, the
Lookups the serving gate answers (through GateLookups) as well as those grpc.aio answers."""

from __future__ import annotations

import urllib.request

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ps.table.config import TableConfig
from serving.client import ServingClient
from serving.gate import DISABLE_VARIABLE, unavailable_reason
from tests.helpers.processes import make_job
from tests.serving.replicas import ServingReplica

USER = TableConfig("user", dim=4)
ITEM = TableConfig("item", dim=8)
DURATION = "embps_serving_request_duration_seconds"


def scrape(replica: ServingReplica) -> dict[tuple[str, frozenset], float]:
    url = f"http://127.0.0.1:{replica.config.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture(params=["gate", "grpc.aio"])
def front(request, monkeypatch: pytest.MonkeyPatch) -> str:
    """Who answers the replica's Lookups: the serving gate, or grpc.aio (EMBPS_SERVING_GATE=0)."""
    if request.param == "gate":
        if unavailable_reason() is not None:
            pytest.skip(f"no serving gate here: {unavailable_reason()}")
        monkeypatch.delenv(DISABLE_VARIABLE, raising=False)
    else:
        monkeypatch.setenv(DISABLE_VARIABLE, "0")
    return request.param


def test_every_method_is_counted_and_timed_with_its_code(start_cluster, tmp_path, front):
    cluster = start_cluster(make_job([USER, ITEM]))
    with ServingReplica.start(cluster, tmp_path) as replica:
        keys = np.arange(6, dtype=np.int64)
        _values, found, _reply = replica.lookup("user", keys)
        assert found.shape == (6,)
        with pytest.raises(grpc.RpcError) as unknown:
            replica.lookup("nope", keys)
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        raw = replica.channel.unary_unary("/embps.v1.Serving/Lookup")  # bytes in, bytes out
        with pytest.raises(grpc.RpcError) as garbage:
            raw(b"\xff\xff\xff", timeout=5)
        assert garbage.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not a valid message for /embps.v1.Serving/Lookup" in garbage.value.details()
        replica.status()
        # LookupMany through the same front: counted under its own method name.
        with ServingClient([replica.config.listen], timeout_s=10) as reader:
            many = reader.lookup_many({"user": keys, "item": keys[:2]})
        assert many["user"][0].shape == (6, 4) and many["item"][0].shape == (2, 8)
        samples = scrape(replica)

    for table, code in (("user", "OK"), ("unknown", "NOT_FOUND"), ("", "INVALID_ARGUMENT")):
        assert value(samples, "embps_serving_requests_total", table=table, method="Lookup", code=code) == 1, code
        assert value(samples, f"{DURATION}_count", table=table, method="Lookup", code=code) == 1, code
    assert value(samples, f"{DURATION}_sum", table="user", method="Lookup", code="OK") > 0
    assert value(samples, f"{DURATION}_count", table="", method="Status", code="OK") == 1
    admitted = value(samples, "embps_serving_admitted_lookups_total")
    assert value(samples, "embps_serving_requests_total", table="", method="LookupMany", code="OK") == 1
    assert value(samples, "embps_serving_lookup_keys_total", table="item") == 2
    assert admitted == (4 if front == "gate" else 0), "the Lookups took the path under test"


def test_a_reply_past_the_message_limit_is_refused_naming_the_fix(start_cluster, tmp_path, front):
    """RESOURCE_EXHAUSTED with "split the request", from the gate and from grpc.aio alike, before
    the reply is built (not gRPC's own "Sent message larger than max" after it was)."""
    cluster = start_cluster(make_job([ITEM], message_limit_bytes=64 << 10))
    with ServingReplica.start(cluster, tmp_path) as replica:
        _values, found, _reply = replica.lookup("item", np.arange(1000, dtype=np.int64))  # ~33 KB
        assert found.shape == (1000,)
        with pytest.raises(grpc.RpcError) as refused:
            replica.lookup("item", np.arange(10_000, dtype=np.int64))  # ~330 KB
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused.value.details()
        assert "over message_limit_bytes 65536; split the request" in refused.value.details()
