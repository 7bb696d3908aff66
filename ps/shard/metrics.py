"""Prometheus metrics of one PS shard process, served on their own port.

Names carry the `embps_` prefix and base units; labels are `table`, `method`, `code` and
`shard`, never a key. The tables' figures (rows, memory, version, admissions, evictions, ...)
are read from the tables when /metrics is scraped, under the lock every table call holds
(TableCollector): a push pays nothing for them, and a scrape never reads a table that a call
is changing.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Container, Iterable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from ps.process.metrics import LATENCY_BUCKETS, serve_metrics


class ShardMetrics:
    """Every metric of one shard, in a registry of their own (so tests can run several)."""

    def __init__(self, shard: int, registry: CollectorRegistry | None = None) -> None:
        self.shard = str(shard)
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "embps_requests", "RPCs answered, by final status code", ["table", "method", "code"], registry=r
        )
        self.request_keys = KeyCounts()
        r.register(self.request_keys)
        self.request_bytes = Counter(
            "embps_request_payload_bytes", "Key, value and gradient bytes received", ["table", "method"], registry=r
        )
        self.duration = Histogram(
            "embps_request_duration_seconds",
            "Server time per RPC, from handler entry to reply",
            ["table", "method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.duplicate_pushes = Counter(
            "embps_duplicate_pushes",
            "Pushes answered from the push-id memory, not applied again",
            ["table"],
            registry=r,
        )
        self.subscribers = Gauge(
            "embps_subscribers", "Open Subscribe streams (serving replicas following)", ["table", "shard"], registry=r
        )
        self.full_copies = Gauge(
            "embps_subscribe_full_copies",
            "Full copies of a table to subscribers (full_sync): running, and waiting for their turn",
            ["shard", "state"],
            registry=r,
        )
        self.heartbeats = Counter(
            "embps_subscribe_heartbeats",
            "Heartbeats sent on idle Subscribe streams (of a heartbeat group, one stream a connection sends them)",
            ["table", "shard"],
            registry=r,
        )
        self.range_memory = Gauge(
            "embps_subscribe_range_bytes",
            "Bytes of keys and rows that Subscribe ranges hold, all streams together (embps ps "
            "--subscribe-memory-bytes bounds it)",
            ["shard"],
            registry=r,
        )
        self.ranges = Gauge(
            "embps_subscribe_ranges",
            "Subscribe ranges holding their rows (holding), and waiting for the memory to read them (waiting)",
            ["shard", "state"],
            registry=r,
        )
        self.stream_range = Histogram(
            "embps_subscribe_range_versions",
            "Pushes merged into one range sent to a subscriber (1: it keeps up; more: it is slower than the pushes)",
            # Not by table: 14 series a table made it most of a 300-table shard's series (8,154).
            ["shard"],
            buckets=(1, 2, 4, 8, 16, 64, 256, 1024, 4096, 16384),
            registry=r,
        )
        self.restore_size = Gauge(
            "embps_restore_size_bytes", "Bytes of snapshot files the shard's start restores from", ["shard"], registry=r
        )
        self.restore_read = Gauge(
            "embps_restore_read_bytes",
            "Bytes of snapshot files read so far by the restore (equal to the size once it serves)",
            ["shard"],
            registry=r,
        )
        # The tables' own figures, read when /metrics is scraped (TableCollector.attach), not after every push.
        self.tables = TableCollector(self.shard)
        r.register(self.tables)

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Starts the /metrics HTTP server in a daemon thread; returns the bound port."""
        return serve_metrics(port, host, self.registry)


UNKNOWN_TABLE = "unknown"  # the table label of a name the shard does not hold: labels stay bounded


