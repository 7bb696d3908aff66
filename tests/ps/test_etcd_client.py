"""EtcdClient against members that misbehave: every failure is EtcdUnavailableError within the
call's time, and a member that hangs costs one call, not every call (the lease's renewals go on)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from ps.etcd import EtcdClient, EtcdUnavailableError, Lease

KEEPALIVE = b'{"result":{"TTL":"2"}}'


@contextmanager
def member(answer, accepted: list | None = None) -> Iterator[str]:
    """A one-purpose HTTP/1.1 server: answer(connection, stop) writes whatever reply it likes, after
    each request (headers and body) is read, and the connection then carries the next request, as
    a keep-alive connection does; yields its endpoint. `accepted`: gets each connection accepted."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()
    held: list[socket.socket] = [] if accepted is None else accepted

    def serve() -> None:
        listener.settimeout(0.05)
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            held.append(connection)
            threading.Thread(target=handle, args=(connection,), daemon=True).start()

    def handle(connection: socket.socket) -> None:
        try:
            connection.settimeout(5)
            data = b""
            while not stop.is_set():
                while b"\r\n\r\n" not in data:
                    chunk = connection.recv(65536)
                    if not chunk:
                        return
                    data += chunk
                head, data = data.split(b"\r\n\r\n", 1)
                length = int(next((line.split(b":")[1] for line in head.split(b"\r\n")
                                   if line.lower().startswith(b"content-length:")), b"0"))
                while len(data) < length:
                    data += connection.recv(65536)
                data = data[length:]
                answer(connection, stop)
        except OSError:
            pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join()
        for connection in held:
            connection.close()
        listener.close()


def healthy(connection: socket.socket, stop: threading.Event) -> None:
    connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                       % (len(KEEPALIVE), KEEPALIVE))


def truncated(connection: socket.socket, stop: threading.Event) -> None:  # 100 bytes promised, 10 sent
    connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"result\":")
    connection.close()


def chunk_cut(connection: socket.socket, stop: threading.Event) -> None:  # etcd restarting mid-answer
    connection.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n40\r\n{\"result\":{")
    connection.close()


def garbage(connection: socket.socket, stop: threading.Event) -> None:
    connection.sendall(b"garbage\r\n\r\n")
    connection.close()


def not_an_object(connection: socket.socket, stop: threading.Event) -> None:
    connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n[]")


def trickle(connection: socket.socket, stop: threading.Event) -> None:  # a byte every 0.2 s
    connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(KEEPALIVE))
    for byte in KEEPALIVE:
        if stop.wait(0.2):
            return
        connection.sendall(bytes([byte]))


def hang(connection: socket.socket, stop: threading.Event) -> None:
    stop.wait()


@pytest.mark.parametrize("answer", [truncated, chunk_cut, garbage, not_an_object, trickle, hang])
def test_a_member_that_misbehaves_is_unavailable_within_the_call_s_time(answer):
    """http.client's errors (a cut answer, a bad status line) escaped as themselves, past every
    `except EtcdUnavailableError`, and ended the shard's lease renewals for good; a trickled answer
    took 19.5 s of a 1 s call (the timeout was per socket read)."""
    with member(answer) as endpoint:
        client = EtcdClient(endpoint, timeout_s=0.5)
        started = time.monotonic()
        with pytest.raises(EtcdUnavailableError):
            client.keepalive(Lease(1, 2))
        assert time.monotonic() - started < 2.0


def test_a_hung_member_listed_first_costs_one_call_then_the_one_that_answers_is_asked_first():
    with member(hang) as hung, member(healthy) as good:
        client = EtcdClient(f"{hung},{good}", timeout_s=0.5)
        started = time.monotonic()
        assert client.keepalive(Lease(1, 2)) == 2
        first = time.monotonic() - started
        started = time.monotonic()
        for _ in range(5):
            assert client.keepalive(Lease(1, 2)) == 2
        assert first >= 0.5 and time.monotonic() - started < 0.5, "every call waited on the hung member first"


