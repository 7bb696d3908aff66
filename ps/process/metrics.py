"""What the Prometheus metrics of every embps server share: the latency buckets, so that a
shard's and a replica's histograms can be compared bucket by bucket, and the /metrics server."""

from __future__ import annotations

import socket
import sys
import threading
import time
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

# 50 us .. 10 s: a small lookup takes ~100 us of server time, a 64 MiB push a few seconds.
LATENCY_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
)


# A scrape connection is closed this long after it was taken, whatever it sent: the handler's socket
# timeout alone restarted at every byte, so a client sending one every 9 s held its slot for good.
METRICS_CLIENT_SECONDS = 10.0
# Connections served at once; more are closed at once. prometheus_client's server took a thread per
# connection without bound: 400 idle connections, 400 threads (a review), and a process past its
# thread limit fails everywhere it starts one (gRPC, asyncio.to_thread), not only on /metrics.
MAX_METRICS_CONNECTIONS = 32


class _MetricsHandler(WSGIRequestHandler):
    timeout = METRICS_CLIENT_SECONDS

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        pass  # a line on stderr per scrape


class _BoundedServer(ThreadingWSGIServer):
    """A thread per connection, at most MAX_METRICS_CONNECTIONS of them."""

    daemon_threads = True
    request_queue_size = 128  # the listen backlog (socketserver's 5 dropped a burst of connections)

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._slots = threading.BoundedSemaphore(MAX_METRICS_CONNECTIONS)
        self._open: dict[socket.socket, float] = {}  # connection -> when it is shut (time.monotonic)
        self._open_changed = threading.Condition()
        threading.Thread(target=self._shut_late_connections, name="metrics-deadlines", daemon=True).start()

    def _shut_late_connections(self) -> None:
        """One thread for every connection's deadline: shuts those past it, whose handler's read or
        write then fails (a thread a connection for this doubled the threads the bound allows). It
        sleeps while no connection is open, and wakes at the next deadline otherwise."""
        while True:
            with self._open_changed:
                while not self._open:
                    self._open_changed.wait()
                now = time.monotonic()
                late = [connection for connection, due in self._open.items() if due <= now]
                for connection in late:
                    del self._open[connection]
                if not late:
                    self._open_changed.wait(min(self._open.values()) - now)
                    continue
            for connection in late:
                _shut(connection)

    def handle_error(self, request, client_address) -> None:
        """A client that left (or was shut at its deadline) mid-request is no error of the server:
        socketserver printed a traceback on stderr for each (a broken pipe of a reply)."""
        if isinstance(sys.exc_info()[1], OSError):
            return
        super().handle_error(request, client_address)

    def process_request(self, request, client_address) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        with self._open_changed:
            self._open[request] = time.monotonic() + METRICS_CLIENT_SECONDS
            self._open_changed.notify()
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._open_changed:
                self._open.pop(request, None)
            self._slots.release()


def _shut(connection: socket.socket) -> None:
    """Ends a connection past METRICS_CLIENT_SECONDS: its handler's read or write then fails."""
    try:
        connection.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # closed already


def serve_metrics(port: int, host: str, registry: CollectorRegistry) -> int:
    """Serves `registry` at http://host:port/metrics from a daemon thread (a thread per connection,
    bounded, idle connections closed); returns the bound port. OSError where it cannot bind."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
    server_class = type("MetricsServer", (_BoundedServer,), {"address_family": family})
    server = make_server(host, port, make_wsgi_app(registry), server_class, handler_class=_MetricsHandler)
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server.server_address[1]
