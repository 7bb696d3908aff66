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


def test_a_rotation_whose_files_do_not_load_keeps_the_link_s_tls(tmp_path, loop_thread, caplog):
    """The link read the TLS files at each new link: a half-written rotation (a key that is not the
    certificate's) made every link fail with SSLError while the gRPC ports kept their certificate,
    so a pair lost its standby at the next break of its stream (a review's repro). The link keeps
    the last set that loaded, as the ports do, and takes a new set that loads."""
    import logging
    import os
    from pathlib import Path

    from tests.security.certs import Pki

    security = secured(Pki.create(tmp_path), mutual=True)  # its own files: the module's PKI is shared

    def one_frame() -> None:
        frames, acks, ends = queue.Queue(), queue.Queue(), queue.Queue()
        standby = _standby(security, frames, ends)
        primary = PrimaryLink("127.0.0.1:1", standby.port, standby.key, security, LIMIT, WAIT)
        primary.start(loop_thread, lambda frame: acks.put(bytes(frame)), ends.put)
        try:
            primary.send(b"ping")
            assert frames.get(timeout=WAIT) == b"ping"
            assert acks.get(timeout=WAIT) == b"gnip"
        finally:
            primary.close()
            standby.close()

    one_frame()
    server_key, client_key = Path(security.tls_key).read_bytes(), Path(security.client_key).read_bytes()
    with caplog.at_level(logging.WARNING, logger="embps.ps"):
        for path, data in ((security.tls_key, client_key), (security.client_key, server_key)):
            Path(path).write_bytes(data)  # neither key is its certificate's any more
            os.utime(path, ns=(os.stat(path).st_mtime_ns + 10**9,) * 2)  # a new version, whatever the clock's grain
        one_frame()
    assert caplog.text.count("replication link: TLS files changed but do not load") == 2, caplog.text
    for path, data in ((security.tls_key, server_key), (security.client_key, client_key)):
        Path(path).write_bytes(data)
        os.utime(path, ns=(os.stat(path).st_mtime_ns + 10**9,) * 2)  # a new version, whatever the clock's grain
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="embps.ps"):
        one_frame()
    assert "do not load" not in caplog.text
