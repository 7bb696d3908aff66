"""The replication link (ps/shard/replication_link.py) on its own, over real loopback sockets: frames
in order both ways, the key and role checked, and every way a link can end reported once.

The link inside a shard pair is exercised by every standby test (tests/ps/test_standby.py,
tests/faults/, tests/fuzz/test_fuzz_replication.py); here its contract is pinned where a pair
would hide it: a wrong key, a frame over the limit, junk, a primary that never connects.
"""

from __future__ import annotations

import concurrent.futures
import queue
import select
import socket
import struct
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ps.security import SecurityConfig
from ps.shard.replication_link import KEY_BYTES, ROLE_ACKS, ROLE_FRAMES, LinkRefused, PrimaryLink, StandbyLink

PLAIN = SecurityConfig()
LIMIT = 1 << 20
WAIT = 10.0


class Ends:
    """What the two ends' callbacks saw."""

    def __init__(self) -> None:
        self.frames: queue.Queue = queue.Queue()  # on the standby
        self.acks: queue.Queue = queue.Queue()  # on the primary
        self.standby_end: queue.Queue = queue.Queue()
        self.primary_end: queue.Queue = queue.Queue()

    def handle(self, frame: bytearray) -> bytes:
        """The standby's handler: echoes the frame reversed; refuses a frame that starts with b"no"."""
        data = bytes(frame)
        if data.startswith(b"no"):
            raise LinkRefused("a refused frame")
        self.frames.put(data)
        return data[::-1]


def _standby(ends: Ends, accept_timeout: float = WAIT, limit: int = LIMIT) -> StandbyLink:
    link = StandbyLink("127.0.0.1", PLAIN, limit, accept_timeout)
    link.start(ends.handle, ends.standby_end.put)
    return link


def _primary(loop, ends: Ends, standby: StandbyLink, limit: int = LIMIT) -> PrimaryLink:
    link = PrimaryLink(f"127.0.0.1:{standby.port + 1}", standby.port, standby.key, PLAIN, limit, WAIT)
    link.start(loop, lambda frame: ends.acks.put(bytes(frame)), ends.primary_end.put)
    return link


@pytest.fixture
def ends() -> Ends:
    return Ends()


@pytest.fixture
def standby(ends: Ends):
    """A standby's link with the test's defaults, closed after the test."""
    link = _standby(ends)
    yield link
    link.close()


@pytest.fixture
def primary(loop_thread, ends: Ends, standby: StandbyLink):
    """The primary's end connected to `standby` (its acks read on `loop_thread`), closed after the test."""
    link = _primary(loop_thread, ends, standby)
    yield link
    link.close()


def test_frames_arrive_in_order_and_their_acks_come_back_in_order(ends, standby, primary):
    sent = [bytes([i % 251]) * size for i, size in enumerate((1, 100, 5000, 300_000, LIMIT, 7))]
    for message in sent:
        primary.send(message)
    assert [ends.frames.get(timeout=WAIT) for _ in sent] == sent
    assert [ends.acks.get(timeout=WAIT) for _ in sent] == [m[::-1] for m in sent]
    primary.close()  # reported on the other end only
    assert ends.standby_end.get(timeout=WAIT) == "the primary closed the link"
    standby.close()
    assert ends.primary_end.empty() and ends.standby_end.empty()


