"""A real shard's /metrics: the names, labels and values after known traffic, linted by promtool."""

import subprocess
import urllib.request

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ps import wire
from ps.client import PSClient
from ps.rpc import ps_pb2, ps_pb2_grpc
from ps.table.config import AdmissionConfig, AdmissionKind, EvictionConfig, EvictionPolicy, TableConfig
from tests.helpers.processes import ShardCluster, make_job

USER = TableConfig("user", dim=4)
LRU = TableConfig("lru", dim=2, capacity=64, eviction=EvictionConfig(policy=EvictionPolicy.LRU))
ADMIT = TableConfig("admit", dim=2, admission=AdmissionConfig(AdmissionKind.COUNT, min_count=2, max_pending=16))
INT8 = TableConfig("int8", dim=64, storage="int8")


@pytest.fixture(scope="module")
def scrape(tmp_path_factory):
    with ShardCluster.start(make_job([USER, LRU, ADMIT, INT8]), tmp_path_factory.mktemp("metrics")) as cluster:
        with PSClient.from_job(cluster.job) as client:
            for _ in range(3):
                client.lookup("user", np.arange(10, dtype=np.int64))
            client.push("user", np.arange(7, dtype=np.int64), np.ones((7, 4), dtype=np.float32))
            for start in range(0, 400, 40):
                keys = np.arange(start, start + 40, dtype=np.int64)
                client.push("lru", keys, np.ones((40, 2), dtype=np.float32))
            client.push("admit", np.arange(40, dtype=np.int64), np.ones((40, 2), dtype=np.float32))
            grads = np.random.default_rng(0).normal(size=(50, 64)).astype(np.float32)
            before = client.lookup("int8", np.arange(50, dtype=np.int64))
            client.push("int8", np.arange(50, dtype=np.int64), grads)
            moved = before - client.lookup("int8", np.arange(50, dtype=np.int64))
            # One row-wise Adagrad step of lr 0.01 moves each value by about lr * g / rms(g).
            rms = np.sqrt((grads**2).mean(axis=1, keepdims=True))
            assert np.abs(moved - 0.01 * grads / rms).max() < 2e-3
            bad = ps_pb2.PushRequest(  # the client refuses it before sending: straight to the shard
                table="user",
                keys=wire.encode_keys(np.arange(2, dtype=np.int64)),
                grads=np.full((2, 4), np.nan, dtype=np.float32).tobytes(),
                dim=4,
            )
            with grpc.insecure_channel(cluster.job.shards[0].address) as channel:
                with pytest.raises(grpc.RpcError) as refused:
                    ps_pb2_grpc.ParameterServerStub(channel).Push(bad, timeout=10)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            client.stats()
            stats = {t.name: t for t in client.stats()[0].tables}
        url = f"http://127.0.0.1:{cluster.job.shards[0].metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=10).read().decode()
    return text, stats


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(text: str, name: str, **labels) -> float:
    return samples(text)[(name, frozenset(labels.items()))]


def test_promtool_accepts_the_exposition(scrape, promtool):
    text, _ = scrape
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr


def test_request_counters_and_histograms_count_the_traffic(scrape):
    text, _ = scrape
    assert value(text, "embps_requests_total", table="user", method="Lookup", code="OK") == 3
    assert value(text, "embps_request_keys_total", table="user", method="Lookup") == 30
    assert value(text, "embps_requests_total", table="user", method="Push", code="OK") == 1
    assert value(text, "embps_requests_total", table="user", method="Push", code="INVALID_ARGUMENT") == 1
    assert value(text, "embps_request_keys_total", table="user", method="Push") == 7 + 2
    assert value(text, "embps_request_duration_seconds_count", table="user", method="Lookup") == 3
    assert value(text, "embps_request_duration_seconds_count", table="lru", method="Push") == 10
    assert value(text, "embps_request_duration_seconds_sum", table="user", method="Lookup") > 0
    assert value(text, "embps_requests_total", table="", method="Stats", code="OK") == 2


def test_table_gauges_match_the_shard_stats(scrape):
    text, stats = scrape
    for name in ("user", "lru"):
        assert value(text, "embps_table_rows", table=name, shard="0") == stats[name].rows
        assert value(text, "embps_table_memory_bytes", table=name, shard="0") == stats[name].memory_bytes
        assert value(text, "embps_admissions_total", table=name, shard="0") == stats[name].num_admitted
        assert value(text, "embps_evictions_total", table=name, shard="0") == stats[name].num_evicted
    assert stats["user"].rows == 7 and stats["lru"].num_admitted == 400
    assert stats["lru"].num_evicted > 0 and stats["lru"].rows <= 64
    assert value(text, "embps_table_pending_keys", table="admit", shard="0") == 16
    assert value(text, "embps_admission_dropped_total", table="admit", shard="0") == 40 - 16
    assert value(text, "embps_push_id_memory_bytes", shard="0") > 0  # the client names its pushes
    # Words a row: user 4 values + 1 state + 2 meta; int8 dim 64: 2 + 16 value + 1 + 2.
    assert value(text, "embps_table_row_bytes", table="user", shard="0") == 4 * 7
    assert value(text, "embps_table_row_bytes", table="int8", shard="0") == 4 * 21
    assert stats["int8"].rows == 50


def test_names_units_and_labels_follow_the_conventions(scrape):
    text, _ = scrape
    names = {name for name, _ in samples(text) if not name.startswith(("python_", "process_"))}
    assert names and all(n.startswith("embps_") for n in names), names
    allowed_labels = {"table", "method", "code", "shard", "le", "state"}  # state: a few fixed values
    for (name, labels), _ in samples(text).items():
        if name.startswith("embps_"):
            assert {k for k, _ in labels} <= allowed_labels, (name, labels)
            tables = {"", "user", "lru", "admit", "int8", "unknown"}
            assert dict(labels).get("table", "") in tables, "a label holds a key"
    for family in text_string_to_metric_families(text):
        if family.name == "embps_request_duration_seconds":
            assert family.type == "histogram"


def test_a_scrape_reads_the_tables_as_they_are_and_never_beside_a_call_that_changes_them():
    """The table figures are read at the scrape, under the lock every table call holds: current
    without any refresh after a push, and, while a call holds the lock for longer than the scrape's
    patience, the figures of the scrape before (never a half-changed table, never a hung scrape)."""
    import asyncio
    import time

    from prometheus_client import generate_latest

    from ps.shard.metrics import ShardMetrics
    from ps.shard.server import READING_PATIENCE_S, ParameterServerServicer
    from ps.shard.state import Shard

    async def scenario():
        shard = Shard(make_job([USER]), 0)
        metrics = ShardMetrics(0)
        servicer = ParameterServerServicer(shard, metrics)
        table = shard.table("user")

        def rows() -> float:
            return value(generate_latest(metrics.registry).decode(), "embps_table_rows", table="user", shard="0")

        assert rows() == 0
        servicer.run_blocking(lambda: table.apply_gradients(np.arange(7, dtype=np.int64), np.ones((7, 4), np.float32)))
        assert rows() == 7
        with servicer._tables_lock:  # a call in progress: it changes the table while it holds the lock
            table.apply_gradients(np.arange(7, 20, dtype=np.int64), np.ones((13, 4), np.float32))
            start = time.monotonic()
            assert rows() == 7
            assert 0.9 * READING_PATIENCE_S <= time.monotonic() - start < READING_PATIENCE_S + 2  # waited, then gave up
        assert rows() == 20
        assert value(generate_latest(metrics.registry).decode(), "embps_table_version", table="user", shard="0") == 2

    asyncio.run(scenario())
