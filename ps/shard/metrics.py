"""Prometheus metrics of one PS shard process, served on their own port.

Names carry the `embps_` prefix and base units; labels are `table`, `method`, `code` and
`shard`, never a key. Table gauges are refreshed by the server after every call that changes
a table (on the thread that owns the tables), so a scrape never touches a table.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from ps.process.metrics import LATENCY_BUCKETS


class ShardMetrics:
    """Every metric of one shard, in a registry of their own (so tests can run several)."""

    def __init__(self, shard: int, registry: CollectorRegistry | None = None) -> None:
        self.shard = str(shard)
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "embps_requests", "RPCs answered, by final status code", ["table", "method", "code"], registry=r
        )
        self.request_keys = Counter(
            "embps_request_keys", "Keys carried by RPCs (before dedupe)", ["table", "method"], registry=r
        )
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
        self.rows = Gauge("embps_table_rows", "Rows (admitted keys) held", ["table", "shard"], registry=r)
        self.memory = Gauge(
            "embps_table_memory_bytes",
            "Host and device bytes held: rows, key map, admission counters, change tracking, update log",
            ["table", "shard"],
            registry=r,
        )
        self.row_bytes = Gauge(
            "embps_table_row_bytes",
            "Bytes one row takes in the row blocks: value in the table's storage (float32, float16, int8 "
            "with scale and bias), optimizer state, metadata",
            ["table", "shard"],
            registry=r,
        )
        self.pending = Gauge(
            "embps_table_pending_keys", "Keys counted while they wait for admission", ["table", "shard"], registry=r
        )
        self.pending_dropped = Counter(
            "embps_admission_dropped",
            "Pending keys forgotten because admission.max_pending was reached (oldest first)",
            ["table", "shard"],
            registry=r,
        )
        self.push_id_memory = Gauge(
            "embps_push_id_memory_bytes",
            "Bytes held by the push-id memory (dedupe of retried pushes)",
            ["shard"],
            registry=r,
        )
        self.version = Gauge("embps_table_version", "Pushes applied to the table", ["table", "shard"], registry=r)
        self.evictions = Counter("embps_evictions", "Rows evicted (capacity or TTL)", ["table", "shard"], registry=r)
        self.admissions = Counter("embps_admissions", "Keys admitted to a row", ["table", "shard"], registry=r)
        self.subscribers = Gauge(
            "embps_subscribers", "Open Subscribe streams (serving replicas following)", ["table", "shard"], registry=r
        )
        self.stream_range = Histogram(
            "embps_subscribe_range_versions",
            "Pushes merged into one range sent to a subscriber (1: it keeps up; more: it is slower than the pushes)",
            ["table", "shard"],
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
        self._seen: dict[str, tuple[int, int, int]] = {}
        self._children: dict[str, tuple] = {}  # table -> its labelled gauges and counters (observe_table)

    def observe_table(self, table, other_bytes: int = 0) -> None:
        """Copies an EmbeddingTable's size, memory (+ other_bytes held for it, e.g. its update
        log), version and counters into the metrics."""
        name = table.name
        children = self._children.get(name)
        if children is None:  # labels() looks a child up by its label values: once per table, not per push
            metrics = (self.rows, self.memory, self.row_bytes, self.version, self.pending,
                       self.evictions, self.admissions, self.pending_dropped)  # fmt: skip
            children = self._children[name] = tuple(m.labels(name, self.shard) for m in metrics)
        rows, memory, row_bytes, version, pending, evictions, admissions, pending_dropped = children
        rows.set(table.size)
        memory.set(table.memory_bytes + other_bytes)
        row_bytes.set(4 * table.width)
        version.set(table.version)
        pending.set(table.num_pending)
        evicted, admitted, dropped = self._seen.get(name, (0, 0, 0))
        if table.num_evicted > evicted:
            evictions.inc(table.num_evicted - evicted)
        if table.num_admitted > admitted:
            admissions.inc(table.num_admitted - admitted)
        if table.num_pending_dropped > dropped:
            pending_dropped.inc(table.num_pending_dropped - dropped)
        self._seen[name] = (table.num_evicted, table.num_admitted, table.num_pending_dropped)

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Starts the /metrics HTTP server in a daemon thread; returns the bound port."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return server.server_address[1]
