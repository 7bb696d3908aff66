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
        assert threading.active_count() - threads_before <= MAX_METRICS_CONNECTIONS + 1  # and the deadlines' thread
        wait_until(lambda: all(map(_closed_by_server, idle)), "the idle connections to be closed")
        wait_until(lambda: threading.active_count() <= threads_before + 1, "their threads to end")
        assert "embps_test_things_total 3.0" in _scrape(port)
    finally:
        for connection in idle:
            connection.close()


def test_a_connection_that_trickles_bytes_is_closed_at_its_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    """The handler's socket timeout restarts at every byte: a client sending one every 9 s (of a
    10 s timeout) held its slot for good, and 32 of them refused every scrape (a review)."""
    monkeypatch.setattr(metrics_module, "METRICS_CLIENT_SECONDS", 1.0)
    registry = CollectorRegistry()
    port = serve_metrics(0, "127.0.0.1", registry)
    connection = socket.create_connection(("127.0.0.1", port), timeout=5)
    connection.settimeout(0.05)
    request = b"GET /metrics HTTP/1.1\r\nHost: x\r\n"
    sent = [0]

    def trickle_until_closed() -> bool:
        if _closed_by_server(connection):
            return True
        try:
            connection.sendall(request[sent[0] % len(request) : sent[0] % len(request) + 1])
        except OSError:
            return True
        sent[0] += 1
        return False

    try:
        wait_until(trickle_until_closed, "the trickling connection to be closed")
        assert _scrape(port) is not None  # the server still answers
    finally:
        connection.close()
