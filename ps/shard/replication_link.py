"""The data path of a shard's replication: one framed TCP connection per Replicate stream.

Why: a push forwarded as a grpc.aio stream message cost the primary about what the client's
unary Push costs it (HTTP/2 framing and completion events on the event loop, under the GIL), and
the standby as much again to receive it, so a pair spent 2.3-4x a lone shard's CPU per push. On
the link a forwarded push is one `sendall` from the thread that is about to apply it (the GIL
released meanwhile), and one `recv_into` on the standby's link thread, which hands it to the
tables thread and sends the ack back the same way.

    primary                                   standby
    Replicate stream (gRPC): handshake  --->  accepted: listens on a port for this stream alone
                             <---  ack: link_port, link_key
    connect, send link_key              --->  key checked (constant time), listener closed
    frame: ReplicateRequest (push)      --->  applied on the tables thread
                             <---  frame: ReplicateAck (its answer)

The Replicate stream keeps the handshake, the state copy and the heartbeats; every push and
commit after the handshake travels on the link. A frame is a 4-byte little-endian length and a
message. The key went over the authenticated stream (TLS, the trainer's token), so only the
primary of that stream can use the port; with `[security]` TLS the link is TLS too, with the
job's files, as the stream is. A wrong key closes that connection (the port waits for the right
one until its deadline); a frame over the job's message limit, a message that does not parse, or
one the standby refuses closes the link, which breaks the stream: the primary reconnects as after
any break.
"""

from __future__ import annotations

import hmac
import logging
import queue
import secrets
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable

from ps.security import SecurityConfig

log = logging.getLogger("embps.ps")

Buffer = bytes | bytearray | memoryview  # what a frame is made of (collections.abc.Buffer from Python 3.12)

KEY_BYTES = 32
ROLE_FRAMES = b"F"  # the primary -> standby connection (pushes and commits)
ROLE_ACKS = b"A"  # the standby -> primary connection (their acks)
_LENGTH = struct.Struct("<I")
_KEY_TIMEOUT_S = 3.0  # a connection without its key by then is closed (a busy host may pause one ~1 s)


class LinkRefused(Exception):
    """The standby refuses a frame: the link closes, and the message says why."""


def split_host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def _server_context(security: SecurityConfig) -> ssl.SSLContext | None:
    """The standby's side of TLS (the job's server certificate; client certificates required under
    mutual TLS), read from the files now; None without TLS."""
    if not security.tls:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(security.tls_cert, security.tls_key)
    if security.mutual_tls:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(security.client_ca)
    return context


def _client_context(security: SecurityConfig) -> ssl.SSLContext | None:
    """The primary's side of TLS (the job's CA, its client certificate if any); None without TLS."""
    if not security.tls:
        return None
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=security.tls_ca)
    if security.client_cert:
        context.load_cert_chain(security.client_cert, security.client_key)
    return context


def _read_by(sock: socket.socket, size: int, deadline: float) -> bytes:
    """Exactly `size` bytes before `deadline` (time.monotonic), however slowly they come; TimeoutError
    otherwise, ConnectionError if the peer closes first."""
    data = b""
    while len(data) < size:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"{len(data)} of {size} bytes by the deadline")
        sock.settimeout(left)
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError(f"closed after {len(data)} of {size} bytes")
        data += chunk
    return data


