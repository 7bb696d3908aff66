"""Pytest side of the real S3 server (bench/s3_server.py): one SeaweedFS per test session.

A test takes the `s3` fixture (tests/ps/test_snapshot_s3.py), an S3Bucket, and writes under
`s3.fresh_uri()` (s3://<bucket>/<unique prefix>) with `storage_config=s3.config`.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from bench.s3_server import ACCESS_KEY, SECRET_KEY, S3Server
from ps.snapshot.storage import StorageConfig

__all__ = ["ACCESS_KEY", "SECRET_KEY", "S3Server", "S3Bucket"]


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