def test_a_record_that_is_no_membership_is_unavailable_and_a_failed_pair_task_deposes():
    """A record at the shard's key that does not parse raised ValueError past every retry loop;
    and any replication task that raises what it does not handle ended silently (the lease's
    renewals with it): the process then answered nothing, for good, and did not stop."""
    import asyncio
    import base64
    import json
    from types import SimpleNamespace

    from ps.job_config import ArbiterConfig
    from ps.shard.arbiter import Arbiter
    from ps.shard.replication import Replication

    value = base64.b64encode(b"not json").decode()
    reply = json.dumps({"kvs": [{"key": "", "value": value, "mod_revision": "3", "create_revision": "3"}]}).encode()

    def corrupt(connection: socket.socket, stop: threading.Event) -> None:
        connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(reply), reply))

    with member(corrupt) as endpoint:
        arbiter = Arbiter(ArbiterConfig(endpoints=endpoint, lease_seconds=2), "job", 0, "127.0.0.1:1")
        with pytest.raises(EtcdUnavailableError, match="not a membership record"):
            arbiter.read()

    async def fail() -> None:
        raise RuntimeError("a bug")

    async def run() -> list[str]:
        deposed: list[str] = []
        told = asyncio.Event()
        pair = SimpleNamespace(describe=lambda: "shard 0", _stopped=False,
                               _depose=lambda why: (deposed.append(why), told.set()))
        task = asyncio.ensure_future(fail())
        task.add_done_callback(lambda t: Replication._task_ended(pair, t))
        await asyncio.wait_for(told.wait(), timeout=10)
        return deposed

    assert asyncio.run(run()) == ["a replication task failed: RuntimeError('a bug')"]


def test_calls_share_one_kept_connection():
    """A connection per call cost the caller and etcd a TCP (over https, a TLS) handshake each: a
    pair of shards makes 8 calls a second (bench arbiter: 2.8 ms of CPU a call over https
    fresh, 0.8 kept)."""
    accepted: list[socket.socket] = []
    with member(healthy, accepted) as endpoint:
        client = EtcdClient(endpoint, timeout_s=0.5)
        for _ in range(5):
            assert client.keepalive(Lease(1, 2)) == 2
        client.close()
    assert len(accepted) == 1


def test_a_kept_connection_its_member_closed_is_not_used():
    """etcd restarted (or closed an idle connection) between two calls: the second call opens a new
    connection instead of failing on the old one."""
    closed = threading.Event()

    def answer_then_close(connection: socket.socket, stop: threading.Event) -> None:
        healthy(connection, stop)
        connection.close()
        closed.set()

    accepted: list[socket.socket] = []
    with member(answer_then_close, accepted) as endpoint:
        client = EtcdClient(endpoint, timeout_s=0.5)
        assert client.keepalive(Lease(1, 2)) == 2
        assert closed.wait(5)
        assert client.keepalive(Lease(1, 2)) == 2
        client.close()
    assert len(accepted) == 2


def test_a_look_reads_the_record_and_the_leader_key_and_no_other_shard_s(etcd):
    """A standby's look every eighth of a lease is one range read (Arbiter.look), not two calls."""
    from ps.job_config import ArbiterConfig
    from ps.shard.arbiter import Arbiter, Membership

    config = ArbiterConfig(endpoints=etcd.endpoint, lease_seconds=2)
    one, ten = Arbiter(config, "look", 1, "127.0.0.1:1"), Arbiter(config, "look", 10, "127.0.0.1:2")
    assert one.look() == (None, 0, False)
    assert ten.take_primary(0, Membership("127.0.0.1:2", "", 1, False))
    assert one.look() == (None, 0, False), "shard 10's keys sort between shard 1's and its range's end"
    assert one.take_primary(0, Membership("127.0.0.1:1", "", 1, False))
    membership, revision = one.read()
    assert one.look() == (membership, revision, True)
    one.release_lease()
    assert one.look() == (membership, revision, False)
    ten.release_lease()
    for arbiter in (one, ten):
        arbiter.etcd.close()
