"""Pytest side of the real etcd (bench/etcd_server.py): the arbiter of shards with standbys."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.etcd_server import EtcdServer, etcd_missing


def start_etcd(workdir: Path, host: str = "127.0.0.1") -> EtcdServer:
    """A fresh etcd in workdir, listening on host; skips the test where etcd is not installed."""
    missing = etcd_missing()
    if missing is not None:
        pytest.skip(missing)
    return EtcdServer.start(workdir, host=host)
