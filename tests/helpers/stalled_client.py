"""A gRPC client that sends one unary call and never takes the reply, as a client that stops reading
does: a raw HTTP/2 connection whose streams get a flow-control window of 0, so the server can send
the reply's headers but none of its bytes. Or one that sends only the first half of its request
and no more (whole=False), as a slow or stuck sender does. Or (FrozenCall) one that stops reading
its socket at all, as a stopped process does.

grpc's own clients always read, so this speaks HTTP/2 on a socket: the connection preface, SETTINGS
(INITIAL_WINDOW_SIZE = 0), the call's HEADERS (HPACK literals, no table, no Huffman) and one DATA
frame with the length-prefixed message. A thread answers the server's SETTINGS and PINGs, as a live
client does, and notes an RST_STREAM: the server giving the call up."""

from __future__ import annotations

import socket
import struct
import threading

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, WINDOW_UPDATE = 0x0, 0x1, 0x3, 0x4, 0x6, 0x8
END_STREAM, ACK, END_HEADERS = 0x1, 0x1, 0x4
INITIAL_WINDOW_SIZE = 0x4
STREAM = 1
MAX_WINDOW = 2**31 - 1
MAX_FRAME = 16384  # HTTP/2's default largest frame payload


def _frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def _hpack_string(data: bytes) -> bytes:
    """An HPACK string literal without Huffman coding: its length as a 7-bit-prefix integer, then it."""
    if len(data) < 127:
        return bytes([len(data)]) + data
    out, rest = bytearray([127]), len(data) - 127
    while rest >= 128:
        out.append((rest & 0x7F) | 0x80)
        rest >>= 7
    out.append(rest)
    return bytes(out) + data


def _header_block(headers: list[tuple[str, str]]) -> bytes:
    """Each header as a literal without indexing, with a new name (0x00): no dynamic table to keep."""
    return b"".join(b"\x00" + _hpack_string(k.encode()) + _hpack_string(v.encode()) for k, v in headers)


def _call_headers(address: str, method: str) -> bytes:
    """The HEADERS block of a unary gRPC call of `method` to `address`."""
    return _header_block([
        (":method", "POST"), (":scheme", "http"), (":path", method), (":authority", address),
        ("content-type", "application/grpc"), ("te", "trailers"),
    ])  # fmt: skip


class StalledCall:
    """One unary call to `address` (host:port, plaintext) of `method` ("/pkg.Service/Method") with the
    serialized `request` (whole, or its first half and no end of stream, or nothing but the call's
    headers when `headers_only`), whose reply is never taken. `reset` is set once the server resets
    it; `settings` holds the server's HTTP/2 SETTINGS (id -> value) once they came."""

    def __init__(
        self, address: str, method: str, request: bytes, whole: bool = True, headers_only: bool = False
    ) -> None:
        host, port = address.rsplit(":", 1)
        self._socket = socket.create_connection((host, int(port)), timeout=10)
        self.reset = threading.Event()
        self.settings: dict[int, int] = {}
        self._closed = False
        headers = _call_headers(address, method)
        message = b"\x00" + struct.pack(">I", len(request)) + request  # gRPC's length prefix
        if headers_only:
            body = b""
        elif whole:
            body = _frame(DATA, END_STREAM, STREAM, message)
        else:
            body = _frame(DATA, 0, STREAM, message[: len(message) // 2])
        self._socket.sendall(
            PREFACE
            + _frame(SETTINGS, 0, 0, struct.pack(">HI", INITIAL_WINDOW_SIZE, 0))
            + _frame(HEADERS, END_HEADERS, STREAM, headers)
            + body
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        try:
            self._socket.settimeout(None)
            while not self._closed:
                head = self._exactly(9)
                length = int.from_bytes(head[:3], "big")
                kind, flags, stream = head[3], head[4], int.from_bytes(head[5:9], "big") & 0x7FFFFFFF
                payload = self._exactly(length)
                if kind == SETTINGS and not flags & ACK:
                    for at in range(0, len(payload) - 5, 6):
                        key, value = struct.unpack(">HI", payload[at : at + 6])
                        self.settings[key] = value
                    self._socket.sendall(_frame(SETTINGS, ACK, 0, b""))
                elif kind == PING and not flags & ACK:
                    self._socket.sendall(_frame(PING, ACK, 0, payload))
                elif kind == RST_STREAM and stream == STREAM:
                    self.reset.set()
        except OSError:
            return

    def _exactly(self, n: int) -> bytes:
        data = bytearray()
        while len(data) < n:
            chunk = self._socket.recv(n - len(data))
            if not chunk:
                raise OSError("the server closed the connection")
            data += chunk
        return bytes(data)

    def close(self) -> None:
        """Ends the reader at once: shutdown wakes its blocked recv, which close() alone does not
        (the reader then sat out the join's timeout, 5 s a call)."""
        self._closed = True
        try:
            self._socket.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # the server closed the connection already
        self._socket.close()
        self._reader.join(timeout=5)
        assert not self._reader.is_alive(), "the stalled call's reader did not end"


class FrozenCall:
    """One unary call to `address` from a client that then stops, as a process stopped by a signal or
    a debugger, or a host that hangs, does: flow-control windows wide open, then nothing on the
    socket is read again, so the kernel's receive buffer fills and the server's TCP sends meet a
    zero window. `local_port` names the connection in /proc/net/tcp."""

    def __init__(self, address: str, method: str, request: bytes) -> None:
        host, port = address.rsplit(":", 1)
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
        self._socket.settimeout(10)
        self._socket.connect((host, int(port)))
        self.local_port = self._socket.getsockname()[1]
        headers = _call_headers(address, method)
        message = b"\x00" + struct.pack(">I", len(request)) + request  # gRPC's length prefix
        pieces = [message[i : i + MAX_FRAME] for i in range(0, len(message), MAX_FRAME)]
        self._socket.sendall(
            PREFACE
            + _frame(SETTINGS, 0, 0, struct.pack(">HI", INITIAL_WINDOW_SIZE, MAX_WINDOW))
            + _frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", MAX_WINDOW - 65535))
            + _frame(HEADERS, END_HEADERS, STREAM, headers)
            + b"".join(_frame(DATA, END_STREAM if i == len(pieces) - 1 else 0, STREAM, piece)
                       for i, piece in enumerate(pieces))
        )

    def close(self) -> None:
        self._socket.close()
