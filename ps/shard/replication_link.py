"""The data path of a shard's replication: one framed TCP connection per Replicate stream.

Why: a push forwarded as a grpc.aio stream message cost the primary about what the client's
unary Push costs it (HTTP/2 framing and completion events on the event loop, under the GIL), and
the standby as much again to receive it, so a pair spent 2.3-4x a lone shard's CPU per push. On
the link a forwarded push is one non-blocking `sendmsg` from the thread that is about to apply it
(the GIL released meanwhile; what the socket does not take at once goes on from a sending
thread), and one `recv_into` on the standby's link thread, which applies it under the tables lock
and sends the ack back; the primary reads the acks on its event loop, where they settle the pushes
waiting for them (no thread hop).

    primary                                   standby
    Replicate stream (gRPC): handshake  --->  accepted: listens on a port for this stream alone
                             <---  ack: link_port, link_key
    connect, send link_key              --->  key checked (constant time), listener closed
    frame: ReplicateRequest (push)      --->  applied on the link's thread (tables lock)
                             <---  frame: ReplicateAck (its answer)

The Replicate stream keeps the handshake, the state copy and the heartbeats; every push and
commit after the handshake travels on the link. A frame is a 4-byte little-endian length and a
message. The key went over the authenticated stream (TLS, the shards' token), so only the
primary of that stream can use the port; with `[security]` TLS the link is TLS too, with the
job's files, as the stream is. A wrong key closes that connection (the port waits for the right
one until its deadline); a frame over the job's message limit, a message that does not parse, or
one the standby refuses closes the link, which breaks the stream: the primary reconnects as after
any break.
"""

from __future__ import annotations

import asyncio
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
from ps.security.certificates import FileStamps

log = logging.getLogger("embps.ps")

Buffer = bytes | bytearray | memoryview  # what a frame is made of (collections.abc.Buffer from Python 3.12)

KEY_BYTES = 32
ROLE_FRAMES = b"F"  # the primary -> standby connection (pushes and commits)
ROLE_ACKS = b"A"  # the standby -> primary connection (their acks)
_LENGTH = struct.Struct("<I")
_KEY_TIMEOUT_S = 3.0  # a connection without its key by then is closed (a busy host may pause one ~1 s)
_MAX_GREETINGS = 16  # connections greeted at once (each a thread until its key, or its timeout)
_ACCEPT_POLL_S = 0.05  # how often the accept loop looks whether both connections arrived


class LinkRefused(Exception):
    """The standby refuses a frame: the link closes, and the message says why."""


def split_host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def _build_server_context(security: SecurityConfig) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(security.tls_cert, security.tls_key)
    if security.mutual_tls:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(security.client_ca)
    return context


def _build_client_context(security: SecurityConfig) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=security.tls_ca)
    if security.client_cert:
        context.load_cert_chain(security.client_cert, security.client_key)
    return context


class _LastGoodContext:
    """An ssl.SSLContext of the job's TLS files, built again when they change; a new set that does
    not load is logged and the last one kept, as the gRPC ports keep theirs (ServerCertificates,
    ClientCertificates). Read from the files at each link, a half-written rotation (a key that is
    not the certificate's) made every new link fail with SSLError while the ports served on: the
    pair lost its standby at the next break of its stream, until someone mended the files."""

    def __init__(self, build: Callable[[SecurityConfig], ssl.SSLContext], security: SecurityConfig,
                 paths: list[str]) -> None:
        self._build = build
        self._security = security
        self._stamps = FileStamps([p for p in paths if p])
        self._context = build(security)  # the first set must load (its error names the file)
        self._lock = threading.Lock()

    def get(self) -> ssl.SSLContext:
        with self._lock:
            stamps = self._stamps.changed()
            if stamps is not None:
                try:
                    context = self._build(self._security)
                except (ssl.SSLError, OSError) as exc:
                    log.warning("replication link: TLS files changed but do not load (%s); keeping the current ones",
                                exc)
                    self._stamps.last = stamps  # tried: wait for the next change
                    return self._context
                if self._stamps.now() == stamps:  # else changed again while read: take the next version
                    self._stamps.last = stamps
                    self._context = context
            return self._context


_contexts: dict[tuple[str, SecurityConfig], _LastGoodContext] = {}
_contexts_lock = threading.Lock()


def _context(side: str, security: SecurityConfig) -> _LastGoodContext:
    with _contexts_lock:
        found = _contexts.get((side, security))
        if found is None:
            if side == "server":
                paths = [security.tls_cert, security.tls_key, security.client_ca if security.mutual_tls else None]
                found = _LastGoodContext(_build_server_context, security, paths)
            else:
                paths = [security.tls_ca, security.client_cert, security.client_key]
                found = _LastGoodContext(_build_client_context, security, paths)
            _contexts[(side, security)] = found
        return found


