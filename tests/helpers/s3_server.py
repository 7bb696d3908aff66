"""Pytest side of the real S3 server (bench/s3_server.py): one SeaweedFS per test session.

A test takes the `s3` fixture (tests/ps/test_snapshot_s3.py), an S3Bucket, and writes under
`s3.fresh_uri()` (s3://<bucket>/<unique prefix>) with `storage_config=s3.config`. A test of its
own server may have it stop answering while a shard writes a step's files (StopsAtTableWrite).
"""

from __future__ import annotations

import os
import signal
import threading
import uuid
from dataclasses import dataclass

import pytest

from bench.s3_server import ACCESS_KEY, SECRET_KEY, S3Server
from ps.snapshot.files import SnapshotWriter
from ps.snapshot.storage import StorageConfig

__all__ = ["ACCESS_KEY", "SECRET_KEY", "S3Server", "S3Bucket", "StopsAtTableWrite"]


@dataclass
class S3Bucket:
    """A bucket on a running S3Server, with the StorageConfig that reaches it."""

    server: S3Server
    bucket: str
    config: StorageConfig

    @classmethod
    def create(cls, server: S3Server, bucket: str = "embps-test") -> S3Bucket:
        server.create_bucket(bucket)
        return cls(server, bucket, server.storage_config())

    def fresh_uri(self) -> str:
        """A new, empty prefix in the bucket, so tests sharing the server never see each other."""
        return f"s3://{self.bucket}/{uuid.uuid4().hex[:12]}"


class StopsAtTableWrite:
    """Stops `server` (SIGSTOP, by pid) as a shard of this process begins writing a table file of
    snapshot `step` (once): the write then waits on a server that stopped answering, a storage that
    hangs, for as long as its StorageConfig's request_timeout. `stopped` is set once it is stopped;
    resume() sends SIGCONT (call it before the server is stopped or killed)."""

    def __init__(self, server: S3Server, step: int, monkeypatch: pytest.MonkeyPatch) -> None:
        self.server = server
        self.stopped = threading.Event()
        self._resumed = False
        write = SnapshotWriter.write_table_shard

        def stop_then_write(writer: SnapshotWriter, *args, **kwargs):
            if writer.step == step and not self.stopped.is_set():
                os.kill(server.proc.pid, signal.SIGSTOP)
                self.stopped.set()
            return write(writer, *args, **kwargs)

        monkeypatch.setattr(SnapshotWriter, "write_table_shard", stop_then_write)

    def resume(self) -> None:
        """The server answers again (once; nothing if it was never stopped)."""
        if self.stopped.is_set() and not self._resumed:
            self._resumed = True
            os.kill(self.server.proc.pid, signal.SIGCONT)
