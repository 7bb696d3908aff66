"""The replication link under the job's TLS (ps/shard/replication_link.py): frames and acks go over
TLS with the job's files, and under mutual TLS a primary without the job's client certificate (or
with one another CA signed) never gets a frame through, even holding the key."""

from __future__ import annotations

import dataclasses
import queue

import pytest

from ps.shard.replication_link import PrimaryLink, StandbyLink
from tests.security.certs import secured

LIMIT = 1 << 20
WAIT = 10.0


def _standby(security, frames: queue.Queue, ends: queue.Queue, accept_timeout: float = WAIT) -> StandbyLink:
    link = StandbyLink("127.0.0.1", security, LIMIT, accept_timeout)
    link.start(lambda frame: (frames.put(bytes(frame)), bytes(frame)[::-1])[1], ends.put)
    return link


def test_frames_and_acks_travel_over_mutual_tls(pki, loop_thread):
    security = secured(pki, mutual=True)
    frames, acks, ends = queue.Queue(), queue.Queue(), queue.Queue()
    standby = _standby(security, frames, ends)
    primary = PrimaryLink("127.0.0.1:1", standby.port, standby.key, security, LIMIT, WAIT)
    primary.start(loop_thread, lambda frame: acks.put(bytes(frame)), ends.put)
    try:
        for message in (b"one", b"x" * 300_000):
            primary.send(message)
        primary.send(b"tw", memoryview(b"o"))
        assert frames.get(timeout=WAIT) == b"one"
        assert acks.get(timeout=WAIT) == b"eno"
        assert len(frames.get(timeout=WAIT)) == 300_000
        assert frames.get(timeout=WAIT) == b"two"
    finally:
        primary.close()
        standby.close()


@pytest.mark.parametrize("client", ["none", "rogue"])
def test_a_primary_without_the_jobs_client_certificate_gets_no_frame_through(pki, client, loop_thread):
    security = secured(pki, mutual=True)
    if client == "none":
        primary_security = dataclasses.replace(security, client_cert=None, client_key=None)
    else:
        primary_security = dataclasses.replace(security, client_cert=str(pki.rogue_cert), client_key=str(pki.rogue_key))
    frames, ends = queue.Queue(), queue.Queue()
    standby = _standby(security, frames, ends, accept_timeout=2.0)
    primary_ends: queue.Queue = queue.Queue()
    try:
        primary = PrimaryLink("127.0.0.1:1", standby.port, standby.key, primary_security, LIMIT, WAIT)
    except OSError:
        primary = None  # refused during the handshake, before the key
    if primary is not None:
        primary.start(loop_thread, lambda frame: None, primary_ends.put)
        primary.send(b"let me in")
    try:
        assert "did not connect" in ends.get(timeout=WAIT)
        assert frames.empty()
    finally:
        if primary is not None:
            primary.close()
        standby.close()
