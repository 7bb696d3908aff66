"""A TCP proxy in front of etcd's JSON gateway that can lose the answer of one transaction.

    proxy = EtcdProxy.start(etcd.endpoint)     # 127.0.0.1, a free port; proxy.endpoint for a config
    proxy.lose_next_txn.set()                  # the next POST /v3/kv/txn reaches etcd, which applies
                                               # it; its connection then closes without the reply
    proxy.lost.wait(30)                        # set once an answer was lost
    proxy.refuse.set()                         # etcd out of reach: connections close unread
    proxy.refuse_after_loss.set()              # ... from the moment an answer is lost
    proxy.stop()

A connection here carries one request and one reply: the proxy reads the request whole (headers,
then Content-Length bytes), sends it on with `Connection: close`, and reads the reply until etcd
closes; that header in the reply tells ps/etcd.py's client (which keeps connections open otherwise)
not to send another on it. What it injects is what a client cannot tell from a lost answer: a
compare-and-swap that committed while the caller saw etcd unavailable.
"""

from __future__ import annotations

import socket
import threading
from urllib.parse import urlsplit

_TXN = b"POST /v3/kv/txn "


class EtcdProxy:
    def __init__(self, upstream: str, listener: socket.socket) -> None:
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 2379)
        self._listener = listener
        self.endpoint = f"http://127.0.0.1:{listener.getsockname()[1]}"
        self.lose_next_txn = threading.Event()
        self.lost = threading.Event()
        self.refuse = threading.Event()
        self.refuse_after_loss = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept, name="etcd-proxy", daemon=True)

    @classmethod
    def start(cls, upstream: str) -> EtcdProxy:
        listener = socket.create_server(("127.0.0.1", 0))
        proxy = cls(upstream, listener)
        proxy._thread.start()
        return proxy

    def stop(self) -> None:
        self._listener.close()
        self._thread.join(timeout=10)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:  # closed by stop()
                return
            threading.Thread(target=self._relay, args=(conn,), daemon=True).start()

    def _relay(self, conn: socket.socket) -> None:
        with conn:
            if self.refuse.is_set():
                return
            conn.settimeout(10)
            request = _read_request(conn)
            if request is None:
                return
            with socket.create_connection(self.upstream, timeout=10) as upstream:
                upstream.sendall(request)
                reply = _read_to_end(upstream)
            if request.startswith(_TXN) and self._take_loss():
                return  # etcd applied it; the caller never hears
            if self.refuse.is_set():
                return
            conn.sendall(reply)

    def _take_loss(self) -> bool:
        with self._lock:
            if not self.lose_next_txn.is_set():
                return False
            self.lose_next_txn.clear()
            if self.refuse_after_loss.is_set():
                self.refuse.set()
            self.lost.set()
            return True


def _read_request(conn: socket.socket) -> bytes | None:
    """One HTTP request: its headers, `Connection: close`, and Content-Length bytes of body (None:
    closed first)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    while len(body) < length:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        body += chunk
    # One request a connection here: etcd closes it after its answer, which tells the caller too
    # (the caller keeps connections open otherwise; see ps/etcd.py).
    return head + b"\r\nConnection: close\r\n\r\n" + body


def _read_to_end(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)