class KeyCounts:
    """embps_request_keys_total{table, method}: keys carried by RPCs (before dedupe), kept as plain
    integers and exported when /metrics is scraped. A multi-table call counts each of its tables:
    a Counter child's inc() per table cost a 200-table call ~0.2 ms of the event loop's time."""

    def __init__(self) -> None:
        self._counts: dict[str, dict[str, int]] = {}  # method -> table label -> keys
        self._lock = threading.Lock()  # the calls' threads add, the scrape's thread reads

    def add(self, table: str, method: str, keys: int) -> None:
        with self._lock:
            counts = self._counts.setdefault(method, {})
            counts[table] = counts.get(table, 0) + keys

    def add_tables(self, method: str, tables: Iterable[str], keys: Iterable[int], known: Container[str]) -> None:
        """Adds keys[i] to (tables[i], method) for each i; a table not in `known` counts as
        UNKNOWN_TABLE."""
        with self._lock:
            counts = self._counts.setdefault(method, {})
            for table, n in zip(tables, keys, strict=True):
                if table not in known:
                    table = UNKNOWN_TABLE
                counts[table] = counts.get(table, 0) + n

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "embps_request_keys", "Keys carried by RPCs (before dedupe)", labels=["table", "method"]
        )
        with self._lock:
            counts = [(method, list(tables.items())) for method, tables in self._counts.items()]
        for method, tables in counts:
            for table, n in tables:
                family.add_metric([table, method], n)
        yield family


@dataclass(frozen=True)
class TableReading:
    """One table's figures at a scrape (the shard's EmbeddingTable and the logs it holds)."""

    name: str
    rows: int
    memory_bytes: int  # the table plus its update and commit logs
    row_bytes: int
    pending_keys: int
    version: int
    admissions: int
    evictions: int
    pending_dropped: int


@dataclass(frozen=True)
class ShardReading:
    """What a scrape reports of the shard's tables and its push-id memory."""

    tables: tuple[TableReading, ...]
    push_id_memory_bytes: int


_TABLE_GAUGES = (
    ("embps_table_rows", "Rows (admitted keys) held", "rows"),
    (
        "embps_table_memory_bytes",
        "Host and device bytes allocated: rows, key map, admission counters, change tracking, update log "
        "(row blocks are allocated whole, e.g. 65,536 rows; their pages never written are not resident)",
        "memory_bytes",
    ),
    (
        "embps_table_row_bytes",
        "Bytes one row takes in the row blocks: value in the table's storage (float32, float16, int8 "
        "with scale and bias), optimizer state, metadata",
        "row_bytes",
    ),
    ("embps_table_pending_keys", "Keys counted while they wait for admission", "pending_keys"),
    ("embps_table_version", "Pushes applied to the table", "version"),
)
_TABLE_COUNTERS = (
    ("embps_admissions", "Keys admitted to a row", "admissions"),
    ("embps_evictions", "Rows evicted (capacity or TTL)", "evictions"),
    (
        "embps_admission_dropped",
        "Pending keys forgotten because admission.max_pending was reached (oldest first)",
        "pending_dropped",
    ),
)


class TableCollector:
    """A Prometheus collector of the tables' figures, read at each scrape through `read` (set by
    attach: the server's, which takes the tables' lock). Reports nothing until attached."""

    def __init__(self, shard: str) -> None:
        self.shard = shard
        self._read: Callable[[], ShardReading] | None = None

    def attach(self, read: Callable[[], ShardReading]) -> None:
        self._read = read

    def describe(self) -> list[Metric]:
        return []  # registering must not read the tables (they may not exist yet)

    def collect(self) -> Iterator[Metric]:
        if self._read is None:
            return
        reading = self._read()
        labels = ["table", "shard"]
        for name, documentation, field in _TABLE_GAUGES:
            family = GaugeMetricFamily(name, documentation, labels=labels)
            for table in reading.tables:
                family.add_metric([table.name, self.shard], getattr(table, field))
            yield family
        for name, documentation, field in _TABLE_COUNTERS:
            family = CounterMetricFamily(name, documentation, labels=labels)
            for table in reading.tables:
                family.add_metric([table.name, self.shard], getattr(table, field))
            yield family
        family = GaugeMetricFamily(
            "embps_push_id_memory_bytes",
            "Bytes held by the push-id memory (dedupe of retried pushes)",
            labels=["shard"],
        )
        family.add_metric([self.shard], reading.push_id_memory_bytes)
        yield family
