"""Prometheus metrics of one serving replica, served on their own port.

Staleness is measured per push: the seconds between the push's acknowledgement at the PS (its
clock) and the moment its range is applied here, so the rows are visible to lookups (this
host's clock; on one host, or with synchronised clocks, the difference is the delay).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from ps.process.metrics import LATENCY_BUCKETS, serve_metrics

# 1 ms .. 60 s, dense below 1 s where the freshness target lies.
STALENESS_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7,
    0.8, 0.9, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0,
)


class ServingMetrics:
    """Every metric of one replica, in a registry of their own (so tests can run several)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "embps_serving_requests", "RPCs answered, by final status code", ["table", "method", "code"], registry=r
        )
        self.request_duration = Histogram(
            "embps_serving_request_duration_seconds",
            "Server time per RPC that reached its method (the gate's Lookups too), from handler entry to reply",
            ["table", "method", "code"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.lookup_duration = Histogram(
            "embps_serving_lookup_duration_seconds",
            "Server time per Lookup, from handler entry to reply",
            ["table"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.lookup_keys = Counter("embps_serving_lookup_keys", "Keys looked up", ["table"], registry=r)
        self.lookup_missing = Counter(
            "embps_serving_lookup_missing_keys", "Keys looked up without a row (answered with the default)",
            ["table"], registry=r,
        )
        self.staleness = Histogram(
            "embps_serving_staleness_seconds",
            "Per push: seconds from its acknowledgement at the PS to its rows being visible here",
            # Not by table (embps_serving_version is): 29 series a table and shard made 18,000 of a
            # replica's 21,345 at 300 tables x 2 shards.
            ["shard"],
            buckets=STALENESS_BUCKETS,
            registry=r,
        )
        self.version = Gauge(
            "embps_serving_version", "PS version of the newest complete range served", ["table", "shard"], registry=r
        )
        self.stale = Gauge(
            "embps_serving_shard_stale", "1 while a PS shard's stream is down or silent past the threshold",
            ["shard"], registry=r,
        )
        self.resyncs = Counter(
            "embps_serving_resyncs", "Full resyncs (log gap, shard restart, version gone back)",
            ["table", "shard"], registry=r,
        )
        # The consistent cut (serving/cut.py), consistency = "step".
        self.model_version = Gauge(
            "embps_serving_model_version", "Training step every lookup is answered at (the cut)", registry=r
        )
        self.cut_lag_steps = Gauge(
            "embps_serving_cut_lag_steps", "Newest step a shard committed here minus the step served", registry=r
        )
        self.cut_lag_seconds = Gauge(
            "embps_serving_cut_lag_seconds",
            "Seconds since the oldest commit received and not yet visible was recorded (0: none waits)",
            registry=r,
        )
        self.waiting_bytes = Gauge(
            "embps_serving_waiting_delta_bytes", "Bytes of committed deltas received beyond the cut", registry=r
        )
        self.waiting_deltas = Gauge(
            "embps_serving_waiting_deltas", "Committed deltas received beyond the cut", registry=r
        )
        self.cut_visible_seconds = Histogram(
            "embps_serving_cut_visible_seconds",
            "Per committed delta: seconds from its commit at the PS to its rows being visible in a cut",
            buckets=STALENESS_BUCKETS,
            registry=r,
        )
        self.applied_rows = Counter(
            "embps_serving_applied_rows", "Rows written from the update streams", ["table", "shard"], registry=r
        )
        self.rows = Gauge("embps_serving_rows", "Rows held", ["table", "shard"], registry=r)
        self.lookup_queue = Gauge(
            "embps_serving_lookup_queue", "Lookups admitted and not yet answered (the load-shedding queue)", registry=r
        )
        self.lookup_queue_limit = Gauge(
            "embps_serving_lookup_queue_limit", "max_queue: Lookups admitted before more are shed (0: no bound)",
            registry=r,
        )
        self.shed = Counter(
            "embps_serving_shed_lookups",
            "Lookups answered RESOURCE_EXHAUSTED unparsed because max_queue were already waiting",
            registry=r,
        )

    def replace_queue_metrics(self, collector: Collector) -> None:
        """Exports the queue gauge and the shed counter from `collector` (the serving gate's counts)
        instead of the ones above, which only the replica's own LookupQueue updates."""
        self.registry.unregister(self.lookup_queue)
        self.registry.unregister(self.shed)
        self.registry.register(collector)

    def add_native_calls(self, native: Any) -> None:
        """Exports the request, duration and key metrics as the sums of this process's Python
        counts and the serving gate's native Lookups (`native`: its NativeLookups), under the
        same names and labels."""
        python = (self.requests, self.request_duration, self.lookup_duration, self.lookup_keys, self.lookup_missing)
        for metric in python:
            self.registry.unregister(metric)
        self.native_calls = NativeCallMetrics(self, native)
        self.registry.register(self.native_calls)

    def add_stream_gauges(self, followers: Sequence[Any], tables: Sequence[Any]) -> None:
        """Exports each stream's seconds since its last message and each table's bytes, read when
        /metrics is scraped (`followers`: the ShardFollowers, `tables`: the TableReplicas)."""
        self.registry.register(StreamGauges(followers, tables))

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Starts the /metrics HTTP server in a daemon thread; returns the bound port."""
        return serve_metrics(port, host, self.registry)


_CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


class StreamGauges:
    """Prometheus collector: gauges computed at scrape time, so that no task wakes the replica
    to keep them fresh (an idle replica's CPU per second is what a lightly loaded one pays per
    call on top of its Lookups)."""

    def __init__(self, followers: Sequence[Any], tables: Sequence[Any]) -> None:
        self._followers = tuple(followers)
        self._tables = tuple(tables)

    def collect(self) -> Iterator:
        now = time.monotonic()
        since = GaugeMetricFamily(
            "embps_serving_seconds_since_message", "Seconds since the last message of the shard's stream",
            labels=["table", "shard"],
        )
        for f in self._followers:
            since.add_metric([f.replica.name, str(f.shard)], now - f.status.last_message)
        yield since
        memory = GaugeMetricFamily(
            "embps_serving_memory_bytes",
            "Bytes of maps and row blocks allocated (a shard's blocks whole, 16,384 rows at first; their pages "
            "never written are not resident)",
            labels=["table"],
        )
        for table in self._tables:
            memory.add_metric([table.name], table.memory_bytes)
        yield memory


class NativeCallMetrics:
    """Prometheus collector: ServingMetrics' per-call series, Python's counts plus the gate's."""

    def __init__(self, metrics: ServingMetrics, native: Any) -> None:
        self._metrics = metrics
        self._native = native
        self.gate: Any = None  # the ServingGate, once it runs: the calls it ends itself count too

    def collect(self) -> Iterator:
        m = self._metrics
        native = self._native.metrics()
        requests: dict[tuple[str, ...], float] = {}
        durations: dict[tuple[str, ...], tuple[list[float], float]] = {}
        for table, method, code, count, cumulative, total in native["calls"]:
            labels = (table, method, _CODE_NAMES[code])
            requests[labels] = requests.get(labels, 0.0) + count
            durations[labels] = (list(cumulative), total)
        ended = self.gate.ended() if self.gate is not None else []
        for method, code, count in [*native["denied"], *ended]:
            labels = ("", method, _CODE_NAMES[code])
            requests[labels] = requests.get(labels, 0.0) + count
        keys: dict[tuple[str, ...], float] = {}
        missing: dict[tuple[str, ...], float] = {}
        lookup_durations: dict[tuple[str, ...], tuple[list[float], float]] = {}
        for table, n_keys, n_missing, cumulative, count, total in native["tables"]:
            if count:
                keys[(table,)] = n_keys
                missing[(table,)] = n_missing
                lookup_durations[(table,)] = (list(cumulative), total)
        yield _counter(m.requests, requests)
        yield _histogram(m.request_duration, durations)
        yield _histogram(m.lookup_duration, lookup_durations)
        yield _counter(m.lookup_keys, keys)
        yield _counter(m.lookup_missing, missing)


def _counter(metric: Counter, extra: dict[tuple[str, ...], float]) -> CounterMetricFamily:
    (family,) = metric.collect()
    names = list(metric._labelnames)
    totals = dict(extra)
    for sample in family.samples:
        if sample.name.endswith("_total"):
            labels = tuple(sample.labels[n] for n in names)
            totals[labels] = totals.get(labels, 0.0) + sample.value
    out = CounterMetricFamily(family.name, family.documentation, labels=names)
    for labels, value in sorted(totals.items()):
        out.add_metric(list(labels), value)
    return out


def _histogram(metric: Histogram, extra: dict[tuple[str, ...], tuple[list[float], float]]) -> HistogramMetricFamily:
    (family,) = metric.collect()
    names = list(metric._labelnames)
    bounds = [floatToGoString(b) for b in metric._upper_bounds]  # the last is +Inf
    series = {labels: (list(cumulative), total) for labels, (cumulative, total) in extra.items()}
    for sample in family.samples:
        labels = tuple(sample.labels[n] for n in names)
        cumulative, total = series.setdefault(labels, ([0.0] * len(bounds), 0.0))
        if sample.name.endswith("_bucket"):
            cumulative[bounds.index(sample.labels["le"])] += sample.value
        elif sample.name.endswith("_sum"):
            series[labels] = (cumulative, total + sample.value)
    out = HistogramMetricFamily(family.name, family.documentation, labels=names)
    for labels, (cumulative, total) in sorted(series.items()):
        out.add_metric(list(labels), list(zip(bounds, cumulative, strict=True)), total)
    return out