class _Framed:
    """A connected socket that sends and receives length-prefixed frames."""

    def __init__(self, sock: socket.socket, max_frame: int) -> None:
        self.sock = sock
        self.max_frame = max_frame
        self.closed = False
        self._plain = not isinstance(sock, ssl.SSLSocket)

    def send(self, *payload: Buffer) -> None:
        """One frame whose message is the concatenation of `payload`'s buffers."""
        views = [memoryview(part).cast("B") for part in payload]
        header = _LENGTH.pack(sum(view.nbytes for view in views))
        if not self._plain:
            self.sock.sendall(b"".join([header, *views]))
            return
        # One system call for all, no copy.
        parts = [view for view in (memoryview(header), *views) if view.nbytes]
        while parts:
            sent = self.sock.sendmsg(parts)
            while sent and parts:
                if sent >= parts[0].nbytes:
                    sent -= parts[0].nbytes
                    parts.pop(0)
                else:
                    parts[0] = parts[0][sent:]
                    sent = 0

    def _recv_exact(self, size: int, frame_started: bool) -> bytearray | None:
        buffer = bytearray(size)
        view = memoryview(buffer)
        got = 0
        while got < size:
            try:
                n = self.sock.recv_into(view[got:])
            except TimeoutError:
                if self.closed:
                    raise ConnectionError("closed") from None
                continue  # idle: liveness is the stream's heartbeats' business
            if n == 0:
                if got == 0 and not frame_started:
                    return None
                raise ConnectionError("the connection ended inside a frame")
            got += n
        return buffer

    def recv(self) -> bytearray | None:
        """The next frame; None when the peer closed the connection between frames."""
        header = self._recv_exact(_LENGTH.size, frame_started=False)
        if header is None:
            return None
        (size,) = _LENGTH.unpack(header)
        if size > self.max_frame:
            raise LinkRefused(f"a frame of {size} bytes, over the limit of {self.max_frame}")
        return self._recv_exact(size, frame_started=True) if size else bytearray()

    def close(self) -> None:
        self.closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


