"""The /metrics server every embps process runs (ps/process/metrics.py serve_metrics), against
clients that connect and send nothing: a thread per connection, at most MAX_METRICS_CONNECTIONS,
each idle one closed after METRICS_CLIENT_SECONDS, and scrapes served once they are gone."""

from __future__ import annotations

import socket
import threading
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, Counter

from ps.process import metrics as metrics_module
from ps.process.metrics import MAX_METRICS_CONNECTIONS, serve_metrics
from tests.helpers.waiting import wait_until


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        return reply.read().decode()


def _closed_by_server(connection: socket.socket) -> bool:
    try:
        return connection.recv(1) == b""
    except TimeoutError:
        return False
    except OSError:
        return True


def test_idle_connections_hold_a_bounded_number_of_threads_and_are_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    """prometheus_client's server took a thread per connection without bound (400 idle
    connections, 400 threads in a shard: a review), and kept an idle one for good."""
    monkeypatch.setattr(metrics_module._MetricsHandler, "timeout", 1.0)
    registry = CollectorRegistry()
    Counter("embps_test_things", "things", registry=registry).inc(3)
    port = serve_metrics(0, "127.0.0.1", registry)
    assert "embps_test_things_total 3.0" in _scrape(port)
    threads_before = threading.active_count()
    idle = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(3 * MAX_METRICS_CONNECTIONS)]
    for connection in idle:
        connection.settimeout(0.01)
    try:
        wait_until(lambda: sum(map(_closed_by_server, idle)) >= 2 * MAX_METRICS_CONNECTIONS,
                   "the connections past the bound to be closed")  # fmt: skip
        assert threading.active_count() - threads_before <= MAX_METRICS_CONNECTIONS
        wait_until(lambda: all(map(_closed_by_server, idle)), "the idle connections to be closed")
        wait_until(lambda: threading.active_count() <= threads_before, "their threads to end")
        assert "embps_test_things_total 3.0" in _scrape(port)
    finally:
        for connection in idle:
            connection.close()