def _server_context(security: SecurityConfig) -> ssl.SSLContext | None:
    """The standby's side of TLS (the job's server certificate; client certificates required under
    mutual TLS), the files' last set that loaded; None without TLS."""
    return _context("server", security).get() if security.tls else None


def _client_context(security: SecurityConfig) -> ssl.SSLContext | None:
    """The primary's side of TLS (the job's CA, its client certificate if any), the files' last set
    that loaded; None without TLS."""
    return _context("client", security).get() if security.tls else None


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


def frame_parts(payload: tuple[Buffer, ...]) -> list[memoryview]:
    """The buffers of one frame: its length, then the message made of `payload`'s buffers."""
    views = [memoryview(part).cast("B") for part in payload]
    header = _LENGTH.pack(sum(view.nbytes for view in views))
    return [view for view in (memoryview(header), *views) if view.nbytes]


def _unsent(parts: list[memoryview], sent: int) -> list[memoryview]:
    """What is left of `parts` once their first `sent` bytes went out."""
    while sent and parts:
        if sent >= parts[0].nbytes:
            sent -= parts[0].nbytes
            parts = parts[1:]
        else:
            parts = [parts[0][sent:], *parts[1:]]
            sent = 0
    return parts


class _Framed:
    """A connected socket that sends and receives length-prefixed frames."""

    def __init__(self, sock: socket.socket, max_frame: int) -> None:
        self.sock = sock
        self.max_frame = max_frame
        self.closed = False
        self._plain = not isinstance(sock, ssl.SSLSocket)

    def send(self, *payload: Buffer) -> None:
        """One frame whose message is the concatenation of `payload`'s buffers."""
        self.send_parts(frame_parts(payload))

    def send_parts(self, parts: list[memoryview]) -> None:
        """Sends `parts` whole (blocking; the socket's timeout bounds each wait)."""
        if not self._plain:
            self.sock.sendall(b"".join(parts))
            return
        while parts:
            parts = _unsent(parts, self.sock.sendmsg(parts))  # one system call for all, no copy

    def send_now(self, parts: list[memoryview]) -> list[memoryview]:
        """Sends what the socket takes without waiting; returns the rest (empty: all sent). A TLS
        connection takes nothing this way (a TLS record cannot be sent in part and resumed)."""
        if not self._plain:
            return parts
        while parts:
            try:
                sent = self.sock.sendmsg(parts, (), socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            parts = _unsent(parts, sent)
        return parts

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
        and its role first, before the deadline; fewer when the deadline passed. Each connection
        is greeted (TLS, key) on a thread of its own while the next ones are accepted: greeted one
        at a time, two silent connections from anyone (3 s each for their key) held the primary's
        own past the deadline, and the link failed."""
        deadline = time.monotonic() + self.accept_timeout
        found: dict[bytes, _Framed] = {}
        changed = threading.Condition()
        pending = 0
        over = False  # _accept returned: a greeting that ends later closes its connection

        def greet(conn: socket.socket, peer) -> None:
            nonlocal pending
            framed = None
            try:
                hello_by = min(time.monotonic() + _KEY_TIMEOUT_S, deadline)
                conn.settimeout(max(hello_by - time.monotonic(), 0.001))
                if self._context is not None:
                    conn = self._context.wrap_socket(conn, server_side=True)
                hello = _read_by(conn, KEY_BYTES + 1, hello_by)
                role = bytes(hello[KEY_BYTES:])
                if not hmac.compare_digest(bytes(hello[:KEY_BYTES]), self.key) or role not in (ROLE_FRAMES, ROLE_ACKS):
                    log.warning("replication link: a connection from %s with a wrong key or role: closed", peer)
                    return
                conn.settimeout(None)
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                with changed:
                    if over or role in found or self._closed:
                        return
                    framed = found[role] = _Framed(conn, self.max_frame)
                    with self._lock:
                        self._connections.append(framed)
            except (OSError, ConnectionError, ssl.SSLError) as exc:
                log.warning("replication link: a connection from %s failed before its key (%s)", peer, exc)
            finally:
                if framed is None:
                    conn.close()
                with changed:
                    pending -= 1
                    changed.notify_all()

        self._listener.settimeout(_ACCEPT_POLL_S)
        while True:
            with changed:
                if len(found) == 2 or self._closed or time.monotonic() >= deadline:
                    break
                if pending >= _MAX_GREETINGS:  # a flood of connections: the next accept waits for a greeting to end
                    changed.wait(_ACCEPT_POLL_S)
                    continue
            try:
                conn, peer = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                break
            with changed:
                pending += 1
            threading.Thread(target=greet, args=(conn, peer), name="replication-link-greeting", daemon=True).start()
        with changed:
            over = True
            return dict(found)

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
    both. send() sends a frame from the caller's thread as far as the socket takes it at once, and
    hands the rest (and every frame after it, in order) to a sending thread; the acks are read on
    the event loop given to start(), which calls on_ack(frame) for each, so an ack settles its push
    with no thread hop. on_end(why) runs (on the loop or the sending thread, at least once) when the
    link ends for any reason but close()."""

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
        if context is None:
            # Blocking, so that a send with MSG_DONTWAIT never waits (a socket with a timeout polls
            # before each call); the kernel bounds the sending thread's waits instead.
            self._frames.sock.settimeout(None)
            seconds = max(send_timeout, 1e-3)
            timeval = struct.pack("ll", int(seconds), int(seconds % 1 * 1e6))
            self._frames.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
        self._acks.sock.setblocking(False)
        self._max_frame = max_frame
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._send_lock = threading.Lock()
        self._handed = 0  # frames handed to the sending thread and not yet sent whole (under _send_lock)
        self._inbox = bytearray()  # ack bytes read, not yet a whole frame (on the loop)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reading = False  # the loop watches the acks connection (on the loop)
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

    def start(self, loop: asyncio.AbstractEventLoop, on_ack: Callable[[bytearray], None],
              on_end: Callable[[str], None]) -> None:
        """Starts the sending thread, and the reading of acks on `loop` (from any thread)."""
        self._loop = loop
        threading.Thread(target=self._write, args=(on_end,), name="replication-frames", daemon=True).start()
        loop.call_soon_threadsafe(self._watch_acks, on_ack, on_end)

    def send(self, *message: Buffer) -> None:
        """Sends one frame (the concatenation of `message`'s buffers, which must not change until it
        is sent), after every frame sent before it. Never blocks: the caller may be the event loop.
        What the socket does not take at once goes to the sending thread; a standby that takes
        nothing for send_timeout ends the link."""
        parts = frame_parts(message)
        with self._send_lock:
            if self._handed == 0 and not self._closed:
                try:
                    parts = self._frames.send_now(parts)
                except OSError:
                    pass  # the sending thread meets the error too, and ends the link
                if not parts:
                    return
            self._handed += 1
            self._outbox.put(parts)

    def _write(self, on_end: Callable[[str], None]) -> None:
        why = ""
        try:
            while (parts := self._outbox.get()) is not None:
                self._frames.send_parts(parts)
                with self._send_lock:
                    self._handed -= 1
        except BlockingIOError:  # a plain socket: SO_SNDTIMEO passed without a byte taken
            why = f"the standby took nothing for {self.send_timeout:g} s"
        except TimeoutError:  # TLS: sendall's timeout bounds the whole frame
            why = f"a frame not sent within {self.send_timeout:g} s (the standby stopped reading)"
        except (OSError, ConnectionError, ssl.SSLError) as exc:
            why = f"broken: {exc}"
        finally:
            if not self._closed:
                on_end(why or "closed")

    def _watch_acks(self, on_ack: Callable[[bytearray], None], on_end: Callable[[str], None]) -> None:
        if self._closed:
            return
        self._reading = True
        self._loop.add_reader(self._acks.sock.fileno(), self._read_acks, on_ack, on_end)

    def _read_acks(self, on_ack: Callable[[bytearray], None], on_end: Callable[[str], None]) -> None:
        """The acks connection is readable (on the loop): on_ack for each whole frame read."""
        why = ""
        try:
            while not self._closed:
                try:
                    chunk = self._acks.sock.recv(1 << 16)
                except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    return
                if not chunk:
                    why = "the connection ended inside a frame" if self._inbox else "the standby closed the link"
                    break
                self._inbox += chunk
                while len(self._inbox) >= _LENGTH.size:
                    (size,) = _LENGTH.unpack_from(self._inbox)
                    if size > self._max_frame:
                        raise LinkRefused(f"a frame of {size} bytes, over the limit of {self._max_frame}")
                    end = _LENGTH.size + size
                    if len(self._inbox) < end:
                        break
                    frame = self._inbox[_LENGTH.size:end]
                    del self._inbox[:end]
                    on_ack(frame)
                    if self._closed:
                        return
            if not why:
                return
        except (OSError, ConnectionError, ssl.SSLError, LinkRefused) as exc:
            why = f"broken: {exc}"
        self._stop_acks()
        if not self._closed:  # checked again: close() may have come (and caused this end) after the check above
            on_end(why)

    def _stop_acks(self) -> None:
        """Stops watching the acks connection and closes it (on the loop)."""
        if self._reading:
            self._reading = False
            self._loop.remove_reader(self._acks.sock.fileno())
        self._acks.close()

    def close(self) -> None:
        """Ends the link (on_end is not called); frames not yet sent are dropped. From any thread."""
        self._closed = True
        self._outbox.put(None)
        self._frames.close()
        loop = self._loop
        if loop is None:
            self._acks.close()
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._stop_acks()
            return
        try:
            loop.call_soon_threadsafe(self._stop_acks)
        except RuntimeError:  # the loop is closed: nothing watches the connection any more
            self._acks.close()