class StandbyLink:
    """The standby's end of one stream's link: listens on `host` (port picked by the system) for
    the primary that holds `key`, which opens two connections (frames one way, acks the other: an
    SSL connection must not be read and written by two threads at once), then answers its frames
    on a thread of its own: handle(frame) -> the ack's bytes, or LinkRefused. on_end(why) runs
    once, on that thread, when the link ends for any reason but close()."""

    def __init__(self, host: str, security: SecurityConfig, max_frame: int, accept_timeout: float) -> None:
        self.key = secrets.token_bytes(KEY_BYTES)
        self.max_frame = max_frame
        self.accept_timeout = accept_timeout
        self._context = _server_context(security)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.create_server((host, 0), family=family)
        self.port = self._listener.getsockname()[1]
        self._connections: list[_Framed] = []
        self._closed = False
        self._lock = threading.Lock()

    def start(self, handle: Callable[[bytearray], bytes], on_end: Callable[[str], None]) -> None:
        threading.Thread(target=self._run, args=(handle, on_end), name="replication-link", daemon=True).start()

    def _accept(self) -> dict[bytes, _Framed]:
        """The primary's two connections ({ROLE_FRAMES: ..., ROLE_ACKS: ...}), each sending the key
        and its role first, before the deadline; fewer when the deadline passed."""
        deadline = time.monotonic() + self.accept_timeout
        found: dict[bytes, _Framed] = {}
        while len(found) < 2 and not self._closed:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._listener.settimeout(left)
            try:
                conn, peer = self._listener.accept()
            except (TimeoutError, OSError):
                break
            try:
                hello_by = time.monotonic() + _KEY_TIMEOUT_S
                conn.settimeout(_KEY_TIMEOUT_S)
                if self._context is not None:
                    conn = self._context.wrap_socket(conn, server_side=True)
                hello = _read_by(conn, KEY_BYTES + 1, hello_by)
                framed = _Framed(conn, self.max_frame)
            except (OSError, ConnectionError, ssl.SSLError) as exc:
                log.warning("replication link: a connection from %s failed before its key (%s)", peer, exc)
                conn.close()
                continue
            role = bytes(hello[KEY_BYTES:])
            if not hmac.compare_digest(bytes(hello[:KEY_BYTES]), self.key) or role not in (ROLE_FRAMES, ROLE_ACKS) \
                    or role in found:
                log.warning("replication link: a connection from %s with a wrong key or role: closed", peer)
                conn.close()
                continue
            conn.settimeout(None)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            found[role] = framed
            with self._lock:
                self._connections.append(framed)
        return found

    def _run(self, handle: Callable[[bytearray], bytes], on_end: Callable[[str], None]) -> None:
        why = ""
        try:
            found = self._accept()
            self._listener.close()
            if len(found) < 2:
                why = f"the primary did not connect to the link within {self.accept_timeout:g} s"
                return
            frames, acks = found[ROLE_FRAMES], found[ROLE_ACKS]
            while True:
                frame = frames.recv()
                if frame is None:
                    why = "the primary closed the link"
                    return
                acks.send(handle(frame))
        except LinkRefused as exc:
            why = f"refused: {exc}"
        except (OSError, ConnectionError, ssl.SSLError) as exc:
            why = f"broken: {exc}"
        finally:
            with self._lock:
                ended_here = not self._closed
                self._closed = True
                for framed in self._connections:
                    framed.close()
            if ended_here and why:
                on_end(why)

    def close(self) -> None:
        """Ends the link (on_end is not called); returns without waiting for its thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for framed in self._connections:
                framed.close()
        try:
            self._listener.close()
        except OSError:
            pass


class PrimaryLink:
    """The primary's end: connects to the standby's link twice (frames, acks) and proves the key on
    both; a thread sends the frames queued by send() in order, another reads the acks: on_ack(frame)
    for each. on_end(why) runs (on either thread, at least once) when the link ends for any reason
    but close()."""

    def __init__(self, address: str, port: int, key: bytes, security: SecurityConfig, max_frame: int,
                 send_timeout: float) -> None:
        """Blocks while it connects (at most send_timeout each); raises OSError when it cannot.
        address: the standby's (its host is where the link listens)."""
        host, _ = split_host_port(address)
        context = _client_context(security)
        self.send_timeout = send_timeout
        self._frames = self._connect(host, port, key + ROLE_FRAMES, context, max_frame, send_timeout)
        try:
            self._acks = self._connect(host, port, key + ROLE_ACKS, context, max_frame, send_timeout)
        except BaseException:
            self._frames.close()
            raise
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = False

    @staticmethod
    def _connect(host: str, port: int, hello: bytes, context: ssl.SSLContext | None, max_frame: int,
                 timeout: float) -> _Framed:
        sock = socket.create_connection((host, port), timeout=timeout)
        try:
            if context is not None:
                sock = context.wrap_socket(sock, server_hostname=host)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(hello)
        except BaseException:
            sock.close()
            raise
        return _Framed(sock, max_frame)

    def start(self, on_ack: Callable[[bytearray], None], on_end: Callable[[str], None]) -> None:
        threading.Thread(target=self._write, args=(on_end,), name="replication-frames", daemon=True).start()
        threading.Thread(target=self._read, args=(on_ack, on_end), name="replication-acks", daemon=True).start()

    def send(self, *message: Buffer) -> None:
        """Queues one frame (the concatenation of `message`'s buffers, which must not change until
        it is sent); its thread sends the frames in the order they were queued. A frame that cannot
        be sent whole within send_timeout (the standby stopped reading) ends the link. Never blocks:
        the caller may be the event loop."""
        self._outbox.put(message)

    def _write(self, on_end: Callable[[str], None]) -> None:
        why = ""
        try:
            while (message := self._outbox.get()) is not None:
                self._frames.send(*message)
        except TimeoutError:
            why = f"the standby took nothing for {self.send_timeout:g} s"
        except (OSError, ConnectionError, ssl.SSLError) as exc:
            why = f"broken: {exc}"
        finally:
            if not self._closed:
                on_end(why or "closed")

    def _read(self, on_ack: Callable[[bytearray], None], on_end: Callable[[str], None]) -> None:
        why = ""
        try:
            while True:
                frame = self._acks.recv()
                if frame is None:
                    why = "the standby closed the link"
                    return
                on_ack(frame)
        except (OSError, ConnectionError, ssl.SSLError, LinkRefused) as exc:
            why = f"broken: {exc}"
        finally:
            if not self._closed:
                on_end(why)

    def close(self) -> None:
        """Ends the link (on_end is not called); frames still queued are dropped."""
        self._closed = True
        self._outbox.put(None)
        self._frames.close()
        self._acks.close()
