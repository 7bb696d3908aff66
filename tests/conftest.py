"""Shared fixtures: real shard processes on free loopback ports (see tests/helpers/processes.py)."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.helpers.processes import ShardCluster
from tests.helpers.s3_server import S3Bucket, S3Server


@pytest.fixture
def start_cluster(tmp_path):
    """start_cluster(job, name=...) -> a running ShardCluster, stopped by pid when the test ends."""
    clusters: list[ShardCluster] = []

    def start(job, name: str = "cluster", env: dict[str, str] | None = None) -> ShardCluster:
        cluster = ShardCluster.start(job, tmp_path / name, env)
        clusters.append(cluster)
        return cluster

    yield start
    for cluster in clusters:
        cluster.stop()


@pytest.fixture(scope="session")
def promtool() -> str:
    """Path of promtool (Debian package `prometheus`); skips the test where it is absent."""
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool not found: install the Debian package `prometheus` (make system-tools)")
    subprocess.run([path, "--version"], check=True, capture_output=True)
    return path


@pytest.fixture(scope="session")
def s3(tmp_path_factory) -> S3Bucket:
    """A real S3 server (SeaweedFS on 127.0.0.1, credentials checked) for the whole session,
    stopped by pid at the end; tests write under s3.fresh_uri() with s3.config."""
    server = S3Server.start(tmp_path_factory.mktemp("seaweedfs"))
    try:
        yield S3Bucket.create(server)
    finally:
        server.stop()