class _ReadHeldAfterData:
    """The acks socket of a primary whose loop thread is held between its check that the link is
    open and its next read, as a busy host's scheduler may hold it: once armed, a read that follows
    a read which returned data waits (`waiting` set) until the test sets `go`."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.armed = False
        self.waiting = threading.Event()
        self.go = threading.Event()
        self._after_data = False

    def recv(self, size: int) -> bytes:
        if self.armed and self._after_data:
            self.waiting.set()
            self.go.wait(WAIT)
        data = self.sock.recv(size)
        self._after_data = bool(data)
        return data

    def __getattr__(self, name: str):
        return getattr(self.sock, name)


def test_an_end_that_close_causes_is_not_reported_even_when_the_loop_reads_it_late(loop_thread, ends, standby):
    link = PrimaryLink(f"127.0.0.1:{standby.port + 1}", standby.port, standby.key, PLAIN, LIMIT, WAIT)
    held = link._acks.sock = _ReadHeldAfterData(link._acks.sock)
    link.start(loop_thread, lambda frame: ends.acks.put(bytes(frame)), ends.primary_end.put)
    held.armed = True
    link.send(b"last")
    assert ends.acks.get(timeout=WAIT) == b"tsal"
    assert held.waiting.wait(WAIT)  # the loop saw the link open and is about to read again
    link.close()
    assert ends.standby_end.get(timeout=WAIT) == "the primary closed the link"
    held.go.set()  # the read meets the end that close() caused
    loop_free = concurrent.futures.Future()
    loop_thread.call_soon_threadsafe(loop_free.set_result, None)
    loop_free.result(WAIT)  # runs once the loop has finished the read it was held in
    assert ends.primary_end.empty()


def test_a_frame_sent_as_several_buffers_arrives_as_their_concatenation(ends, primary):
    primary.send(b"ab", memoryview(b"cd"), bytearray(b"ef"), b"", b"x" * 70_000)
    assert ends.frames.get(timeout=WAIT) == b"abcdef" + b"x" * 70_000


def _hello(port: int, hello: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
    sock.sendall(hello)
    return sock


def _closed_by_peer(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


@pytest.mark.parametrize(
    ("hello", "then"),
    [
        (b"\0" * KEY_BYTES + ROLE_FRAMES, "wait"),
        (b"\0" * KEY_BYTES + ROLE_ACKS, "wait"),
        (b"short", "close"),
        (b"", "close"),
        (b"", "wait"),  # connected, silent, open: timed out, so it holds nobody up
        (b"slow", "trickle"),  # a byte now and then, never the whole key in time
    ],
    ids=["wrong-key-frames", "wrong-key-acks", "short", "nothing-then-close", "silent", "slow"],
)
def test_a_connection_without_the_key_is_closed_and_the_primary_still_gets_in(loop_thread, ends, standby, hello,
                                                                             then):
    stray = _hello(standby.port, hello)
    stop = threading.Event()
    trickle = None
    try:
        if then == "close":
            stray.shutdown(socket.SHUT_WR)  # what it sent is all it sends
        elif then == "trickle":
            def drip() -> None:
                try:
                    while not stop.wait(0.2):
                        stray.sendall(b"x")
                except OSError:
                    pass  # closed by the standby

            trickle = threading.Thread(target=drip)
            trickle.start()
        assert _closed_by_peer(stray)
        primary = _primary(loop_thread, ends, standby)
        primary.send(b"hello")
        assert ends.acks.get(timeout=WAIT) == b"olleh"
        primary.close()
    finally:
        stop.set()
        if trickle is not None:
            trickle.join()
        stray.close()


def test_silent_connections_do_not_keep_the_primary_out_past_the_deadline(loop_thread):
    """Connections were greeted one at a time, each given 3 s for its key: two silent ones from
    anyone (no key needed to open a TCP connection) held the primary's own connections past a
    4 s accept deadline, and the link failed; the pair could be kept from replicating so."""
    ends = Ends()
    standby = _standby(ends, accept_timeout=4.0)
    silent = [socket.create_connection(("127.0.0.1", standby.port), timeout=WAIT) for _ in range(4)]
    try:
        primary = _primary(loop_thread, ends, standby)
        primary.send(b"hello")
        assert ends.acks.get(timeout=WAIT) == b"olleh"
        assert ends.standby_end.empty()
        primary.close()
    finally:
        for sock in silent:
            sock.close()
        standby.close()


def test_a_second_connection_for_a_role_already_taken_is_closed(standby):
    """Each connection's key is read on a thread of its own, so either of two sent back to back may
    take the role first (a fresh clone's run: the second one took it, and the test waited on it):
    one of them is closed, the other kept."""
    first = _hello(standby.port, standby.key + ROLE_FRAMES)
    again = _hello(standby.port, standby.key + ROLE_FRAMES)
    try:
        closed, _, _ = select.select([first, again], [], [], WAIT)
        assert len(closed) == 1 and _closed_by_peer(closed[0])
        kept = again if closed[0] is first else first
        assert not select.select([kept], [], [], 0.5)[0], "both connections of one role were closed"
    finally:
        first.close()
        again.close()


def test_a_primary_that_never_connects_ends_the_link_at_its_deadline():
    ends = Ends()
    standby = _standby(ends, accept_timeout=0.3)
    assert "did not connect" in ends.standby_end.get(timeout=WAIT)
    with pytest.raises(OSError):  # the port is closed
        socket.create_connection(("127.0.0.1", standby.port), timeout=1).close()


@pytest.mark.parametrize(
    ("bad", "why"),
    [(b"x" * (LIMIT + 1), "over the limit"), (b"no thanks", "a refused frame")],
    ids=["too-big", "refused"],
)
def test_a_frame_the_standby_cannot_take_ends_the_link_on_both_ends_and_nothing_after_it_is_handled(
    loop_thread, ends, standby, bad, why
):
    primary = _primary(loop_thread, ends, standby, limit=2 * LIMIT)
    try:
        for message in (b"one", bad, b"three"):
            primary.send(message)
        assert ends.frames.get(timeout=WAIT) == b"one"
        assert why in ends.standby_end.get(timeout=WAIT)
        assert ends.primary_end.get(timeout=WAIT)
        assert ends.frames.empty()
    finally:
        primary.close()


def test_a_standby_that_goes_away_ends_the_primarys_link(ends, standby, primary):
    primary.send(b"ping")
    assert ends.acks.get(timeout=WAIT) == b"gnip"
    standby.close()
    assert ends.primary_end.get(timeout=WAIT)


@settings(derandomize=True, database=None, deadline=None, max_examples=60,
          suppress_health_check=list(HealthCheck))
@given(chunks=st.lists(st.binary(max_size=64), min_size=1, max_size=6))
def test_junk_after_the_key_ends_the_link_or_is_handled_as_frames(chunks):
    """Whatever bytes follow a valid key on the frames connection (lengths beyond the limit, frames
    cut short, an early close), the standby ends the link once or handles whole frames: it never
    hangs past the close, never raises out of its thread, and reports at most one end."""
    ends = Ends()
    standby = _standby(ends, limit=4096)
    frames = _hello(standby.port, standby.key + ROLE_FRAMES)
    acks = _hello(standby.port, standby.key + ROLE_ACKS)
    try:
        try:
            for chunk in chunks:
                frames.sendall(chunk)
            frames.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the standby closed it already (a length over the limit)
        why = ends.standby_end.get(timeout=WAIT)
        assert why.startswith(("refused:", "broken:", "the primary closed the link")), why
        data = b"".join(chunks)
        expected, pos = [], 0
        while pos + 4 <= len(data):
            (size,) = struct.unpack_from("<I", data, pos)
            if size > 4096 or pos + 4 + size > len(data):
                break
            frame = data[pos + 4:pos + 4 + size]
            if frame.startswith(b"no"):
                break
            expected.append(frame)
            pos += 4 + size
        got = []
        while not ends.frames.empty():
            got.append(ends.frames.get())
        assert got == expected
        assert ends.standby_end.empty()
    finally:
        frames.close()
        acks.close()
        standby.close()


def test_sends_from_many_threads_arrive_whole(ends, primary):
    def sender(tag: int) -> None:
        for i in range(50):
            primary.send(bytes([tag]) * (1000 + i))

    threads = [threading.Thread(target=sender, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    got = [ends.frames.get(timeout=WAIT) for _ in range(200)]
    for frame in got:
        assert len(set(frame)) == 1  # never interleaved
    for tag in range(4):
        assert [len(f) for f in got if f[0] == tag] == [1000 + i for i in range(50)]


class _FakeStandby:
    """A listener in place of a standby's link: takes the primary's two connections and lets the
    test read the frames and write raw bytes on the acks connection."""

    def __init__(self) -> None:
        self.key = b"k" * KEY_BYTES
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]

    def primary(self, loop, ends: Ends, send_timeout: float = WAIT) -> PrimaryLink:
        link = PrimaryLink("127.0.0.1:1", self.port, self.key, PLAIN, LIMIT, send_timeout)
        link.start(loop, lambda frame: ends.acks.put(bytes(frame)), ends.primary_end.put)
        self.conns: dict[bytes, socket.socket] = {}
        for _ in range(2):
            conn, _ = self._listener.accept()
            conn.settimeout(WAIT)
            hello = _read_exact(conn, KEY_BYTES + 1)
            assert hello[:KEY_BYTES] == self.key
            self.conns[hello[KEY_BYTES:]] = conn
        return link

    def frame(self) -> bytes:
        (size,) = struct.unpack("<I", _read_exact(self.conns[ROLE_FRAMES], 4))
        return _read_exact(self.conns[ROLE_FRAMES], size)

    def close(self) -> None:
        for conn in getattr(self, "conns", {}).values():
            conn.close()
        self._listener.close()


def _read_exact(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, f"closed after {len(data)} of {size} bytes"
        data += chunk
    return data


@pytest.fixture
def fake():
    standby = _FakeStandby()
    yield standby
    standby.close()


def test_acks_that_arrive_in_pieces_are_read_whole_in_order(loop_thread, ends, fake):
    primary = fake.primary(loop_thread, ends)
    try:
        acks = [b"a", b"", b"b" * 70_000, b"c" * 3]
        data = b"".join(struct.pack("<I", len(a)) + a for a in acks)
        pieces = [data[:1], data[1:6], data[6:9], data[9:40_000], data[40_000:]]
        for piece in pieces:
            fake.conns[ROLE_ACKS].sendall(piece)
        assert [ends.acks.get(timeout=WAIT) for _ in acks] == acks
        assert ends.primary_end.empty()
    finally:
        primary.close()


@pytest.mark.parametrize(
    ("ack_bytes", "why"),
    [(struct.pack("<I", LIMIT + 1), "over the limit"), (struct.pack("<I", 10) + b"abc", "inside a frame"),
     (b"", "closed the link")],
    ids=["too-big", "cut-short", "closed"],
)
def test_acks_the_primary_cannot_read_end_its_link_once(loop_thread, ends, fake, ack_bytes, why):
    primary = fake.primary(loop_thread, ends)
    try:
        fake.conns[ROLE_ACKS].sendall(ack_bytes)
        fake.conns[ROLE_ACKS].shutdown(socket.SHUT_WR)
        assert why in ends.primary_end.get(timeout=WAIT)
        primary.send(b"after")  # the frames connection still takes it; nothing more is reported
        assert fake.frame() == b"after"
        assert ends.acks.empty() and ends.primary_end.empty()
    finally:
        primary.close()


def test_frames_a_standby_reads_late_arrive_in_order_and_later_ones_too(loop_thread, ends, fake):
    """More than the sockets hold, sent before the standby reads any: send() returns at once each
    time (what the socket did not take waits on the sending thread), and every frame arrives whole,
    in order, then the frames sent once it has caught up (from the caller's thread again)."""
    primary = fake.primary(loop_thread, ends)
    try:
        sent = [bytes([i]) * (300_000 + i) for i in range(64)]  # ~19 MiB
        for message in sent:
            primary.send(message)
        assert [fake.frame() for _ in sent] == sent
        for message in (b"x", b"y" * 1000):
            primary.send(message)
        assert [fake.frame(), fake.frame()] == [b"x", b"y" * 1000]
        assert ends.primary_end.empty()
    finally:
        primary.close()


def test_a_standby_that_stops_reading_ends_the_link_after_the_send_timeout(loop_thread, ends, fake):
    primary = fake.primary(loop_thread, ends, send_timeout=0.5)
    try:
        for _ in range(64):  # never blocks, though nobody reads
            primary.send(b"z" * 300_000)
        assert "the standby took nothing for 0.5 s" in ends.primary_end.get(timeout=WAIT)
    finally:
        primary.close()
